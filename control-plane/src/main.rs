//! The `pylon-control` command.

fn main() {}
