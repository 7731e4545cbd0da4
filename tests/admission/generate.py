#!/usr/bin/env python3
"""Generates the admission cases tests/admission/{qm,pp}-*.yaml from the compact table below.

Each CEL rule (and a few schema limits) of the CRDs gets an accepted and a rejected case. The cases are read by
two runners: the Rust unit test in crates/quantfleet-api (client-side CEL evaluation) and the control-plane
suite (a real kube-apiserver). Files are JSON, which is YAML; one case per file.

Usage: generate.py          write the files
       generate.py --check  fail if the committed files differ from what this script generates
"""
import copy
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE
PREFIXES = ("qm-", "pp-")  # files this script owns

# Minimal valid objects (not the samples: small, so each case shows only what it changes).
MODEL = {
    "apiVersion": "quantfleet.io/v1alpha1",
    "kind": "QuantizedModel",
    "metadata": {"name": "m"},
    "spec": {
        "source": {"uri": "file:///models/m.gguf"},
        "architecture": {
            "numLayers": 30, "hiddenSize": 576, "intermediateSize": 1536, "numAttentionHeads": 9,
            "numKeyValueHeads": 3, "headDim": 64, "vocabSize": 49152, "tiedEmbeddings": True,
            "maxPositionEmbeddings": 8192,
        },
        "accelerator": {"product": "NVIDIA-L4"},
        "tiers": [{"name": "bf16", "weights": {"format": "bf16"}}],
    },
}
POLICY = {
    "apiVersion": "quantfleet.io/v1alpha1",
    "kind": "PrecisionPolicy",
    "metadata": {"name": "p"},
    "spec": {
        "modelRef": {"name": "m"},
        "routes": [{"taskClass": "code", "tier": "fp8", "fallbacks": ["bf16"]}],
        "defaultTier": "bf16",
    },
}

DELETE = object()  # marks a key to remove in a patch


def merge(base, patch):
    """JSON merge patch, except that DELETE removes a key (lists are replaced whole)."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tier(**fields):
    t = {"name": "t", "weights": {"format": "int4"}}
    t.update(fields)
    return t


def model_with_tier(**fields):
    return {"spec": {"tiers": [tier(**fields)]}}


def canary(**fields):
    c = {"candidateTier": "int4", "taskClasses": ["code"]}
    c.update(fields)
    return {"spec": {"canary": c}}


# (file stem, description, base, patch, expect, messageContains, update patch or None, checkedBy)
# checkedBy: "cel" (an x-kubernetes-validations rule) or "schema" (OpenAPI limits the API server checks
# before CEL; the client-side CEL runner skips these).
CASES = [
    # --- QuantizedModel --------------------------------------------------------------------------------
    ("qm-minimal-valid", "the minimal model is accepted", MODEL, {}, "accept", None, None, "cel"),
    ("qm-name-length-valid", "model and tier name of 62 characters together are accepted", MODEL,
     {"metadata": {"name": "m" * 40}, "spec": {"tiers": [{"name": "t" * 22, "weights": {"format": "bf16"}}]}},
     "accept", None, None, "cel"),
    ("qm-name-length-invalid", "model and tier names longer than a Service name allows are rejected", MODEL,
     {"metadata": {"name": "m" * 40}, "spec": {"tiers": [{"name": "t" * 23, "weights": {"format": "bf16"}}]}},
     "reject", "at most 62 characters", None, "cel"),
    ("qm-context-valid", "maxContextTokens up to maxPositionEmbeddings is accepted", MODEL,
     {"spec": {"serving": {"maxContextTokens": 8192}}}, "accept", None, None, "cel"),
    ("qm-context-invalid", "maxContextTokens beyond maxPositionEmbeddings is rejected", MODEL,
     {"spec": {"serving": {"maxContextTokens": 8193}}}, "reject", "exceeds architecture.maxPositionEmbeddings",
     None, "cel"),
    ("qm-override-layer-valid", "an override of the last layer index is accepted", MODEL,
     model_with_tier(layerOverrides=[{"layers": [0, 29], "weights": {"format": "bf16"}}]), "accept", None, None,
     "cel"),
    ("qm-override-layer-invalid", "an override of a layer past the last is rejected", MODEL,
     model_with_tier(layerOverrides=[{"layers": [30], "weights": {"format": "bf16"}}]), "reject",
     "names a layer the model does not have", None, "cel"),
    ("qm-override-first-layers-invalid", "firstLayers beyond numLayers is rejected", MODEL,
     model_with_tier(layerOverrides=[{"firstLayers": 31, "weights": {"format": "bf16"}}]), "reject",
     "names a layer the model does not have", None, "cel"),
    ("qm-architecture-update-valid", "changing tiers of an existing model is accepted", MODEL, {}, "accept",
     None, {"spec": {"tiers": [{"name": "fp8", "weights": {"format": "fp8-e4m3"}}]}}, "cel"),
    ("qm-architecture-update-invalid", "changing the architecture of an existing model is rejected", MODEL, {},
     "reject", "architecture is immutable", {"spec": {"architecture": {"numLayers": 32}}}, "cel"),
    ("qm-tier-names-valid", "distinct tier names are accepted", MODEL,
     {"spec": {"tiers": [{"name": "a", "weights": {"format": "bf16"}}, {"name": "b", "weights": {"format": "int8"}}]}},
     "accept", None, None, "cel"),
    ("qm-tier-names-invalid", "duplicate tier names are rejected", MODEL,
     {"spec": {"tiers": [{"name": "a", "weights": {"format": "bf16"}}, {"name": "a", "weights": {"format": "int8"}}]}},
     "reject", "tier names must be unique", None, "cel"),
    ("qm-uri-scheme-valid", "a pvc:// source is accepted", MODEL,
     {"spec": {"source": {"uri": "pvc://models/smollm2/model.gguf"}}}, "accept", None, None, "cel"),
    ("qm-uri-scheme-invalid", "an unsupported URI scheme is rejected", MODEL,
     {"spec": {"source": {"uri": "s3://bucket/model.gguf"}}}, "reject", "source.uri must start with", None, "cel"),
    ("qm-http-sha-valid", "an https source with sha256 is accepted", MODEL,
     {"spec": {"source": {"uri": "https://example.com/m.gguf", "sha256": "a" * 64}}}, "accept", None, None, "cel"),
    ("qm-http-sha-invalid", "an https source without sha256 is rejected", MODEL,
     {"spec": {"source": {"uri": "https://example.com/m.gguf"}}}, "reject", "need source.sha256", None, "cel"),
    ("qm-pvc-form-invalid", "a pvc:// URI without a path is rejected", MODEL,
     {"spec": {"source": {"uri": "pvc://models"}}}, "reject", "pvc:// URIs look like", None, "cel"),
    ("qm-sha-pattern-invalid", "a sha256 that is not 64 lower-case hex digits is rejected", MODEL,
     {"spec": {"source": {"uri": "file:///m.gguf", "sha256": "ABC"}}}, "reject", "sha256", None, "schema"),
    ("qm-gqa-valid", "9 query heads over 3 KV heads are accepted", MODEL, {}, "accept", None, None, "cel"),
    ("qm-gqa-invalid", "query heads that are not a multiple of KV heads are rejected", MODEL,
     {"spec": {"architecture": {"numKeyValueHeads": 4}}}, "reject", "multiple of numKeyValueHeads", None, "cel"),
    ("qm-w8a8-valid", "int8 activations with int8 smoothquant weights are accepted", MODEL,
     model_with_tier(weights={"format": "int8", "method": "smoothquant"}, activations="int8"), "accept", None,
     None, "cel"),
    ("qm-w8a8-invalid", "fp8 activations with int4 weights are rejected", MODEL,
     model_with_tier(activations="fp8-e4m3"), "reject", "8-bit activations (W8A8) need 8-bit weights", None, "cel"),
    ("qm-w4a8-valid", "int8 activations with int4 weights (W4A8) are accepted", MODEL,
     model_with_tier(weights={"format": "int4", "groupSize": 32, "symmetric": True}, activations="int8"), "accept",
     None, None, "cel"),
    ("qm-int8-activations-invalid", "int8 activations with bf16 weights are rejected", MODEL,
     model_with_tier(weights={"format": "bf16"}, activations="int8"), "reject",
     "int8 activations need int8 (W8A8) or int4 (W4A8) weights", None, "cel"),
    ("qm-smoothquant-activations-invalid", "smoothquant with bf16 activations is rejected", MODEL,
     model_with_tier(weights={"format": "fp8-e4m3", "method": "smoothquant"}), "reject",
     "smoothquant is for W8A8", None, "cel"),
    ("qm-group-size-valid", "int4 with groupSize 64 is accepted", MODEL,
     model_with_tier(weights={"format": "int4", "groupSize": 64}), "accept", None, None, "cel"),
    ("qm-group-size-invalid", "groupSize 100 is rejected", MODEL,
     model_with_tier(weights={"format": "int4", "groupSize": 100}), "reject", "one of 32, 64, 128, 256", None, "cel"),
    ("qm-fp4-block-valid", "nvfp4 without groupSize is accepted", MODEL,
     model_with_tier(weights={"format": "nvfp4"}), "accept", None, None, "cel"),
    ("qm-fp4-block-invalid", "mxfp4 with a groupSize is rejected", MODEL,
     model_with_tier(weights={"format": "mxfp4", "groupSize": 64}), "reject", "fixed block scales", None, "cel"),
    ("qm-unquantized-params-invalid", "bf16 weights with a groupSize are rejected", MODEL,
     model_with_tier(weights={"format": "bf16", "groupSize": 128}), "reject", "are not quantized", None, "cel"),
    ("qm-group-scaling-valid", "groupSize with per-group scaling is accepted", MODEL,
     model_with_tier(weights={"format": "int8", "scaling": "per-group", "groupSize": 128}), "accept", None, None,
     "cel"),
    ("qm-group-scaling-invalid", "groupSize with per-channel scaling is rejected", MODEL,
     model_with_tier(weights={"format": "int8", "scaling": "per-channel", "groupSize": 128}), "reject",
     "applies only to per-group scaling", None, "cel"),
    ("qm-int4-scaling-valid", "int4 per-channel scaling is accepted", MODEL,
     model_with_tier(weights={"format": "int4", "scaling": "per-channel"}), "accept", None, None, "cel"),
    ("qm-int4-scaling-invalid", "int4 per-tensor scaling is rejected", MODEL,
     model_with_tier(weights={"format": "int4", "scaling": "per-tensor"}), "reject",
     "int4 weights need per-group or per-channel", None, "cel"),
    ("qm-awq-valid", "awq on int4 is accepted", MODEL,
     model_with_tier(weights={"format": "int4", "method": "awq"}), "accept", None, None, "cel"),
    ("qm-awq-invalid", "awq on fp8 is rejected", MODEL,
     model_with_tier(weights={"format": "fp8-e4m3", "method": "awq"}), "reject", "awq is for int4", None, "cel"),
    ("qm-gptq-valid", "gptq on int8 is accepted", MODEL,
     model_with_tier(weights={"format": "int8", "method": "gptq"}), "accept", None, None, "cel"),
    ("qm-gptq-fp8-valid", "gptq on fp8-e4m3 is accepted", MODEL,
     model_with_tier(weights={"format": "fp8-e4m3", "method": "gptq"}), "accept", None, None, "cel"),
    ("qm-gptq-invalid", "gptq on nvfp4 is rejected", MODEL,
     model_with_tier(weights={"format": "nvfp4", "method": "gptq"}), "reject", "gptq is for int4, int8 or fp8-e4m3",
     None, "cel"),
    ("qm-smoothquant-weights-invalid", "smoothquant on int4 weights is rejected", MODEL,
     model_with_tier(weights={"format": "int4", "method": "smoothquant"}, activations="bf16"), "reject",
     "smoothquant is for int8 or fp8-e4m3 weights", None, "cel"),
    ("qm-symmetric-valid", "symmetric int4 is accepted", MODEL,
     model_with_tier(weights={"format": "int4", "symmetric": True}), "accept", None, None, "cel"),
    ("qm-symmetric-invalid", "symmetric on fp8 is rejected", MODEL,
     model_with_tier(weights={"format": "fp8-e4m3", "symmetric": True}), "reject",
     "symmetric applies to integer formats", None, "cel"),
    ("qm-kivi-valid", "a KIVI int4 KV cache with sink and residual tokens is accepted", MODEL,
     model_with_tier(kvCache={"dtype": "int4", "scheme": "kivi", "sinkTokens": 4, "residualTokens": 128}),
     "accept", None, None, "cel"),
    ("qm-kivi-invalid", "the KIVI scheme with an fp8 KV cache is rejected", MODEL,
     model_with_tier(kvCache={"dtype": "fp8-e4m3", "scheme": "kivi"}), "reject", "kivi is for int4", None, "cel"),
    ("qm-residual-invalid", "residualTokens with an fp16 KV cache is rejected", MODEL,
     model_with_tier(kvCache={"dtype": "fp16", "residualTokens": 64}), "reject",
     "they need scheme kivi", None, "cel"),
    ("qm-window-per-token-invalid", "sinkTokens with a per-token int8 KV cache is rejected", MODEL,
     model_with_tier(kvCache={"dtype": "int8", "sinkTokens": 4}), "reject",
     "the per-token caches have no full-precision window", None, "cel"),
    ("qm-kivi-residual-invalid", "a KIVI cache with fewer than 32 residual tokens is rejected", MODEL,
     model_with_tier(kvCache={"dtype": "int4", "scheme": "kivi", "residualTokens": 16}), "reject",
     "needs residualTokens >= 32", None, "cel"),
    ("qm-int4-per-token-valid", "a per-token int4 KV cache is accepted", MODEL,
     model_with_tier(kvCache={"dtype": "int4"}), "accept", None, None, "cel"),
    ("qm-override-select-valid", "an override selecting lmHead is accepted", MODEL,
     model_with_tier(layerOverrides=[{"lmHead": True, "weights": {"format": "bf16"}}]), "accept", None, None,
     "cel"),
    ("qm-override-select-invalid", "an override that selects nothing is rejected", MODEL,
     model_with_tier(layerOverrides=[{"embeddings": False, "weights": {"format": "bf16"}}]), "reject",
     "must select something", None, "cel"),
    ("qm-calibration-valid", "calibration from a ConfigMap is accepted", MODEL,
     model_with_tier(weights={"format": "int4", "method": "gptq"}, calibration={"dataset": "configmap/calib"}),
     "accept", None, None, "cel"),
    ("qm-calibration-invalid", "an unknown calibration dataset is rejected", MODEL,
     model_with_tier(weights={"format": "int4", "method": "gptq"}, calibration={"dataset": "wikitext"}), "reject",
     "calibration.dataset is 'builtin' or 'configmap/NAME'", None, "cel"),
    ("qm-accelerator-extension-valid", "an unlisted accelerator with memory and computeCapability is accepted",
     MODEL, {"spec": {"accelerator": {"product": "ACME-X1", "memory": "48Gi", "computeCapability": "8.9"}}},
     "accept", None, None, "cel"),
    ("qm-accelerator-extension-invalid", "memory without computeCapability is rejected", MODEL,
     {"spec": {"accelerator": {"product": "ACME-X1", "memory": "48Gi"}}}, "reject", "give both or neither", None,
     "cel"),
    ("qm-tier-name-pattern-invalid", "a tier name that is not a DNS label is rejected", MODEL,
     {"spec": {"tiers": [{"name": "Int4_AWQ", "weights": {"format": "int4"}}]}}, "reject", "name", None, "schema"),
    ("qm-unknown-format-invalid", "an unknown weight format is rejected", MODEL,
     model_with_tier(weights={"format": "fp4"}), "reject", "Unsupported value", None, "schema"),
    # --- PrecisionPolicy -------------------------------------------------------------------------------
    ("pp-minimal-valid", "the minimal policy is accepted", POLICY, {}, "accept", None, None, "cel"),
    ("pp-candidate-valid", "a candidate differing from the incumbent of its classes is accepted", POLICY,
     canary(), "accept", None, None, "cel"),
    ("pp-candidate-invalid", "a candidate that already serves an in-scope class is rejected", POLICY,
     canary(candidateTier="fp8"), "reject", "already serves an in-scope task class", None, "cel"),
    ("pp-candidate-default-invalid", "a candidate equal to the default tier of an unrouted class is rejected",
     POLICY, canary(candidateTier="bf16", taskClasses=["math"]), "reject", "already serves an in-scope task class",
     None, "cel"),
    ("pp-model-ref-update-valid", "changing routes of an existing policy is accepted", POLICY, {}, "accept", None,
     {"spec": {"defaultTier": "fp8"}}, "cel"),
    ("pp-model-ref-update-invalid", "changing modelRef of an existing policy is rejected", POLICY, {}, "reject",
     "modelRef is immutable", {"spec": {"modelRef": {"name": "other"}}}, "cel"),
    ("pp-routes-unique-valid", "one route per class is accepted", POLICY,
     {"spec": {"routes": [{"taskClass": "code", "tier": "fp8"}, {"taskClass": "chat", "tier": "int4"}]}}, "accept",
     None, None, "cel"),
    ("pp-routes-unique-invalid", "two routes for one class are rejected", POLICY,
     {"spec": {"routes": [{"taskClass": "code", "tier": "fp8"}, {"taskClass": "code", "tier": "int4"}]}}, "reject",
     "only one route", None, "cel"),
    ("pp-rule-threshold-valid", "a prompt-tokens-over rule with its threshold is accepted", POLICY,
     {"spec": {"classifier": {"rules": [{"when": "prompt-tokens-over", "taskClass": "long-context",
                                         "promptTokensOver": 4096}]}}}, "accept", None, None, "cel"),
    ("pp-rule-threshold-invalid", "a prompt-tokens-over rule without threshold is rejected", POLICY,
     {"spec": {"classifier": {"rules": [{"when": "prompt-tokens-over", "taskClass": "long-context"}]}}}, "reject",
     "needs promptTokensOver", None, "cel"),
    ("pp-rule-keywords-valid", "a keywords rule with keywords is accepted", POLICY,
     {"spec": {"classifier": {"rules": [{"when": "keywords", "taskClass": "math", "keywords": ["integral"]}]}}},
     "accept", None, None, "cel"),
    ("pp-rule-keywords-invalid", "a keywords rule without keywords is rejected", POLICY,
     {"spec": {"classifier": {"rules": [{"when": "keywords", "taskClass": "math", "keywords": []}]}}}, "reject",
     "needs at least one keyword", None, "cel"),
    ("pp-fallback-self-invalid", "a route falling back to its own tier is rejected", POLICY,
     {"spec": {"routes": [{"taskClass": "code", "tier": "fp8", "fallbacks": ["fp8"]}]}}, "reject",
     "must not repeat its own tier", None, "cel"),
    ("pp-fallback-distinct-valid", "distinct fallbacks are accepted", POLICY,
     {"spec": {"routes": [{"taskClass": "code", "tier": "fp8", "fallbacks": ["bf16", "int8"]}]}}, "accept", None,
     None, "cel"),
    ("pp-fallback-distinct-invalid", "repeated fallbacks are rejected", POLICY,
     {"spec": {"routes": [{"taskClass": "code", "tier": "fp8", "fallbacks": ["bf16", "bf16"]}]}}, "reject",
     "fallbacks must be distinct", None, "cel"),
    ("pp-classes-distinct-invalid", "a canary listing a class twice is rejected", POLICY,
     canary(taskClasses=["code", "code"]), "reject", "taskClasses must be distinct", None, "cel"),
    ("pp-steps-valid", "increasing steps are accepted", POLICY,
     canary(steps=[{"livePercent": 10}, {"livePercent": 50}]), "accept", None, None, "cel"),
    ("pp-steps-invalid", "decreasing steps are rejected", POLICY,
     canary(steps=[{"livePercent": 50}, {"livePercent": 10}]), "reject", "strictly increasing", None, "cel"),
    ("pp-steps-repeated-invalid", "repeated steps are rejected", POLICY,
     canary(steps=[{"livePercent": 10}, {"livePercent": 10}]), "reject", "strictly increasing", None, "cel"),
    ("pp-gate-class-valid", "a gate for an in-scope class and a default gate are accepted", POLICY,
     canary(gates=[{"taskClass": "code", "maxMeanKlDivergence": 0.05}, {"minTop1Agreement": 0.9}]), "accept", None,
     None, "cel"),
    ("pp-gate-class-invalid", "a gate for a class outside the canary is rejected", POLICY,
     canary(gates=[{"taskClass": "math", "maxMeanKlDivergence": 0.05}]), "reject",
     "must be one of canary.taskClasses", None, "cel"),
    ("pp-gate-unique-invalid", "two gates for one class are rejected", POLICY,
     canary(gates=[{"taskClass": "code", "maxMeanKlDivergence": 0.05},
                   {"taskClass": "code", "minTop1Agreement": 0.9}]), "reject", "at most one gate per taskClass",
     None, "cel"),
    ("pp-gate-default-unique-invalid", "two default gates are rejected", POLICY,
     canary(gates=[{"maxMeanKlDivergence": 0.05}, {"minTop1Agreement": 0.9}]), "reject",
     "at most one gate per taskClass", None, "cel"),
    ("pp-gate-threshold-invalid", "a gate without any threshold is rejected", POLICY,
     canary(gates=[{"taskClass": "code", "minSamples": 10}]), "reject", "at least one threshold", None, "cel"),
    ("pp-shadow-percent-invalid", "a shadow percent over 100 is rejected", POLICY, canary(shadowPercent=150),
     "reject", "shadowPercent", None, "schema"),
    ("pp-step-percent-invalid", "a live step of 0 percent is rejected", POLICY,
     canary(steps=[{"livePercent": 0}]), "reject", "livePercent", None, "schema"),
]


def render():
    files = {}
    for stem, description, base, patch, expect, message, update, checked_by in CASES:
        case = {"description": description, "expect": expect, "checkedBy": checked_by}
        if message is not None:
            case["messageContains"] = message
        case["object"] = merge(base, patch)
        if update is not None:
            case["updateTo"] = merge(case["object"], update)
        assert (expect == "reject") == (message is not None), stem
        assert stem not in files, f"duplicate case {stem}"
        files[stem + ".yaml"] = json.dumps(case, indent=2, sort_keys=False) + "\n"
    return files


def main():
    files = render()
    if "--check" in sys.argv[1:]:
        present = {p.name for p in OUT.glob("*.yaml") if p.name.startswith(PREFIXES)}
        stale = [n for n, body in files.items() if not (OUT / n).exists() or (OUT / n).read_text() != body]
        extra = sorted(present - set(files))
        if stale or extra:
            sys.exit(f"tests/admission is out of date (differs: {stale}, extra: {extra}); "
                     "run tests/admission/generate.py")
        print(f"admission cases up to date: {len(files)} files")
        return
    for old in OUT.glob("*.yaml"):
        if old.name.startswith(PREFIXES) and old.name not in files:
            old.unlink()
    for name, body in files.items():
        (OUT / name).write_text(body)
    print(f"wrote {len(files)} cases to {OUT}")


if __name__ == "__main__":
    main()
