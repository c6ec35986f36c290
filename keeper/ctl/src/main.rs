//! keeperctl: the operator's CLI for the keeper (being built).

fn main() {}
