//! Ids beyond the server's shared lock table: 40,000 ids on two nodes
//! against a default-configured Postgres (whose lock table holds only
//! 10,000 to 30,000 advisory locks in all), then a crash that moves all of
//! them. The server holds one advisory lock per node throughout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use highlander::backend::postgres::Postgres;
use highlander::{ChildSpec, Context, Runtime, RuntimeHandle, Service};
use highlander_tests::postgres::PgServer;
use highlander_tests::wait::{wait_all, wait_until};

const IDS: usize = 40_000;
const GUARD: Duration = Duration::from_secs(120);

struct Counted(Arc<AtomicUsize>);

impl Service for Counted {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        ctx.cancelled().await;
        Ok(())
    }
}

async fn start(url: &str, node: &str, starts: &Arc<AtomicUsize>) -> RuntimeHandle {
    let mut builder = Runtime::builder().node(node).backend(Postgres::new(url));
    for i in 0..IDS {
        let starts = starts.clone();
        builder = builder.child(ChildSpec::new(format!("big-{i}"), move |_ctx| {
            let starts = starts.clone();
            async move { Ok(Counted(starts)) }
        }));
    }
    builder.start().await.expect("runtime starts")
}

/// Waits, at each state change, until `handles` run `n` ids between them.
async fn wait_running(handles: &[&RuntimeHandle], n: usize) {
    wait_all(handles, &format!("{n} ids running"), GUARD, || {
        let running: usize = handles.iter().map(|h| h.status().running().count()).sum();
        assert!(running <= n, "{running} running, more than {n} ids");
        running == n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_thousand_ids_beyond_the_lock_table() {
    let pg = PgServer::start();
    let url = pg.url();
    let starts_a = Arc::new(AtomicUsize::new(0));
    let starts_b = Arc::new(AtomicUsize::new(0));
    let a = start(&url, "a", &starts_a).await;
    let b = start(&url, "b", &starts_b).await;
    wait_running(&[&a, &b], IDS).await;

    // The server holds one advisory lock per node, not one per id, and the
    // lock table is the default one.
    let locks = pg
        .sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        .await;
    assert_eq!(locks[0][0].as_deref(), Some("2"));
    let size = pg.sql("SHOW max_locks_per_transaction").await;
    assert_eq!(size[0][0].as_deref(), Some("64"));
    for node in ["a", "b"] {
        assert_eq!(pg.sessions_of(node).await, 1);
    }

    // Crash the node with more ids: every one of them moves to the other.
    let (crashed, survivor) = if a.status().running().count() >= b.status().running().count() {
        (a, b)
    } else {
        (b, a)
    };
    let moved = crashed.status().running().count();
    assert!(moved > 0);
    crashed.abort();
    drop(crashed);
    wait_running(&[&survivor], IDS).await;
    // Every id has started on the survivor exactly once: its own, and each
    // moved one after the crash.
    let survivor_starts = if survivor.node() == "a" {
        &starts_a
    } else {
        &starts_b
    };
    wait_until("every instance on the survivor running", GUARD, || {
        survivor_starts.load(Ordering::Relaxed) >= IDS
    })
    .await;
    assert_eq!(survivor_starts.load(Ordering::Relaxed), IDS);
    let held = pg
        .sql("SELECT count(*) FROM highlander_leases WHERE owner IS NOT NULL")
        .await;
    assert_eq!(held[0][0].as_deref(), Some(IDS.to_string().as_str()));
    survivor.shutdown().await;
    let held = pg
        .sql("SELECT count(*) FROM highlander_leases WHERE owner IS NOT NULL")
        .await;
    assert_eq!(held[0][0].as_deref(), Some("0"));
}
