//! Fleets on the embedded cluster with real OS processes of the `node`
//! binary on loopback: a balanced bring-up, a fourth process joining with
//! rebalancing on, SIGTERM with drain-on-shutdown, a transfer and a drain
//! through a process's operations endpoint, a weight-0 standby, and
//! processes that run different ids. What is checked is behaviour, read
//! from the processes' `START` / `STOP` lines: who runs each id at rest,
//! which instance stopped with which reason, that every moved id runs
//! again. Deadlines are hang guards only. The tests take turns (one set of
//! processes at a time) so a busy machine does not fake a failure.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use highlander::placement::{Affinity, Candidate, place};
use highlander::{SingletonState, Status};
use highlander_tests::cluster::{direct_nodes, free_port, live};
use highlander_tests::ops::{get, request};
use highlander_tests::process::{Event, EventKind, Fleet, NodeProcess};

/// The hang guard of every wait.
const GUARD: Duration = Duration::from_secs(60);
/// How long no event may arrive before a fleet counts as at rest.
const QUIET: Duration = Duration::from_millis(800);
const COOKIE: &str = "fleet-process-cookie-not-a-real-secret";
const TOKEN: &str = "fleet-process-ops-token";
/// Ids per fleet in the balance scenarios (`t-0` to `t-119`).
const IDS: usize = 120;

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ids() -> Vec<String> {
    (0..IDS).map(|i| format!("t-{i}")).collect()
}

/// A fleet of `node` processes that each run `t-0` to `t-119` with
/// rebalancing as `rebalance` says (each process may get more environment
/// when spawned).
fn fleet(rebalance: bool) -> Fleet {
    Fleet::new(
        env!("CARGO_BIN_EXE_node"),
        "",
        &[
            ("HIGHLANDER_COOKIE", COOKIE),
            ("HL_ID_COUNT", &IDS.to_string()),
            ("HL_ID_PREFIX", "t-"),
            ("HL_SHUTDOWN_MS", "1000"),
            ("HL_REBALANCE", if rebalance { "1" } else { "0" }),
        ],
    )
}

/// Cluster URLs for `names`, each node a seed of every other.
fn urls(names: &[&str]) -> HashMap<String, String> {
    direct_nodes(names).into_iter().collect()
}

async fn spawn(
    fleet: &mut Fleet,
    urls: &HashMap<String, String>,
    name: &str,
    env: &[(&str, &str)],
) -> NodeProcess {
    let mut all = vec![("HIGHLANDER_BACKEND", urls[name].as_str())];
    all.extend_from_slice(env);
    fleet.spawn(name, &all).await
}

/// Processes `a`, `b` and `c` (with `env`), settled with every id once and
/// balanced over the three: the processes, in that order, and the owners.
async fn three_balanced(
    fleet: &mut Fleet,
    urls: &HashMap<String, String>,
    env: &[(&str, &str)],
) -> (Vec<NodeProcess>, HashMap<String, String>) {
    let mut procs = Vec::new();
    for name in ["a", "b", "c"] {
        procs.push(spawn(fleet, urls, name, env).await);
    }
    let owners = settle(
        fleet,
        "every id once, balanced over three processes",
        &ids(),
        &["a", "b", "c"],
        |o| balanced(o, &["a", "b", "c"]),
    )
    .await;
    (procs, owners)
}

/// Who runs each id, counting only the processes in `alive` (a killed
/// process prints no `STOP`).
fn runners(fleet: &Fleet, alive: &[&str]) -> HashMap<String, Vec<String>> {
    let mut by_id = live(&fleet.history);
    for nodes in by_id.values_mut() {
        nodes.retain(|n| alive.contains(&n.as_str()));
    }
    by_id
}

/// Waits until each of `ids` runs on exactly one process of `alive`, and
/// `cond` holds for the owners, and then no event arrives for [`QUIET`].
/// Returns the owner of each id.
async fn settle(
    fleet: &mut Fleet,
    what: &str,
    ids: &[String],
    alive: &[&str],
    mut cond: impl FnMut(&HashMap<String, String>) -> bool,
) -> HashMap<String, String> {
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let by_id = runners(fleet, alive);
        let owners: HashMap<String, String> = ids
            .iter()
            .filter_map(|id| match by_id.get(id).map(Vec::as_slice) {
                Some([one]) => Some((id.clone(), one.clone())),
                _ => None,
            })
            .collect();
        if owners.len() == ids.len() && cond(&owners) {
            match fleet.next_event(QUIET).await {
                None => return owners,
                Some(_) => continue,
            }
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "hang guard: not {what} within {GUARD:?}; shares {:?}, {} of {} ids run once; {}",
                shares(&owners),
                owners.len(),
                ids.len(),
                misplaced(fleet, &owners, alive)
            );
        }
        fleet.next_event(Duration::from_millis(100)).await;
    }
}

/// How many ids each node runs.
fn shares(owners: &HashMap<String, String>) -> BTreeMap<String, usize> {
    let mut shares = BTreeMap::new();
    for node in owners.values() {
        *shares.entry(node.clone()).or_default() += 1;
    }
    shares
}

/// Whether each of `nodes` runs ids and none more than 45 % of them (a
/// third is fair for three).
fn balanced(owners: &HashMap<String, String>, nodes: &[&str]) -> bool {
    let shares = shares(owners);
    nodes.iter().all(|n| {
        shares
            .get(*n)
            .is_some_and(|&c| c * 100 <= owners.len() * 45)
    })
}

/// For a failure message: the events of a few ids that do not run where
/// placement among `alive` (weight 1 each) puts them.
fn misplaced(fleet: &Fleet, owners: &HashMap<String, String>, alive: &[&str]) -> String {
    let candidates: Vec<Candidate> = alive.iter().map(|n| Candidate::new(*n, 1)).collect();
    let mut off: Vec<(&String, &String, String)> = owners
        .iter()
        .filter_map(|(id, node)| {
            let best = place(id, &Affinity::default(), &candidates)?
                .name()
                .to_string();
            (best != *node).then_some((id, node, best))
        })
        .collect();
    off.sort();
    let count = off.len();
    let examples: Vec<String> = off
        .into_iter()
        .take(3)
        .map(|(id, node, best)| {
            let events: Vec<String> = fleet
                .history
                .iter()
                .filter(|e| e.id == *id)
                .map(|e| format!("{:?} {} {} {:?}", e.kind, e.node, e.token, e.reason))
                .collect();
            format!("{id} on {node}, placed on {best}: {events:?}")
        })
        .collect();
    format!("{count} ids off their place among {alive:?}, e.g. {examples:#?}")
}

fn after(fleet: &Fleet, mark: usize, mut pred: impl FnMut(&Event) -> bool) -> Vec<Event> {
    fleet.history[mark..]
        .iter()
        .filter(|e| pred(e))
        .cloned()
        .collect()
}

fn is_stop(e: &Event) -> bool {
    e.kind == EventKind::Stop
}

fn is_start(e: &Event) -> bool {
    e.kind == EventKind::Start
}

/// The environment that makes a process serve its endpoint on a free
/// loopback port with the write routes' token; returns the address too.
fn http_env() -> (String, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    (addr.to_string(), addr)
}

async fn status(addr: SocketAddr) -> Option<Status> {
    let answer = get(addr, "/status").await.ok()?;
    serde_json::from_str(&answer.body).ok()
}

/// Waits until the process serving `addr` sees every one of `others` as
/// a reachable member that announced its profile, and `cond` holds for
/// its status.
async fn sees(addr: SocketAddr, others: &[&str], mut cond: impl FnMut(&Status) -> bool) {
    let deadline = tokio::time::Instant::now() + GUARD;
    let mut last = None;
    loop {
        if let Some(s) = status(addr).await {
            let seen = others.iter().all(|o| {
                s.members
                    .iter()
                    .any(|m| m.node == *o && m.reachable && m.profile.is_some())
            });
            if seen && cond(&s) {
                return;
            }
            last = Some(s);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hang guard: {addr} does not see {others:?} within {GUARD:?}: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn post(addr: SocketAddr, path: &str) -> highlander_tests::ops::Answer {
    request(
        addr,
        "POST",
        path,
        &[&format!("Authorization: Bearer {TOKEN}")],
        "",
    )
    .await
    .expect("the endpoint answers")
}

/// Three processes started one after the other end with every id once and
/// no process carrying more than 45 % of them (a third is fair): the first
/// one up claims everything, and rebalancing hands the others their share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_balance_their_ids() {
    let _turn = TURN.lock().await;
    let urls = urls(&["a", "b", "c"]);
    let mut fleet = fleet(true);
    let (_procs, owners) = three_balanced(&mut fleet, &urls, &[]).await;
    let shares = shares(&owners);
    assert_eq!(shares.len(), 3, "{shares:?}");
    let largest = shares.values().copied().max().unwrap();
    assert!(
        largest * 100 <= IDS * 45,
        "the largest share is {largest} of {IDS}: {shares:?}"
    );
    // Every instance that stopped on the way was handed over.
    for stop in after(&fleet, 0, is_stop) {
        assert_eq!(stop.reason.as_deref(), Some("moved"), "{stop:?}");
    }
}

/// A fourth process joins three balanced ones with rebalancing on: it
/// takes its share; every id that moved stopped `moved` on its old process
/// and started again elsewhere, each id on the new process once; none was
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_process_takes_its_share_by_handoff() {
    let _turn = TURN.lock().await;
    let all = ids();
    let urls = urls(&["a", "b", "c", "d"]);
    let mut fleet = fleet(true);
    let (mut procs, _) = three_balanced(&mut fleet, &urls, &[]).await;
    let mark = fleet.history.len();
    procs.push(spawn(&mut fleet, &urls, "d", &[]).await);
    let owners = settle(
        &mut fleet,
        "the fourth process took its share",
        &all,
        &["a", "b", "c", "d"],
        |o| shares(o).get("d").is_some_and(|&d| d * 100 >= IDS * 15),
    )
    .await;
    let on_d: Vec<&String> = all.iter().filter(|id| owners[*id] == "d").collect();
    assert!(
        on_d.len() * 100 >= IDS * 15,
        "d runs {} of {IDS}: {:?}",
        on_d.len(),
        shares(&owners)
    );
    // Every instance that stopped was handed over, and its id started as
    // often again; each id on d came that way, once, on a newer tenure.
    let stops = after(&fleet, mark, is_stop);
    let starts = after(&fleet, mark, is_start);
    for stop in &stops {
        assert_eq!(stop.reason.as_deref(), Some("moved"), "{stop:?}");
        assert_ne!(stop.node, "d", "{stop:?}");
        let stopped = stops.iter().filter(|e| e.id == stop.id).count();
        let started = starts.iter().filter(|e| e.id == stop.id).count();
        assert_eq!(stopped, started, "{}: {stops:?} {starts:?}", stop.id);
    }
    for id in &on_d {
        let stopped: Vec<_> = stops.iter().filter(|e| e.id == **id).collect();
        let started: Vec<_> = starts.iter().filter(|e| e.id == **id).collect();
        assert_eq!(stopped.len(), 1, "{id}: {stopped:?}");
        assert_eq!(started.len(), 1, "{id}: {started:?}");
        assert_eq!(started[0].node, "d");
        assert!(started[0].token > stopped[0].token, "{id}: a new tenure");
    }
}

/// SIGTERM to a process with drain-on-shutdown: every id it held is handed
/// over (stopped `moved`, never `node_shutdown`) before it exits 0, and
/// runs once on the others; nothing else moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_drain_on_shutdown_hands_every_id_over() {
    let _turn = TURN.lock().await;
    let all = ids();
    let urls = urls(&["a", "b", "c"]);
    let mut fleet = fleet(true);
    let (mut procs, owners) =
        three_balanced(&mut fleet, &urls, &[("HL_DRAIN_ON_SHUTDOWN", "1")]).await;
    let on_b: Vec<&String> = all.iter().filter(|id| owners[*id] == "b").collect();
    assert!(!on_b.is_empty());
    let mark = fleet.history.len();
    let b = &mut procs[1];
    b.signal("TERM");
    let exit = b.wait_exit(GUARD).await;
    assert!(exit.success(), "b exits 0 after the drain: {exit:?}");
    settle(&mut fleet, "every id on a or c", &all, &["a", "c"], |_| {
        true
    })
    .await;
    let stops = after(&fleet, mark, is_stop);
    for e in &stops {
        assert_eq!(e.reason.as_deref(), Some("moved"), "{e:?}");
    }
    for id in &on_b {
        let stopped = stops.iter().filter(|e| e.id == **id && e.node == "b");
        assert_eq!(stopped.count(), 1, "{id}: {stops:?}");
        let started = after(&fleet, mark, |e| is_start(e) && e.id == **id);
        assert!(!started.is_empty(), "{id} never ran again");
        assert!(started.iter().all(|e| e.node != "b"), "{id}: {started:?}");
    }
}

/// Through a process's operations endpoint: a transfer moves one id to the
/// named process (and nothing else), and a drain empties a process that
/// keeps running until resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_and_drain_through_the_ops_endpoint() {
    let _turn = TURN.lock().await;
    let jobs: Vec<String> = (0..6).map(|i| format!("job-{i}")).collect();
    let urls = urls(&["a", "b"]);
    let mut fleet = Fleet::new(
        env!("CARGO_BIN_EXE_node"),
        "",
        &[
            ("HIGHLANDER_COOKIE", COOKIE),
            ("HL_IDS", &jobs.join(",")),
            ("HL_SHUTDOWN_MS", "1000"),
            ("HL_REBALANCE", "0"),
            ("HIGHLANDER_HTTP_TOKEN", TOKEN),
        ],
    );
    let mut addrs = HashMap::new();
    let mut procs = Vec::new();
    for name in ["a", "b"] {
        let (env, addr) = http_env();
        procs.push(spawn(&mut fleet, &urls, name, &[("HIGHLANDER_HTTP", &env)]).await);
        addrs.insert(name, addr);
    }
    let owners = settle(&mut fleet, "every job once", &jobs, &["a", "b"], |_| true).await;
    let id = jobs[2].clone();
    let from = owners[&id].clone();
    let to = if from == "a" { "b" } else { "a" };
    let (from_addr, to_addr) = (addrs[from.as_str()], addrs[to]);
    sees(from_addr, &[to], |_| true).await;

    // Not held by `to`: refused there, moving nothing.
    let refused = post(to_addr, &format!("/transfer/{id}?to={from}")).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    let mark = fleet.history.len();
    let moved = post(from_addr, &format!("/transfer/{id}?to={to}")).await;
    assert_eq!(moved.status, 200, "{}", moved.body);
    let moved: serde_json::Value = serde_json::from_str(&moved.body).unwrap();
    assert_eq!(
        (moved["from"].as_str(), moved["to"].as_str()),
        (Some(&*from), Some(to))
    );
    let owners = settle(
        &mut fleet,
        "the job on its new process",
        &jobs,
        &["a", "b"],
        |o| o[&id] == to,
    )
    .await;
    let stops = after(&fleet, mark, is_stop);
    assert_eq!(
        stops.len(),
        1,
        "only the transferred job stopped: {stops:?}"
    );
    assert_eq!(
        (
            stops[0].id.as_str(),
            stops[0].node.as_str(),
            stops[0].reason.as_deref()
        ),
        (id.as_str(), from.as_str(), Some("moved"))
    );
    assert_eq!(after(&fleet, mark, is_start).len(), 1);

    // A drain over HTTP empties `to`, which keeps running.
    let held_by_to: Vec<&String> = jobs.iter().filter(|j| owners[*j] == to).collect();
    let mark = fleet.history.len();
    let drained = post(to_addr, "/drain").await;
    assert_eq!(drained.status, 200, "{}", drained.body);
    settle(
        &mut fleet,
        "every job off the drained process",
        &jobs,
        &["a", "b"],
        |o| o.values().all(|n| n != to),
    )
    .await;
    let stops = after(&fleet, mark, is_stop);
    assert_eq!(stops.len(), held_by_to.len(), "{stops:?}");
    for e in &stops {
        assert_eq!((e.node.as_str(), e.reason.as_deref()), (to, Some("moved")));
    }
    let answer: serde_json::Value =
        serde_json::from_str(&post(to_addr, "/drain").await.body).unwrap();
    assert_eq!(answer["held"], 0, "{answer}");
    let s = status(to_addr)
        .await
        .expect("the drained process still serves");
    assert!(s.draining, "{s:?}");
    assert!(s.running().next().is_none(), "{s:?}");
    let resumed: serde_json::Value =
        serde_json::from_str(&post(to_addr, "/resume").await.body).unwrap();
    assert_eq!(resumed["resumed"], true, "{resumed}");
    assert!(!status(to_addr).await.unwrap().draining);
}

/// A process of weight 0 that joins gets nothing while the others live,
/// and runs everything once they are killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_zero_process_waits_until_the_others_die() {
    let _turn = TURN.lock().await;
    let all = ids();
    let urls = urls(&["a", "b", "standby"]);
    let mut fleet = fleet(true);
    let a = spawn(&mut fleet, &urls, "a", &[]).await;
    let b = spawn(&mut fleet, &urls, "b", &[]).await;
    settle(&mut fleet, "every id on a or b", &all, &["a", "b"], |o| {
        shares(o).len() == 2
    })
    .await;
    let (env, addr) = http_env();
    let _standby = spawn(
        &mut fleet,
        &urls,
        "standby",
        &[("HIGHLANDER_NODE_WEIGHT", "0"), ("HIGHLANDER_HTTP", &env)],
    )
    .await;
    // The standby has seen both and waits on their holders for every id.
    sees(addr, &["a", "b"], |s| {
        s.weight == 0
            && s.singletons.len() == IDS
            && s.singletons
                .iter()
                .all(|x| matches!(&x.state, SingletonState::Waiting { holder: Some(_) }))
    })
    .await;
    fleet.drain(QUIET).await;
    assert!(
        !fleet.history.iter().any(|e| e.node == "standby"),
        "the standby ran something while a and b live"
    );
    for p in [&a, &b] {
        p.signal("KILL");
    }
    settle(
        &mut fleet,
        "every id on the standby",
        &all,
        &["standby"],
        |_| true,
    )
    .await;
    assert_eq!(
        after(&fleet, 0, |e| e.node == "standby" && is_start(e)).len(),
        IDS,
        "each id started once on the standby"
    );
}

/// Processes that run different ids: an id only one process runs starts
/// there and never moves, through a join and a drained leave; shared ids
/// run once each over the processes that run them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_only_one_process_runs_never_moves() {
    let _turn = TURN.lock().await;
    let shared: Vec<String> = (0..40).map(|i| format!("s-{i}")).collect();
    let own: Vec<String> = (0..5).map(|i| format!("own-{i}")).collect();
    let mut a_ids = shared.clone();
    a_ids.extend(own.iter().cloned());
    let urls = urls(&["a", "b", "c"]);
    let mut fleet = Fleet::new(
        env!("CARGO_BIN_EXE_node"),
        "",
        &[
            ("HIGHLANDER_COOKIE", COOKIE),
            ("HL_SHUTDOWN_MS", "1000"),
            ("HL_REBALANCE", "1"),
            ("HL_DRAIN_ON_SHUTDOWN", "1"),
        ],
    );
    let shared_env = shared.join(",");
    let a_env = a_ids.join(",");
    let _b = spawn(&mut fleet, &urls, "b", &[("HL_IDS", &shared_env)]).await;
    let mut c = spawn(&mut fleet, &urls, "c", &[("HL_IDS", &shared_env)]).await;
    settle(
        &mut fleet,
        "shared ids on b and c",
        &shared,
        &["b", "c"],
        |_| true,
    )
    .await;
    let _a = spawn(&mut fleet, &urls, "a", &[("HL_IDS", &a_env)]).await;
    let owners = settle(
        &mut fleet,
        "a runs its own ids and its share",
        &a_ids,
        &["a", "b", "c"],
        |o| own.iter().all(|id| o[id] == "a") && shares(o).get("a").is_some_and(|&n| n > own.len()),
    )
    .await;
    assert!(shares(&owners).len() == 3, "{:?}", shares(&owners));
    c.signal("TERM");
    assert!(c.wait_exit(GUARD).await.success());
    settle(&mut fleet, "every id on a or b", &a_ids, &["a", "b"], |o| {
        own.iter().all(|id| o[id] == "a")
    })
    .await;
    for id in &own {
        let events: Vec<_> = fleet.history.iter().filter(|e| e.id == *id).collect();
        assert_eq!(
            events.len(),
            1,
            "{id} started once and never moved: {events:?}"
        );
        assert_eq!(
            (events[0].kind, events[0].node.as_str()),
            (EventKind::Start, "a")
        );
    }
}
