#![allow(dead_code)]
use highlander::highlander;

// Each bad entry is an error at its own span: empty, a space, too long,
// a non-ASCII name, one named twice, one both preferred and avoided.
#[highlander(
    id = "sweeper",
    prefer = ["", "node a", "zone=eu", "zone=eu", "nœud"],
    avoid = ["node-b", "zone=eu", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"]
)]
#[derive(Default)]
struct Sweeper;

fn main() {}
