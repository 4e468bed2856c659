#![allow(dead_code)]
use highlander::highlander;

#[highlander(id = "invoice sweeper!")]
#[derive(Default)]
struct Sweeper;

fn main() {}
