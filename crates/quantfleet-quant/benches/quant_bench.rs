//! Timing binary for quantfleet-quant (filled in with the format and algorithm benchmarks).
fn main() {}
