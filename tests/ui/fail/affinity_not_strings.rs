#![allow(dead_code)]
use highlander::highlander;

#[highlander(id = "sweeper", prefer = ["node-a", 7, node_b])]
#[derive(Default)]
struct Sweeper;

#[highlander(id = "mailer", avoid = 3)]
#[derive(Default)]
struct Mailer;

#[highlander(id = "reporter", prefer = [], avoid = ["a"], avoid = ["b"])]
#[derive(Default)]
struct Reporter;

fn main() {}
