#![allow(dead_code)]
use highlander::highlander;

#[highlander(id = "sweeper", shutdown = "5")]
#[derive(Default)]
struct Sweeper;

fn main() {}
