//! `prefer` and `avoid` take a list of node names or labels (or one
//! string), and the spec carries them.
use highlander::{highlander, Context, Service, Singleton};

#[highlander(id = "sweeper", prefer = ["node-a", "zone=eu"], avoid = ["node-z", "spot"])]
#[derive(Default)]
struct Sweeper;

impl Service for Sweeper {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        ctx.cancelled().await;
        Ok(())
    }
}

#[highlander(id = "mailer", avoid = "zone=us")]
#[derive(Default)]
struct Mailer;

impl Service for Mailer {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        ctx.cancelled().await;
        Ok(())
    }
}

fn main() {
    let spec = Sweeper::child_spec();
    assert_eq!(spec.affinity().preferred(), ["node-a", "zone=eu"]);
    assert_eq!(spec.affinity().avoided(), ["node-z", "spot"]);
    let spec = Mailer::child_spec();
    assert!(spec.affinity().preferred().is_empty());
    assert_eq!(spec.affinity().avoided(), ["zone=us"]);
}
