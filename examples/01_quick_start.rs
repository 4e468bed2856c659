//! # Quick start: one singleton, no external service
//!
//! The smallest highlander program: one service marked with
//! `#[highlander(id = ...)]`, and `highlander::run()` in `main`. With no
//! `HIGHLANDER_BACKEND` set it uses the in-process memory backend, so this
//! runs anywhere; point `HIGHLANDER_BACKEND` at `postgres://…`, `etcd://…`
//! or `cluster://…` and the same binary, started on several machines, runs
//! the sweeper on exactly one of them.
//!
//! ```text
//! cargo run --example 01_quick_start      # Ctrl-C to stop: terminate runs
//! ```

use std::time::Duration;

use highlander::{Context, Service, ShutdownReason, highlander};

#[highlander(id = "invoice-sweeper", shutdown = "2s")]
#[derive(Default)]
struct InvoiceSweeper {
    swept: u64,
}

impl Service for InvoiceSweeper {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        tracing::info!(
            node = ctx.node(),
            token = ctx.fencing_token(),
            "sweeper running here"
        );
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = ctx.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    self.swept += 1;
                    tracing::info!(swept = self.swept, "swept overdue invoices");
                }
            }
        }
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        tracing::info!(%reason, swept = self.swept, "sweeper stopping");
    }
}

#[tokio::main]
async fn main() -> Result<(), highlander::Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    highlander::run().await
}
