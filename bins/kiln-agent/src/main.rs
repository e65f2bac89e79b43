//! kiln guest agent (stub).

fn main() {}
