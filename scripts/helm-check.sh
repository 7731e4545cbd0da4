#!/usr/bin/env bash
# Checks the Helm chart (charts/quantfleet) with helm built from the Go module proxy (scripts/helm-build.sh,
# cached): `helm lint` and `helm template --kube-version 1.33.0` with the default values and every ci/*-values.yaml,
# the chart's CRDs equal crds/, and every values.schema.json rule refuses its bad-values case with its message
# (tests/helm/check_values.py). The rendered manifests are applied to the real control plane by
# crates/quantfleet-operator/tests/chart.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
chart=charts/quantfleet
helm="$(scripts/helm-build.sh)"
"$helm" version --short

value_sets=("")
for f in "$chart"/ci/*-values.yaml; do value_sets+=("$f"); done
for values in "${value_sets[@]}"; do
    args=(${values:+-f "$values"})
    "$helm" lint --strict "$chart" "${args[@]}"
    out="$("$helm" template quantfleet "$chart" --namespace quantfleet-system --kube-version 1.33.0 --include-crds "${args[@]}")"
    printf 'helm template%s: %d objects\n' "${values:+ -f $values}" "$(grep -c '^kind: ' <<<"$out")"
done

for crd in crds/*.yaml; do
    cmp -s "$crd" "$chart/crds/$(basename "$crd")" ||
        { echo "$chart/crds/$(basename "$crd") differs from $crd: run \`cargo run -p quantfleet -- crdgen\`" >&2; exit 1; }
done
[[ "$(ls "$chart"/crds | wc -l)" == "$(ls crds/*.yaml | wc -l)" ]] || { echo "$chart/crds and crds/ hold different files" >&2; exit 1; }

python3 tests/helm/check_values.py "$helm" "$chart" tests/helm/invalid-values.json

# The coverage check can fail: without its first case, the first rule must be reported as uncovered.
trimmed="$(mktemp)"
trap 'rm -f "$trimmed"' EXIT
python3 -c 'import json, sys; json.dump(json.load(open(sys.argv[1]))[1:], open(sys.argv[2], "w"))' \
    tests/helm/invalid-values.json "$trimmed"
if python3 tests/helm/check_values.py "$helm" "$chart" "$trimmed" --coverage-only 2>"$trimmed.err"; then
    echo "check_values.py accepted a case list with a rule left out" >&2
    exit 1
fi
grep -q "has no failing values case" "$trimmed.err" || { cat "$trimmed.err" >&2; exit 1; }
rm -f "$trimmed.err"
echo "values.schema.json coverage check: a rule without a case is reported"
