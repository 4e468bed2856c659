//! # Singletons whose ids are known only at run time
//!
//! One billing sync per tenant, where the tenant list comes from
//! configuration (here, a constant). Two nodes in one process share the
//! tenants between them: each tenant's sync runs on exactly one node. When
//! node `a` shuts down, its tenants move to `b` at once.
//!
//! ```text
//! cargo run --example 03_runtime_ids
//! ```

use highlander::{Context, MemoryCluster, Runtime, Service};

struct BillingSync {
    tenant: String,
}

impl Service for BillingSync {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        println!(
            "{:>8}: billing sync for {} (token {})",
            ctx.node(),
            self.tenant,
            ctx.fencing_token()
        );
        ctx.cancelled().await;
        Ok(())
    }
}

const TENANTS: &[&str] = &["acme", "globex", "initech", "umbrella", "hooli"];

async fn start(
    cluster: &MemoryCluster,
    node: &str,
) -> highlander::Result<highlander::RuntimeHandle> {
    let mut builder = Runtime::builder().node(node).backend(cluster.clone());
    for tenant in TENANTS {
        let name = tenant.to_string();
        builder = builder.singleton(format!("billing-sync/{tenant}"), move |_ctx| {
            let tenant = name.clone();
            async move { Ok(BillingSync { tenant }) }
        });
    }
    builder.start().await
}

#[tokio::main]
async fn main() -> highlander::Result<()> {
    let cluster = MemoryCluster::new();
    let a = start(&cluster, "a").await?;
    let b = start(&cluster, "b").await?;
    a.wait_until(|s| {
        s.singletons
            .iter()
            .all(|x| x.state != highlander::SingletonState::Claiming)
    })
    .await;
    b.wait_until(|s| {
        s.singletons
            .iter()
            .all(|x| x.state != highlander::SingletonState::Claiming)
    })
    .await;
    println!(
        "a runs {}, b runs {}",
        a.status().running().count(),
        b.status().running().count()
    );
    println!("-- a shuts down --");
    a.shutdown().await;
    b.wait_until(|s| s.running().count() == TENANTS.len()).await;
    println!("b now runs all {} tenants", TENANTS.len());
    b.shutdown().await;
    Ok(())
}
