//! rtrs: the operator CLI.
fn main() {}
