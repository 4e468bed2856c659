#![allow(dead_code)]
use highlander::highlander;

#[highlander(id = "a b", restart = "never", shutdown = "soon", colour = "red")]
#[derive(Default)]
struct Sweeper;

fn main() {}
