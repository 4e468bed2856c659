//! Benchmark of the embedded cluster backend with real `node` processes on
//! loopback. Prints n / p50 / p99 / max per scenario; asserts nothing.
//!
//! ```text
//! cargo build --release -p highlander-tests --bin node --bin bench_cluster
//! target/release/bench_cluster [--runs 30] [--many-runs 30] [--ids 10000] [--only kill|graceful|stop|heal|many]
//! ```
//!
//! Scenarios, each over `--runs` runs on 3 nodes (`many` over `--many-runs`):
//! - `kill`: SIGKILL the holder of one id; time from the signal until the
//!   instance starts on another node (the killed node comes back as a
//!   standby between runs);
//! - `graceful`: SIGTERM the holder; time from its instance's stop, and
//!   from the signal, until the instance starts elsewhere;
//! - `stop`: SIGSTOP the holder; time until another node runs the id (the
//!   failure timeout, default 1 s, plus the claim); then SIGCONT and the
//!   time until one instance is left;
//! - `heal`: partition the holder from the others through the harness's
//!   fault-injecting proxy, wait for the takeover, heal; time from the heal
//!   until the loser has stopped (one instance left);
//! - `many`: `--ids` ids over 3 processes: time from starting the processes
//!   until every id runs, the TCP payload bytes per second each node sends
//!   while idle (the kernel's socket counters, via `ss`), then SIGKILL the
//!   node holding the most and the
//!   time until every one of its ids runs again.

use std::collections::HashMap;
use std::time::Duration;

use highlander_tests::bench::{ms, report, sibling_bin};
use highlander_tests::cluster::{Partitioner, direct_nodes, proxied_nodes};
use highlander_tests::process::{Event, EventKind, Fleet, NodeProcess};
use highlander_tests::unix_nanos;

const GUARD: Duration = Duration::from_secs(60);
const COOKIE: &str = "bench-cookie-not-a-real-secret";

struct Args {
    runs: usize,
    many_runs: usize,
    ids: usize,
    only: Option<String>,
}

fn args() -> Args {
    let mut args = Args {
        runs: 30,
        many_runs: 30,
        ids: 10_000,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--runs" => args.runs = value().parse().expect("--runs N"),
            "--many-runs" => args.many_runs = value().parse().expect("--many-runs N"),
            "--ids" => args.ids = value().parse().expect("--ids N"),
            "--only" => args.only = Some(value()),
            other => panic!(
                "unknown argument {other}: use --runs N, --many-runs N, --ids N, \
                 --only kill|graceful|stop|heal|many"
            ),
        }
    }
    args
}

fn fleet(ids: &[(&str, &str)]) -> Fleet {
    let mut env = vec![("HIGHLANDER_COOKIE", COOKIE), ("HL_SHUTDOWN_MS", "1000")];
    env.extend_from_slice(ids);
    Fleet::new(sibling_bin("node"), "", &env)
}

async fn spawn(fleet: &mut Fleet, name: &str, url: &str) -> NodeProcess {
    fleet.spawn(name, &[("HIGHLANDER_BACKEND", url)]).await
}

async fn spawn_all(fleet: &mut Fleet, nodes: &[(String, String)]) -> HashMap<String, NodeProcess> {
    let mut procs = HashMap::new();
    for (name, url) in nodes {
        procs.insert(name.clone(), spawn(fleet, name, url).await);
    }
    procs
}

/// Sleeps a pseudo-random 0–250 ms, so that a disruption does not always
/// land at the same phase of the nodes' heartbeat and redial timers (the
/// bench's own waits are event-driven and would otherwise line up with them).
async fn jitter() {
    let nanos = unix_nanos();
    let spread = (nanos ^ (nanos >> 17)).wrapping_mul(0x9e37_79b9_7f4a_7c15) % 250_000;
    tokio::time::sleep(Duration::from_micros(spread as u64)).await;
}

async fn wait_stop(fleet: &mut Fleet, node: &str, id: &str) -> Event {
    fleet
        .wait_for(GUARD, |e| {
            e.kind == EventKind::Stop && e.node == node && e.id == id
        })
        .await
}

/// SIGKILL the holder; the killed node comes back as a standby.
async fn kill(runs: usize) {
    let nodes = direct_nodes(&["a", "b", "c"]);
    let mut fleet = fleet(&[("HL_IDS", "solo")]);
    let mut procs = spawn_all(&mut fleet, &nodes).await;
    let mut holder = fleet.wait_start("solo", GUARD).await.node;
    let mut samples = Vec::new();
    for _ in 0..runs {
        fleet.drain(Duration::from_millis(300)).await;
        jitter().await;
        let mut victim = procs.remove(&holder).expect("holder runs");
        let t0 = unix_nanos();
        victim.signal("KILL");
        let start = fleet.wait_start("solo", GUARD).await;
        samples.push(ms(start.at_nanos.saturating_sub(t0)));
        victim.wait_exit(GUARD).await;
        let url = &nodes.iter().find(|(n, _)| *n == holder).expect("known").1;
        procs.insert(holder.clone(), spawn(&mut fleet, &holder, url).await);
        holder = start.node;
        // Let the restarted node join before the next run.
        fleet.drain(Duration::from_millis(700)).await;
    }
    report("SIGKILL failover (signal -> start)", &samples);
}

/// SIGTERM the holder; it comes back as a standby.
async fn graceful(runs: usize) {
    let nodes = direct_nodes(&["a", "b", "c"]);
    let mut fleet = fleet(&[("HL_IDS", "solo")]);
    let mut procs = spawn_all(&mut fleet, &nodes).await;
    let mut holder = fleet.wait_start("solo", GUARD).await.node;
    let (mut from_stop, mut from_signal) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        fleet.drain(Duration::from_millis(300)).await;
        jitter().await;
        let mut victim = procs.remove(&holder).expect("holder runs");
        let t0 = unix_nanos();
        victim.signal("TERM");
        let stop = wait_stop(&mut fleet, &holder, "solo").await;
        // The new holder's START comes through another pipe and may have
        // been read while waiting for the STOP.
        let start = fleet
            .seen_or_wait(GUARD, |e| {
                e.kind == EventKind::Start && e.id == "solo" && e.at_nanos >= t0
            })
            .await;
        from_stop.push(ms(start.at_nanos.saturating_sub(stop.at_nanos)));
        from_signal.push(ms(start.at_nanos.saturating_sub(t0)));
        victim.wait_exit(GUARD).await;
        let url = &nodes.iter().find(|(n, _)| *n == holder).expect("known").1;
        procs.insert(holder.clone(), spawn(&mut fleet, &holder, url).await);
        holder = start.node;
        fleet.drain(Duration::from_millis(700)).await;
    }
    report("graceful handoff (old stop -> new start)", &from_stop);
    report("graceful handoff (SIGTERM -> new start)", &from_signal);
}

/// SIGSTOP the holder until another node runs the id, then SIGCONT.
async fn stop(runs: usize) {
    let nodes = direct_nodes(&["a", "b", "c"]);
    let mut fleet = fleet(&[("HL_IDS", "solo")]);
    let procs = spawn_all(&mut fleet, &nodes).await;
    let mut holder = fleet.wait_start("solo", GUARD).await.node;
    let (mut takeover, mut settle) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        fleet.drain(Duration::from_millis(300)).await;
        jitter().await;
        let t0 = unix_nanos();
        procs[&holder].signal("STOP");
        let start = fleet.wait_start("solo", GUARD).await;
        takeover.push(ms(start.at_nanos.saturating_sub(t0)));
        fleet.drain(Duration::from_millis(100)).await;
        jitter().await;
        let t1 = unix_nanos();
        procs[&holder].signal("CONT");
        let lost = fleet
            .wait_for(GUARD, |e| {
                e.kind == EventKind::Stop && e.reason.as_deref() == Some("conflict")
            })
            .await;
        settle.push(ms(lost.at_nanos.saturating_sub(t1)));
        if lost.node == holder {
            holder = start.node;
        }
    }
    report("SIGSTOP takeover (signal -> start)", &takeover);
    report("SIGCONT -> one instance (conflict stop)", &settle);
}

/// Partition the holder away through the proxy, wait for the takeover, heal.
async fn heal(runs: usize) {
    let mut partitioner = Partitioner::new();
    let nodes = proxied_nodes(&["a", "b", "c"], &mut partitioner).await;
    let mut fleet = fleet(&[("HL_IDS", "solo")]);
    let _procs = spawn_all(&mut fleet, &nodes).await;
    let mut holder = fleet.wait_start("solo", GUARD).await.node;
    let (mut split, mut healed) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        fleet.drain(Duration::from_millis(300)).await;
        let others: Vec<&str> = ["a", "b", "c"]
            .into_iter()
            .filter(|n| *n != holder)
            .collect();
        jitter().await;
        let t0 = unix_nanos();
        partitioner.partition(&[&[holder.as_str()], &others]);
        let start = fleet.wait_start("solo", GUARD).await;
        split.push(ms(start.at_nanos.saturating_sub(t0)));
        fleet.drain(Duration::from_millis(200)).await;
        jitter().await;
        let t1 = unix_nanos();
        partitioner.heal();
        let lost = fleet
            .wait_for(GUARD, |e| {
                e.kind == EventKind::Stop && e.reason.as_deref() == Some("conflict")
            })
            .await;
        healed.push(ms(lost.at_nanos.saturating_sub(t1)));
        if lost.node == holder {
            holder = start.node;
        }
    }
    report("netsplit: takeover on the holder-less side", &split);
    report("heal -> one instance (loser stopped)", &healed);
}

/// Bytes and segments sent by process `pid` over its TCP sockets, from the
/// kernel's per-socket counters (`ss -tnpi`); `None` when `ss` is missing.
/// (`/proc/<pid>/io` does not count `sendto`, which tokio uses.)
fn sent(pid: u32) -> Option<(u64, u64)> {
    let out = std::process::Command::new("ss")
        .args(["-tnpi"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let tag = format!("pid={pid},");
    let (mut bytes, mut segs, mut mine) = (0u64, 0u64, false);
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            mine = line.contains(&tag);
            continue;
        }
        if mine {
            for field in line.split_whitespace() {
                if let Some(v) = field.strip_prefix("bytes_sent:") {
                    bytes += v.parse::<u64>().unwrap_or(0);
                } else if let Some(v) = field.strip_prefix("segs_out:") {
                    segs += v.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    Some((bytes, segs))
}

/// `ids` ids over 3 processes: bring-up, idle traffic, failover of the
/// node holding the most.
async fn many(runs: usize, ids: usize) {
    let count = ids.to_string();
    let (mut up, mut over) = (Vec::new(), Vec::new());
    let mut idle: Vec<(f64, f64)> = Vec::new();
    let mut spread = String::new();
    for _ in 0..runs {
        let nodes = direct_nodes(&["a", "b", "c"]);
        let mut fleet = fleet(&[("HL_ID_COUNT", &count), ("HL_ID_PREFIX", "id-")]);
        let t0 = unix_nanos();
        let mut procs = spawn_all(&mut fleet, &nodes).await;
        let mut owner: HashMap<String, String> = HashMap::new();
        let mut last = 0u128;
        while owner.len() < ids {
            let e = fleet.next_event(GUARD).await.expect("ids come up");
            match e.kind {
                EventKind::Start => {
                    owner.insert(e.id, e.node);
                    last = e.at_nanos;
                }
                EventKind::Stop => {
                    owner.remove(&e.id);
                }
            }
        }
        up.push(ms(last.saturating_sub(t0)));
        // Idle: nothing to claim, only heartbeats.
        fleet.drain(Duration::from_millis(500)).await;
        let before: Vec<(u32, Option<(u64, u64)>)> =
            procs.values().map(|p| (p.pid(), sent(p.pid()))).collect();
        let window = Duration::from_secs(3);
        tokio::time::sleep(window).await;
        for (pid, b0) in before {
            if let (Some((b0, s0)), Some((b1, s1))) = (b0, sent(pid)) {
                let secs = window.as_secs_f64();
                idle.push((
                    b1.saturating_sub(b0) as f64 / secs,
                    s1.saturating_sub(s0) as f64 / secs,
                ));
            }
        }
        let mut per_node: HashMap<&str, usize> = HashMap::new();
        for n in owner.values() {
            *per_node.entry(n.as_str()).or_default() += 1;
        }
        let (victim, held) = per_node
            .iter()
            .max_by_key(|(_, c)| **c)
            .map(|(n, c)| (n.to_string(), *c))
            .expect("a node");
        spread = format!("{per_node:?}");
        let mut orphans: std::collections::HashSet<String> = owner
            .iter()
            .filter(|(_, n)| **n == victim)
            .map(|(id, _)| id.clone())
            .collect();
        let mut proc = procs.remove(&victim).expect("victim runs");
        let t1 = unix_nanos();
        proc.signal("KILL");
        let mut last = t1;
        while !orphans.is_empty() {
            let e = fleet.next_event(GUARD).await.expect("ids fail over");
            if e.kind == EventKind::Start && e.node != victim && orphans.remove(&e.id) {
                last = e.at_nanos;
            }
        }
        over.push(ms(last.saturating_sub(t1)));
        let _ = held;
        proc.wait_exit(GUARD).await;
        for p in procs.values() {
            p.signal("KILL");
        }
        drop(procs);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report(
        &format!("{ids} ids on 3 nodes: all running (from spawn)"),
        &up,
    );
    report(&format!("{ids} ids: all failed over after SIGKILL"), &over);
    if idle.is_empty() {
        println!("idle traffic per node: not measured (`ss` is missing)");
    } else {
        idle.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        let mut segs: Vec<f64> = idle.iter().map(|i| i.1).collect();
        segs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        println!(
            "{:<44} n={:<3} p50={:>6.0} B/s  max={:>6.0} B/s  (TCP payload; segments p50 {:.1}/s)",
            "idle traffic sent per node",
            idle.len(),
            idle[idle.len() / 2].0,
            idle[idle.len() - 1].0,
            segs[segs.len() / 2]
        );
    }
    println!("(spread of the last run: {spread})");
}

#[tokio::main]
async fn main() {
    let args = args();
    let on = |s: &str| args.only.as_deref().is_none_or(|o| o == s);
    println!(
        "cluster backend, 3 node processes on loopback, {} runs ({} for `many`)",
        args.runs, args.many_runs
    );
    if on("kill") {
        kill(args.runs).await;
    }
    if on("graceful") {
        graceful(args.runs).await;
    }
    if on("stop") {
        stop(args.runs).await;
    }
    if on("heal") {
        heal(args.runs).await;
    }
    if on("many") {
        many(args.many_runs, args.ids).await;
    }
}
