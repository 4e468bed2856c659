#![allow(dead_code)]
use highlander::highlander;

#[highlander(id = "sweeper", shutdown = "5 seconds")]
#[derive(Default)]
struct Sweeper;

fn main() {}
