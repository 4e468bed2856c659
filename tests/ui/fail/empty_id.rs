#![allow(dead_code)]
use highlander::highlander;

#[highlander(id = "")]
#[derive(Default)]
struct Sweeper;

fn main() {}
