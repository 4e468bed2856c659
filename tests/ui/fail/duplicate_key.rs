#![allow(dead_code)]
use highlander::highlander;

#[highlander(id = "sweeper", shutdown = "1s", shutdown = "2s")]
#[derive(Default)]
struct Sweeper;

fn main() {}
