use highlander::{highlander, Context, Service};

#[highlander(id = "sweeper")]
struct Sweeper {
    swept: u64,
}

impl Service for Sweeper {
    async fn run(&mut self, _ctx: &Context) -> highlander::Result<()> {
        self.swept += 1;
        Ok(())
    }
}

fn main() {}
