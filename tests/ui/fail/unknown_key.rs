#![allow(dead_code)]
use highlander::highlander;

#[highlander(id = "sweeper", restarts = "transient")]
#[derive(Default)]
struct Sweeper;

fn main() {}
