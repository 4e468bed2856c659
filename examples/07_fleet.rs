//! # A fleet of tenants: ids added at run time and placed, a node drained
//! # for maintenance, an id transferred, an id removed
//!
//! Three nodes in one process share one sync per tenant. The tenants are
//! added while the nodes run (`RuntimeHandle::add`) and spread over the
//! nodes by placement (each node announces the ids it runs; the members
//! rank each id the same way, and a tenant claimed first by the "wrong"
//! node is handed to its place). Node `a` is then drained: each of its
//! tenants stops there with `moved` and starts on `b` or `c`, while `a`
//! stays up holding nothing; when it resumes, its tenants come back to it.
//! One tenant is transferred by hand (`RuntimeHandle::transfer`), and one
//! is removed everywhere, from its holder last: it stops once, with
//! `removed`, and runs nowhere.
//!
//! ```text
//! cargo run --example 07_fleet
//! ```

use highlander::{
    ChildSpec, Context, MemoryCluster, Runtime, RuntimeHandle, Service, ShutdownReason,
};

struct TenantSync {
    tenant: String,
    node: String,
}

impl Service for TenantSync {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.node = ctx.node().to_string();
        ctx.cancelled().await;
        Ok(())
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        if reason != ShutdownReason::NodeShutdown {
            println!("{:>6}: {} stops ({reason})", self.node, self.tenant);
        }
    }
}

fn sync(tenant: &str) -> ChildSpec {
    let tenant = tenant.to_string();
    ChildSpec::new(format!("tenant-sync/{tenant}"), move |_ctx| {
        let tenant = tenant.clone();
        async move {
            Ok(TenantSync {
                tenant,
                node: String::new(),
            })
        }
    })
}

const TENANTS: &[&str] = &[
    "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka",
];

fn counts(nodes: &[&RuntimeHandle]) -> String {
    nodes
        .iter()
        .map(|n| format!("{} runs {}", n.node(), n.status().running().count()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits until every tenant runs on one of `nodes`.
async fn all_running(nodes: &[&RuntimeHandle], n: usize) {
    loop {
        let changes: Vec<_> = nodes.iter().map(|h| h.changed()).collect();
        let running: usize = nodes.iter().map(|h| h.status().running().count()).sum();
        if running == n {
            return;
        }
        let mut any = tokio::task::JoinSet::new();
        for change in changes {
            any.spawn(change);
        }
        any.join_next().await;
    }
}

/// Waits until the tenants stop moving: the counts stay the same for half
/// a second (rebalancing begins once the members have been still for
/// 300 ms).
async fn at_rest(nodes: &[&RuntimeHandle], n: usize) {
    loop {
        all_running(nodes, n).await;
        let before = counts(nodes);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if counts(nodes) == before {
            return;
        }
    }
}

#[tokio::main]
async fn main() -> highlander::Result<()> {
    let cluster = MemoryCluster::new();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(
            Runtime::builder()
                .node(name)
                .backend(cluster.clone())
                // Hand ids to where placement puts them when members change.
                .rebalance(true)
                .start()
                .await?,
        );
    }
    let [a, b, c] = [&nodes[0], &nodes[1], &nodes[2]];

    println!(
        "1. {} tenants added on every node while they run",
        TENANTS.len()
    );
    for tenant in TENANTS {
        for node in [a, b, c] {
            node.add(sync(tenant))?;
        }
    }
    at_rest(&[a, b, c], TENANTS.len()).await;
    println!("   {}", counts(&[a, b, c]));

    println!("2. a drains for maintenance: its tenants move, a stays up");
    a.drain().await?;
    all_running(&[b, c], TENANTS.len()).await;
    println!(
        "   {} (a draining: {})",
        counts(&[a, b, c]),
        a.status().draining
    );

    println!("3. a resumes: the others hand its tenants back");
    a.resume();
    at_rest(&[a, b, c], TENANTS.len()).await;
    println!("   {}", counts(&[a, b, c]));

    let acme = "tenant-sync/acme";
    let from = [a, b, c]
        .into_iter()
        .find(|n| n.status().is_running(acme))
        .expect("acme runs");
    let to = [a, b, c]
        .into_iter()
        .find(|n| n.node() != from.node())
        .expect("another node");
    println!(
        "4. acme is transferred from {} to {}",
        from.node(),
        to.node()
    );
    from.transfer(acme, to.node())?;
    to.wait_until(|s| s.is_running(acme)).await;

    println!("5. wonka is removed everywhere, from its holder last");
    // Removed from the holder first, it would start on a standby before
    // being removed there too: the waiting nodes first, then the holder.
    let mut order = [a, b, c];
    order.sort_by_key(|n| n.status().is_running("tenant-sync/wonka"));
    for node in order {
        node.remove("tenant-sync/wonka").await?;
    }
    all_running(&[a, b, c], TENANTS.len() - 1).await;
    let left = cluster.holders("tenant-sync/wonka").len();
    println!("   wonka runs on {left} nodes; {}", counts(&[a, b, c]));

    for node in [a, b, c] {
        node.shutdown().await;
    }
    println!("done");
    Ok(())
}
