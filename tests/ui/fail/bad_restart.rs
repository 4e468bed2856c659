#![allow(dead_code)]
use highlander::highlander;

#[highlander(id = "sweeper", restart = "always")]
#[derive(Default)]
struct Sweeper;

fn main() {}
