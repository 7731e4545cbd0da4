//! Quantfleet's public API: the `QuantizedModel` and `PrecisionPolicy` custom resources, the shared
//! vocabulary (precisions, KV-cache dtypes, task classes, conditions) and the pure fit planner.
