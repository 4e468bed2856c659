//! # A supervision tree as the singleton
//!
//! The singleton is a small pipeline of three child tasks started with
//! `ctx.spawn`: they live and die with the instance, one-for-all. Here the
//! `transform` stage fails on its first run; the whole instance is stopped
//! (every child cancelled and awaited, then `terminate` runs with the error),
//! and the supervisor starts a fresh instance, whose children all start again.
//! After a few seconds the demo shuts the node down: children stop, then
//! `terminate(NodeShutdown)`.
//!
//! ```text
//! cargo run --example 02_supervision_tree
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use highlander::{Context, Error, MemoryCluster, Runtime, Service, ShutdownReason, highlander};

/// How many instances have started, shared through the runtime's state.
#[derive(Default)]
struct Generations(AtomicU32);

#[highlander(id = "pipeline", shutdown = "3s")]
#[derive(Default)]
struct Pipeline;

impl Service for Pipeline {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        let generation = ctx.state::<Generations>()?.0.fetch_add(1, Ordering::SeqCst);
        println!("instance {generation}: starting children");
        for stage in ["fetch", "transform", "store"] {
            let child = ctx.clone();
            ctx.spawn(stage, async move {
                println!("  [{generation}] {stage}: up");
                if stage == "transform" && generation == 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    println!("  [{generation}] {stage}: hit a bad record");
                    return Err(Error::msg("bad record 42"));
                }
                child.cancelled().await;
                println!("  [{generation}] {stage}: flushed and down");
                Ok(())
            });
        }
        ctx.cancelled().await;
        Ok(())
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        println!("terminate: {reason}");
    }
}

#[tokio::main]
async fn main() -> Result<(), highlander::Error> {
    let node = Runtime::builder()
        .node("demo")
        .backend(MemoryCluster::new())
        .registered()
        .state(Generations::default())
        .start()
        .await?;
    node.wait_until(|s| {
        matches!(
            s.get("pipeline"),
            Some(highlander::SingletonState::Running { restarts: 1, .. })
        )
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("shutting the node down");
    node.shutdown().await;
    Ok(())
}
