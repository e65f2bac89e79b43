//! kiln CLI (stub).

fn main() {}
