//! Benchmark of the etcd backend with real processes against a real etcd
//! (started here, single member, on a free port). Prints p50 / p99 / max;
//! asserts nothing.
//!
//! ```text
//! cargo run --release -p highlander-tests --bin bench_etcd -- [--runs 30] [--ttl 10] [--only crash|graceful|many]
//! ```
//!
//! Scenarios, each over `--runs` runs:
//! - `crash`: SIGKILL the holder of one id; time until the standby's
//!   instance starts (default TTL unless `--ttl`);
//! - `graceful`: SIGTERM the holder; time from its instance's stop (and from
//!   the signal) until the standby's instance starts;
//! - `many`: 10,000 ids over 3 node processes: time until all run
//!   (bring-up), then SIGKILL the node holding the most and time until all
//!   of its ids run elsewhere (failover of all).

use std::collections::HashMap;
use std::time::Duration;

use highlander_tests::bench::{ms, report, sibling_bin};
use highlander_tests::etcd::EtcdCluster;
use highlander_tests::process::{EventKind, Fleet, NodeProcess};
use highlander_tests::unix_nanos;

const GUARD: Duration = Duration::from_secs(120);

struct Args {
    runs: usize,
    ttl: Option<u64>,
    only: Option<String>,
    ids: usize,
}

fn args() -> Args {
    let mut args = Args {
        runs: 30,
        ttl: None,
        only: None,
        ids: 10_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--runs" => args.runs = value().parse().expect("--runs N"),
            "--ttl" => args.ttl = Some(value().parse().expect("--ttl SECONDS")),
            "--only" => args.only = Some(value()),
            "--ids" => args.ids = value().parse().expect("--ids N"),
            other => panic!(
                "unknown argument {other}: use --runs N, --ttl SECONDS, --only crash|graceful|many, --ids N"
            ),
        }
    }
    args
}

fn url(etcd: &EtcdCluster, ttl: Option<u64>) -> String {
    match ttl {
        Some(ttl) => etcd.url_with(&format!("ttl={ttl}s")),
        None => etcd.url(),
    }
}

/// Nodes `a` (which runs `solo`, named in the answer) and `b` (its standby).
async fn holder_and_standby(
    etcd: &EtcdCluster,
    args: &Args,
) -> (Fleet, HashMap<String, NodeProcess>, String) {
    let mut fleet = Fleet::new(
        sibling_bin("node"),
        &url(etcd, args.ttl),
        &[("HL_IDS", "solo")],
    );
    let mut nodes: HashMap<String, NodeProcess> = HashMap::new();
    nodes.insert("a".into(), fleet.spawn("a", &[]).await);
    let holder = fleet.wait_start("solo", GUARD).await.node;
    nodes.insert("b".into(), fleet.spawn("b", &[]).await);
    (fleet, nodes, holder)
}

/// Kill-and-replace rounds on one id: the holder is killed, the standby
/// takes over, the killed node comes back as the new standby.
async fn crash(etcd: &EtcdCluster, args: &Args) {
    let (mut fleet, mut nodes, mut holder) = holder_and_standby(etcd, args).await;
    let mut samples = Vec::new();
    for run in 0..args.runs {
        let mut victim = nodes.remove(&holder).expect("the holder is running");
        let killed_at = unix_nanos();
        victim.signal("KILL");
        victim.wait_exit(GUARD).await;
        let start = fleet.wait_start("solo", GUARD).await;
        samples.push(ms(start.at_nanos - killed_at));
        eprintln!("crash run {run}: {:.1} ms", ms(start.at_nanos - killed_at));
        nodes.insert(holder.clone(), fleet.spawn(&holder, &[]).await);
        holder = start.node;
    }
    report("crash failover (SIGKILL -> standby START)", &samples);
}

async fn graceful(etcd: &EtcdCluster, args: &Args) {
    let (mut fleet, mut nodes, mut holder) = holder_and_standby(etcd, args).await;
    // Let the standby settle into waiting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut from_stop, mut from_signal) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let mut leaving = nodes.remove(&holder).expect("the holder is running");
        let signalled_at = unix_nanos();
        leaving.signal("TERM");
        let stop = fleet.wait_for(GUARD, |e| e.kind == EventKind::Stop).await;
        let start = fleet.wait_start("solo", GUARD).await;
        from_stop.push(ms(start.at_nanos.saturating_sub(stop.at_nanos)));
        from_signal.push(ms(start.at_nanos - signalled_at));
        leaving.wait_exit(GUARD).await;
        nodes.insert(holder.clone(), fleet.spawn(&holder, &[]).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        holder = start.node;
    }
    report("graceful handoff (old STOP -> new START)", &from_stop);
    report("graceful handoff (SIGTERM -> new START)", &from_signal);
}

async fn many(etcd: &EtcdCluster, args: &Args) {
    let (mut up, mut over) = (Vec::new(), Vec::new());
    let count = args.ids.to_string();
    for run in 0..args.runs {
        let prefix = format!("r{run}-");
        let env = [
            ("HL_ID_COUNT", count.as_str()),
            ("HL_ID_PREFIX", prefix.as_str()),
        ];
        let mut fleet = Fleet::new(sibling_bin("node"), &url(etcd, args.ttl), &env);
        let began = unix_nanos();
        let mut nodes = Vec::new();
        for name in ["a", "b", "c"] {
            nodes.push(fleet.spawn(name, &[]).await);
        }
        let mut owner: HashMap<String, String> = HashMap::new();
        let mut last = 0;
        while owner.len() < args.ids {
            let e = fleet.wait_for(GUARD, |e| e.kind == EventKind::Start).await;
            last = e.at_nanos;
            owner.insert(e.id, e.node);
        }
        up.push(ms(last - began));
        let mut per_node: HashMap<&str, usize> = HashMap::new();
        for node in owner.values() {
            *per_node.entry(node.as_str()).or_default() += 1;
        }
        let (victim, held) = per_node
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(v, n)| (v.to_string(), *n))
            .expect("some node");
        let index = nodes
            .iter()
            .position(|n| n.name == victim)
            .expect("the victim runs");
        let mut dead = nodes.remove(index);
        let killed_at = unix_nanos();
        dead.signal("KILL");
        dead.wait_exit(GUARD).await;
        let mut moved = 0;
        let mut last = killed_at;
        while moved < held {
            let e = fleet.wait_for(GUARD, |e| e.kind == EventKind::Start).await;
            if owner.get(&e.id).is_some_and(|n| *n == victim) {
                owner.insert(e.id, e.node);
                moved += 1;
                last = e.at_nanos;
            }
        }
        over.push(ms(last - killed_at));
        eprintln!(
            "many run {run}: bring-up {:.1} ms, {held} ids failed over in {:.1} ms",
            up.last().copied().unwrap_or_default(),
            ms(last - killed_at)
        );
        for node in &nodes {
            node.signal("KILL");
        }
        drop(nodes);
        etcd.etcdctl(&["del", "--prefix", "/highlander/"]);
    }
    report(&format!("{} ids over 3 nodes: bring-up", args.ids), &up);
    report(
        &format!("{} ids: failover of all of the killed node's", args.ids),
        &over,
    );
}

#[tokio::main]
async fn main() {
    let args = args();
    let etcd = EtcdCluster::single().await;
    println!(
        "etcd backend benchmark: {} runs each, TTL {}",
        args.runs,
        args.ttl
            .map(|t| format!("{t}s"))
            .unwrap_or_else(|| "default (10s)".into())
    );
    let want = |s: &str| args.only.as_deref().is_none_or(|o| o == s);
    if want("graceful") {
        graceful(&etcd, &args).await;
    }
    if want("crash") {
        crash(&etcd, &args).await;
    }
    if want("many") {
        many(&etcd, &args).await;
    }
}
