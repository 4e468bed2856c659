#![allow(dead_code)]
use highlander::highlander;

#[highlander(id = sweeper)]
#[derive(Default)]
struct Sweeper;

fn main() {}
