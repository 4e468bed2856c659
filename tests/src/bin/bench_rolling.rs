//! Benchmark of a rolling restart on every backend: 1,000 ids (or `--ids N`)
//! on 3 processes of the `node` binary; each node in turn gets SIGTERM, is
//! waited for and started again. Prints per step how long the moved ids were
//! unowned (from the old instance's `STOP` to the new `START`, p50/p99/max),
//! how many moved, and how long until every id ran again. Asserts nothing;
//! the `rolling` test checks the behaviour.
//!
//! ```text
//! cargo build --release -p highlander-tests --bin node --bin bench_rolling
//! target/release/bench_rolling                  # every backend, 1,000 ids
//! target/release/bench_rolling --ids 10000 --only cluster
//! ```

use std::time::Duration;

use highlander_tests::bench::sibling_bin;
use highlander_tests::cluster::direct_nodes;
use highlander_tests::etcd::EtcdCluster;
use highlander_tests::postgres::PgServer;
use highlander_tests::process::Fleet;
use highlander_tests::rolling::{NodeSpec, print, rolling_restart};

const GUARD: Duration = Duration::from_secs(300);
const NAMES: [&str; 3] = ["r1", "r2", "r3"];

#[tokio::main]
async fn main() {
    let mut ids = 1_000usize;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--ids" => ids = args.next().and_then(|v| v.parse().ok()).expect("--ids N"),
            "--only" => only = args.next(),
            other => {
                panic!("unknown argument `{other}`: use --ids N, --only postgres|etcd|cluster")
            }
        }
    }
    let node = sibling_bin("node");
    let count = ids.to_string();
    let env = [
        ("HL_ID_COUNT", count.as_str()),
        ("HL_ID_PREFIX", "roll-"),
        ("HL_SHUTDOWN_MS", "1000"),
        ("HIGHLANDER_COOKIE", "rolling-bench-cookie-not-a-secret"),
    ];
    let wanted = |b: &str| only.as_deref().is_none_or(|o| o == b);
    println!("rolling restart of 3 node processes, {ids} ids");
    if wanted("postgres") {
        let pg = PgServer::start();
        let mut fleet = Fleet::new(&node, "", &env);
        print(
            "postgres",
            &rolling_restart(
                &mut fleet,
                &NodeSpec::same_url(&NAMES, &pg.url()),
                ids,
                GUARD,
            )
            .await,
        );
    }
    if wanted("etcd") {
        let etcd = EtcdCluster::single().await;
        let mut fleet = Fleet::new(&node, "", &env);
        print(
            "etcd",
            &rolling_restart(
                &mut fleet,
                &NodeSpec::same_url(&NAMES, &etcd.url()),
                ids,
                GUARD,
            )
            .await,
        );
    }
    if wanted("cluster") {
        let nodes: Vec<NodeSpec> = direct_nodes(&NAMES)
            .into_iter()
            .map(|(name, url)| NodeSpec { name, url })
            .collect();
        let mut fleet = Fleet::new(&node, "", &env);
        print(
            "cluster",
            &rolling_restart(&mut fleet, &nodes, ids, GUARD).await,
        );
    }
}
