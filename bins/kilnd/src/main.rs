//! kiln daemon (stub).

fn main() {}
