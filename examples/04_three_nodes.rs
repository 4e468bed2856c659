//! # Three nodes, one instance: takeover, netsplit and heal
//!
//! The main demo. Three nodes (`a`, `b`, `c`) run in this one process on a
//! shared memory cluster, all configured with the same singleton,
//! `report-mailer`. It shows, as a readable timeline:
//!
//! 1. exactly one node runs it; the others wait;
//! 2. the holder crashes (its runtime is aborted: no `terminate`), and a
//!    waiting node takes over at once with a higher fencing token;
//! 3. a netsplit (`a` | `b c`): the side without the holder starts its own
//!    instance, as Erlang's `:global` does, so two run during the split;
//! 4. the split heals: the instance that has run longest survives (ties go
//!    to the lower node name) and the other is stopped with
//!    `ShutdownReason::Conflict`, its `terminate` running;
//! 5. a graceful shutdown of the holder hands the singleton over at once.
//!
//! ```text
//! cargo run --example 04_three_nodes
//! ```

use std::time::{Duration, Instant};

use highlander::{
    ChildSpec, Context, MemoryCluster, Runtime, RuntimeHandle, Service, ShutdownReason,
};

struct ReportMailer {
    node: String,
}

impl Service for ReportMailer {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.node = ctx.node().to_string();
        say(&format!(
            "  {} ▶ report-mailer started (fencing token {})",
            self.node,
            ctx.fencing_token()
        ));
        ctx.cancelled().await;
        Ok(())
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        say(&format!(
            "  {} ■ report-mailer terminate({reason})",
            self.node
        ));
    }
}

fn say(line: &str) {
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed();
    println!("{:>7.1} ms  {line}", t.as_secs_f64() * 1000.0);
}

async fn start(cluster: &MemoryCluster, name: &str) -> highlander::Result<RuntimeHandle> {
    Runtime::builder()
        .node(name)
        .backend(cluster.clone())
        .child(ChildSpec::new("report-mailer", |_ctx| async {
            Ok(ReportMailer {
                node: String::new(),
            })
        }))
        .start()
        .await
}

/// Who runs the singleton, as the nodes themselves report it.
fn holders(nodes: &[&RuntimeHandle]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n.status().is_running("report-mailer"))
        .map(|n| n.node().to_string())
        .collect()
}

/// Waits until exactly `count` of `nodes` run the singleton.
async fn settle(nodes: &[&RuntimeHandle], count: usize) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while holders(nodes).len() != count {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the demo settles within 10 s");
    tokio::time::sleep(Duration::from_millis(20)).await;
}

#[tokio::main]
async fn main() -> highlander::Result<()> {
    let cluster = MemoryCluster::new();
    say("1. three nodes start with the same singleton");
    let a = start(&cluster, "a").await?;
    a.wait_until(|s| s.is_running("report-mailer")).await;
    let b = start(&cluster, "b").await?;
    let c = start(&cluster, "c").await?;
    settle(&[&a, &b, &c], 1).await;
    say(&format!(
        "   running on {:?}; b and c wait",
        holders(&[&a, &b, &c])
    ));

    say("2. node a crashes (no terminate runs on a crash)");
    a.abort();
    settle(&[&b, &c], 1).await;
    say(&format!(
        "   taken over: running on {:?}",
        holders(&[&b, &c])
    ));
    let (holder, other) = if b.status().is_running("report-mailer") {
        (&b, &c)
    } else {
        (&c, &b)
    };

    say(&format!(
        "3. netsplit: {} | {}",
        holder.node(),
        other.node()
    ));
    cluster.partition(&[&[holder.node()], &[other.node()]]);
    settle(&[&b, &c], 2).await;
    say(&format!(
        "   each side runs its own instance: {:?}",
        holders(&[&b, &c])
    ));

    tokio::time::sleep(Duration::from_millis(50)).await;
    say("4. the split heals: the longest-running instance survives");
    cluster.heal();
    settle(&[&b, &c], 1).await;
    say(&format!("   one instance again: {:?}", holders(&[&b, &c])));

    say(&format!(
        "5. {} shuts down gracefully: handoff without waiting",
        holder.node()
    ));
    holder.shutdown().await;
    settle(&[other], 1).await;
    say(&format!("   running on {:?}", holders(&[other])));
    other.shutdown().await;
    say("done");
    Ok(())
}
