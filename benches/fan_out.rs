//! Placeholder until the fan-out benchmark lands.
fn main() {}
