//! rtrs-perf: benchmarks.
fn main() {}
