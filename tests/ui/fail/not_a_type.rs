#![allow(dead_code)]
use highlander::highlander;

#[highlander(id = "sweeper")]
fn sweeper() {}

fn main() {}
