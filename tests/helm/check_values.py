#!/usr/bin/env python3
"""Every rule of charts/quantfleet/values.schema.json has a values case that helm must refuse, with its message.

A rule is a constraint keyword at a place in the schema (its JSON pointer, e.g.
/properties/operator/properties/replicas/enum), or a `false` schema (a forbidden key). `type` is structure, not a
rule: the cases cover it where a wrong type is a likely mistake, but coverage does not require one per field.
Each case in invalid-values.json names its rule, the values (merged over the chart's defaults by helm), and a
substring of helm's error, which names the offending value's path. A few checks live in the templates (`fail` with
a message the schema cannot give); their cases name the rule "template: <value>". The check fails when a case renders, fails for
another reason, names a rule the schema lacks, or when a rule has no case.
Usage: check_values.py HELM CHART_DIR CASES_JSON [--coverage-only]
(--coverage-only skips running helm: scripts/helm-check.sh uses it to prove a missing case is caught.)
"""
import json
import subprocess
import sys
import tempfile

RULE_KEYWORDS = {"enum", "const", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems",
                 "maxItems", "uniqueItems", "required", "minProperties"}


def rules(schema, pointer=""):
    """Yields the pointer of every rule in `schema`."""
    if schema is False:
        yield pointer
        return
    if not isinstance(schema, dict):
        return
    for keyword in RULE_KEYWORDS & schema.keys():
        yield f"{pointer}/{keyword}"
    if schema.get("additionalProperties") is False:
        yield f"{pointer}/additionalProperties"
    for key in ("additionalProperties", "items", "then"):
        if isinstance(schema.get(key), (dict, bool)) and schema.get(key) is not False:
            yield from rules(schema[key], f"{pointer}/{key}")
    for name, sub in schema.get("properties", {}).items():
        yield from rules(sub, f"{pointer}/properties/{name}")
    for i, sub in enumerate(schema.get("allOf", [])):
        yield from rules(sub, f"{pointer}/allOf/{i}")


def main(helm, chart, cases_path, mode=None):
    with open(f"{chart}/values.schema.json") as f:
        schema_rules = set(rules(json.load(f)))
    with open(cases_path) as f:
        cases = json.load(f)
    failures = []
    covered = set()
    for case in cases:
        rule, values, expected = case["rule"], case["values"], case["error"]
        if rule.startswith("template: "):
            pass  # a check the templates make with `fail` (a message JSON Schema cannot give)
        elif rule not in schema_rules:
            failures.append(f"case for {rule}: the schema has no such rule")
        covered.add(rule)
        if mode == "--coverage-only":
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
            json.dump(values, file)
            file.flush()
            run = subprocess.run([helm, "template", "check", chart, "--kube-version", "1.33.0", "-f", file.name],
                                 capture_output=True, text=True)
        if run.returncode == 0:
            failures.append(f"case for {rule}: helm accepted {json.dumps(values)}")
        elif expected not in run.stderr:
            failures.append(f"case for {rule}: expected {expected!r} in helm's error, got: {run.stderr.strip()}")
    for rule in sorted(schema_rules - covered):
        failures.append(f"rule {rule} has no failing values case in {cases_path}")
    if failures:
        print("values.schema.json check FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"values.schema.json: {len(schema_rules)} rules, {len(cases)} failing cases, each refused with its message")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
