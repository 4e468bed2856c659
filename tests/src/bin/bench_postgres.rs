//! Benchmark of the postgres backend on a local, default-configured
//! Postgres that it starts itself (the test harness's [`PgServer`]), with
//! OS processes of the `node` binary as the cluster. Prints p50/p99/max per
//! scenario; asserts nothing.
//!
//! ```text
//! cargo build --release -p highlander-tests --bin node --bin bench_postgres
//! target/release/bench_postgres            # 50 runs each, 100,000 ids once
//! target/release/bench_postgres --runs 10 --huge-runs 0
//! ```
//!
//! Scenarios (times from the kill or first spawn to the `START` line the
//! node prints, in the host's one clock):
//! - crash failover: SIGKILL the holder of one id among 3 nodes;
//! - graceful handoff: SIGTERM the holder; from its `STOP` line (the
//!   instance has stopped, the id is being released) to the new `START`,
//!   and from the signal;
//! - 10,000 ids on 3 nodes: bring-up (all running), then SIGKILL the node
//!   holding the most and time until every one of its ids runs elsewhere;
//! - 100,000 ids on 3 nodes: the same, fewer runs.

use std::collections::HashSet;
use std::time::Duration;

use highlander_tests::bench::{ms, report, sibling_bin};
use highlander_tests::postgres::PgServer;
use highlander_tests::process::{EventKind, Fleet, NodeProcess};
use highlander_tests::unix_nanos;

const GUARD: Duration = Duration::from_secs(300);

struct Args {
    runs: usize,
    big_runs: usize,
    huge_runs: usize,
}

fn args() -> Args {
    let mut args = Args {
        runs: 50,
        big_runs: 50,
        huge_runs: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--runs" => args.runs = value(),
            "--big-runs" => args.big_runs = value(),
            "--huge-runs" => args.huge_runs = value(),
            other => panic!(
                "unknown argument {other}: use --runs N (single id), --big-runs N (10,000 ids), --huge-runs N (100,000 ids)"
            ),
        }
    }
    args
}

fn pick<'a>(nodes: &'a mut [NodeProcess], name: &str) -> &'a mut NodeProcess {
    nodes
        .iter_mut()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// One id, three nodes: SIGKILL (or SIGTERM) the holder, time the takeover,
/// start a fresh node in its place.
async fn single_id(pg: &PgServer, runs: usize, graceful: bool) {
    let kind = if graceful { "term" } else { "kill" };
    let mut fleet = Fleet::new(sibling_bin("node"), &pg.url(), &[("HL_IDS", "bench-solo")]);
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(fleet.spawn(&format!("{kind}-{i}"), &[]).await);
    }
    let mut holder = fleet.wait_start("bench-solo", GUARD).await;
    let mut from_signal = Vec::new();
    let mut from_stop = Vec::new();
    for run in 0..runs {
        let t0 = unix_nanos();
        let victim = pick(&mut nodes, &holder.node);
        victim.signal(if graceful { "TERM" } else { "KILL" });
        let mut stop_at = None;
        let next = fleet
            .wait_for(GUARD, |e| {
                if e.kind == EventKind::Stop && e.node == holder.node {
                    stop_at = Some(e.at_nanos);
                }
                e.kind == EventKind::Start && e.node != holder.node
            })
            .await;
        from_signal.push(ms(next.at_nanos.saturating_sub(t0)));
        if graceful && stop_at.is_none() {
            // The two processes' lines can be read out of order.
            let old = holder.node.clone();
            let stop = fleet
                .wait_for(GUARD, |e| e.kind == EventKind::Stop && e.node == old)
                .await;
            stop_at = Some(stop.at_nanos);
        }
        if let Some(stop) = stop_at {
            from_stop.push(ms(next.at_nanos.saturating_sub(stop)));
        }
        let mut gone = nodes.remove(nodes.iter().position(|n| n.name == holder.node).unwrap());
        gone.wait_exit(GUARD).await;
        nodes.push(fleet.spawn(&format!("{kind}-{}", run + 3), &[]).await);
        holder = next;
    }
    if graceful {
        report("graceful handoff: old STOP -> new START", &from_stop);
        report("graceful handoff: SIGTERM -> new START", &from_signal);
    } else {
        report("crash failover: SIGKILL -> new START", &from_signal);
    }
    for node in &nodes {
        node.signal("TERM");
    }
    for node in &mut nodes {
        node.wait_exit(GUARD).await;
    }
}

/// `count` ids on three nodes: bring-up, then SIGKILL the busiest node and
/// time until all of its ids run elsewhere. Returns nothing; prints.
async fn many_ids(pg: &PgServer, count: usize, runs: usize) {
    let prefix = format!("m{count}-");
    let mut bring_up = Vec::new();
    let mut failover = Vec::new();
    let mut moved_counts = Vec::new();
    for run in 0..runs {
        let count_s = count.to_string();
        let mut fleet = Fleet::new(
            sibling_bin("node"),
            &pg.url(),
            &[("HL_ID_COUNT", &count_s), ("HL_ID_PREFIX", &prefix)],
        );
        let t0 = unix_nanos();
        let mut nodes = Vec::new();
        for i in 0..3 {
            nodes.push(fleet.spawn(&format!("m{count}-{run}-{i}"), &[]).await);
        }
        let mut running: std::collections::HashMap<String, String> = Default::default();
        let mut last = 0;
        while running.len() < count {
            let e = fleet
                .next_event(GUARD)
                .await
                .unwrap_or_else(|| panic!("bring-up of {count} ids stalled at {}", running.len()));
            if e.kind == EventKind::Start {
                running.insert(e.id.clone(), e.node.clone());
                last = e.at_nanos;
            }
        }
        bring_up.push(ms(last.saturating_sub(t0)));
        let mut per_node: std::collections::HashMap<&str, usize> = Default::default();
        for node in running.values() {
            *per_node.entry(node).or_default() += 1;
        }
        let (busiest, _) = per_node
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(k, v)| (k.to_string(), *v))
            .unwrap();
        let mut orphans: HashSet<String> = running
            .iter()
            .filter(|(_, n)| **n == busiest)
            .map(|(id, _)| id.clone())
            .collect();
        moved_counts.push(orphans.len());
        let t1 = unix_nanos();
        pick(&mut nodes, &busiest).signal("KILL");
        let mut last = t1;
        while !orphans.is_empty() {
            let e = fleet.next_event(GUARD).await.unwrap_or_else(|| {
                panic!(
                    "failover of {count} ids stalled with {} left",
                    orphans.len()
                )
            });
            if e.kind == EventKind::Start && e.node != busiest && orphans.remove(&e.id) {
                last = e.at_nanos;
            }
        }
        failover.push(ms(last.saturating_sub(t1)));
        for node in &nodes {
            if node.name != busiest {
                node.signal("TERM");
            }
        }
        for node in &mut nodes {
            node.wait_exit(GUARD).await;
        }
    }
    let moved = moved_counts.iter().sum::<usize>() / moved_counts.len().max(1);
    report(&format!("{count} ids on 3 nodes: all running"), &bring_up);
    report(
        &format!("{count} ids: SIGKILL node with ~{moved} -> all moved"),
        &failover,
    );
}

#[tokio::main]
async fn main() {
    let args = args();
    let pg = PgServer::start();
    let settings = pg.psql(
        "SELECT string_agg(name || '=' || setting, ' ' ORDER BY name) FROM pg_settings \
         WHERE name IN ('max_connections', 'max_locks_per_transaction', 'server_version')",
    );
    println!("postgres (default configuration): {settings}");
    println!(
        "node binary: {}, {} runs (1 id), {} runs (10,000 ids), {} runs (100,000 ids)",
        sibling_bin("node").display(),
        args.runs,
        args.big_runs,
        args.huge_runs
    );
    if args.runs > 0 {
        single_id(&pg, args.runs, false).await;
        single_id(&pg, args.runs, true).await;
    }
    if args.big_runs > 0 {
        many_ids(&pg, 10_000, args.big_runs).await;
    }
    if args.huge_runs > 0 {
        many_ids(&pg, 100_000, args.huge_runs).await;
    }
}
