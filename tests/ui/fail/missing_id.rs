#![allow(dead_code)]
use highlander::highlander;

#[highlander(restart = "permanent")]
#[derive(Default)]
struct Sweeper;

fn main() {}
