//! The cluster backend across real OS processes of the `node` binary on
//! loopback: SIGKILL, SIGSTOP/SIGCONT, partitions through a fault-injecting
//! proxy, ten nodes split 4/6, a restart under the same name. Deadlines are
//! hang guards, never timing assertions. The tests take turns (one cluster
//! of processes at a time) so a busy machine does not fake a failure.

use std::collections::HashMap;
use std::time::Duration;

use highlander_tests::cluster::{Partitioner, direct_nodes, live, proxied_nodes};
use highlander_tests::process::{Event, EventKind, Fleet, NodeProcess};

const GUARD: Duration = Duration::from_secs(30);
const COOKIE: &str = "process-test-cookie-not-a-real-secret";

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn spawn_all(fleet: &mut Fleet, nodes: &[(String, String)]) -> HashMap<String, NodeProcess> {
    let mut procs = HashMap::new();
    for (name, url) in nodes {
        procs.insert(
            name.clone(),
            fleet.spawn(name, &[("HIGHLANDER_BACKEND", url)]).await,
        );
    }
    procs
}

fn fleet(ids: &str) -> Fleet {
    Fleet::new(
        env!("CARGO_BIN_EXE_node"),
        "",
        &[
            ("HIGHLANDER_COOKIE", COOKIE),
            ("HL_IDS", ids),
            ("HL_SHUTDOWN_MS", "1000"),
            ("HL_REBALANCE", "0"),
        ],
    )
}

/// Reads events until `done` holds for what is running, or panics after
/// the guard.
async fn until(
    fleet: &mut Fleet,
    what: &str,
    mut done: impl FnMut(&HashMap<String, Vec<String>>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        if done(&live(&fleet.history)) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{what}: not reached within {GUARD:?}; running: {:?}; history: {:#?}",
                live(&fleet.history),
                fleet.history
            );
        }
        fleet.next_event(Duration::from_millis(50)).await;
    }
}

fn running(fleet: &Fleet, id: &str) -> Vec<String> {
    live(&fleet.history).get(id).cloned().unwrap_or_default()
}

fn conflicts(fleet: &Fleet) -> Vec<Event> {
    fleet
        .history
        .iter()
        .filter(|e| e.kind == EventKind::Stop && e.reason.as_deref() == Some("conflict"))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_holder_moves_the_singleton() {
    let _turn = TURN.lock().await;
    let mut fleet = fleet("solo");
    let procs = spawn_all(&mut fleet, &direct_nodes(&["a", "b", "c"])).await;
    let first = fleet.wait_start("solo", GUARD).await;
    fleet.drain(Duration::from_millis(500)).await;
    assert_eq!(
        running(&fleet, "solo"),
        vec![first.node.clone()],
        "one instance in a whole cluster"
    );

    procs[&first.node].signal("KILL");
    let next = fleet.wait_start("solo", GUARD).await;
    assert_ne!(next.node, first.node);
    assert!(
        next.token > first.token,
        "fencing token grows: {} after {}",
        next.token,
        first.token
    );
    fleet.drain(Duration::from_millis(500)).await;
    let survivors: Vec<String> = running(&fleet, "solo")
        .into_iter()
        .filter(|n| *n != first.node)
        .collect();
    assert_eq!(survivors, vec![next.node.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_past_the_failure_timeout_then_sigcont_ends_in_one_conflict() {
    let _turn = TURN.lock().await;
    let mut fleet = fleet("solo");
    let procs = spawn_all(&mut fleet, &direct_nodes(&["a", "b", "c"])).await;
    let first = fleet.wait_start("solo", GUARD).await;
    fleet.drain(Duration::from_millis(300)).await;

    procs[&first.node].signal("STOP");
    let next = fleet.wait_start("solo", GUARD).await;
    assert_ne!(
        next.node, first.node,
        "the others take over from a silent holder"
    );
    // Both run during the pause (the paused one cannot know).
    fleet.drain(Duration::from_millis(300)).await;
    procs[&first.node].signal("CONT");

    until(&mut fleet, "one instance after SIGCONT", |l| {
        l.get("solo").is_some_and(|n| n.len() == 1)
    })
    .await;
    let lost = conflicts(&fleet);
    assert_eq!(
        lost.len(),
        1,
        "exactly one instance stopped with conflict: {lost:?}"
    );
    // The paused holder's tenure is older: it keeps the id.
    assert_eq!(lost[0].node, next.node);
    fleet.drain(Duration::from_millis(500)).await;
    assert_eq!(running(&fleet, "solo"), vec![first.node.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_through_a_proxy_heals_to_one_survivor() {
    let _turn = TURN.lock().await;
    let mut partitioner = Partitioner::new();
    let nodes = proxied_nodes(&["a", "b", "c"], &mut partitioner).await;
    let mut fleet = fleet("solo");
    let _procs = spawn_all(&mut fleet, &nodes).await;
    let first = fleet.wait_start("solo", GUARD).await;
    fleet.drain(Duration::from_millis(500)).await;
    assert_eq!(running(&fleet, "solo").len(), 1);

    let holder = first.node.as_str();
    let others: Vec<&str> = ["a", "b", "c"]
        .into_iter()
        .filter(|n| *n != holder)
        .collect();
    partitioner.partition(&[&[holder], &others]);
    let next = fleet.wait_start("solo", GUARD).await;
    assert_ne!(
        next.node, first.node,
        "the side without the holder takes over"
    );
    fleet.drain(Duration::from_millis(300)).await;
    assert_eq!(
        running(&fleet, "solo").len(),
        2,
        "each side runs one instance during the split"
    );

    partitioner.heal();
    until(&mut fleet, "one survivor after the heal", |l| {
        l.get("solo").is_some_and(|n| n.len() == 1)
    })
    .await;
    let lost = conflicts(&fleet);
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].node, next.node, "the later tenure loses");
    fleet.drain(Duration::from_millis(500)).await;
    assert_eq!(running(&fleet, "solo"), vec![first.node.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_nodes_split_four_six_then_healed_end_with_one_instance() {
    let _turn = TURN.lock().await;
    let names: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut partitioner = Partitioner::new();
    let nodes = proxied_nodes(&name_refs, &mut partitioner).await;
    let mut fleet = fleet("solo,second");
    let _procs = spawn_all(&mut fleet, &nodes).await;
    until(&mut fleet, "both ids running", |l| {
        ["solo", "second"]
            .iter()
            .all(|id| l.get(*id).is_some_and(|n| n.len() == 1))
    })
    .await;
    fleet.drain(Duration::from_millis(500)).await;
    for id in ["solo", "second"] {
        assert_eq!(
            running(&fleet, id).len(),
            1,
            "`{id}` runs once in the whole cluster"
        );
    }

    let (four, six) = name_refs.split_at(4);
    partitioner.partition(&[four, six]);
    until(&mut fleet, "each side runs each id", |l| {
        ["solo", "second"].iter().all(|id| {
            let n = l.get(*id).cloned().unwrap_or_default();
            n.len() == 2
                && n.iter().any(|x| four.contains(&x.as_str()))
                && n.iter().any(|x| six.contains(&x.as_str()))
        })
    })
    .await;

    partitioner.heal();
    until(&mut fleet, "one instance per id after the heal", |l| {
        ["solo", "second"]
            .iter()
            .all(|id| l.get(*id).is_some_and(|n| n.len() == 1))
    })
    .await;
    fleet.drain(Duration::from_millis(800)).await;
    for id in ["solo", "second"] {
        assert_eq!(
            running(&fleet, id).len(),
            1,
            "`{id}` settled to one instance"
        );
    }
    assert_eq!(
        conflicts(&fleet).len(),
        2,
        "one loser per id, stopped with conflict"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_under_the_same_name_is_a_new_incarnation() {
    let _turn = TURN.lock().await;
    let nodes = direct_nodes(&["a", "b", "c"]);
    let mut fleet = fleet("solo");
    let mut procs = spawn_all(&mut fleet, &nodes).await;
    let first = fleet.wait_start("solo", GUARD).await;
    fleet.drain(Duration::from_millis(300)).await;

    // Kill the holder and start it again at once, same name and address.
    let holder = first.node.clone();
    let mut old = procs.remove(&holder).unwrap();
    old.signal("KILL");
    old.wait_exit(GUARD).await;
    let url = nodes.iter().find(|(n, _)| *n == holder).unwrap().1.clone();
    procs.insert(
        holder.clone(),
        fleet.spawn(&holder, &[("HIGHLANDER_BACKEND", &url)]).await,
    );
    let next = fleet.wait_start("solo", GUARD).await;
    fleet.drain(Duration::from_millis(1500)).await;
    // One instance: the old incarnation's claim is not mistaken for the new
    // node's, and nobody is stopped for a conflict.
    let now: Vec<String> = running(&fleet, "solo")
        .into_iter()
        .filter(|n| *n != holder || next.node == holder)
        .collect();
    assert_eq!(
        now,
        vec![next.node.clone()],
        "history: {:#?}",
        fleet.history
    );
    assert!(conflicts(&fleet).is_empty(), "{:#?}", fleet.history);

    // The restarted node is a full member: it takes over when the holder leaves.
    if next.node != holder {
        procs[&next.node].signal("TERM");
        let after = fleet.wait_start("solo", GUARD).await;
        assert_ne!(after.node, next.node);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_over_at_once() {
    let _turn = TURN.lock().await;
    let mut fleet = fleet("solo");
    let mut procs = spawn_all(&mut fleet, &direct_nodes(&["a", "b", "c"])).await;
    let first = fleet.wait_start("solo", GUARD).await;
    fleet.drain(Duration::from_millis(300)).await;
    let mut old = procs.remove(&first.node).unwrap();
    old.signal("TERM");
    let stop = fleet
        .wait_for(GUARD, |e| e.kind == EventKind::Stop && e.node == first.node)
        .await;
    assert_eq!(stop.reason.as_deref(), Some("node_shutdown"));
    let next = fleet
        .seen_or_wait(GUARD, |e| {
            e.kind == EventKind::Start && e.id == "solo" && e.node != first.node
        })
        .await;
    assert!(next.token > first.token);
    assert!(
        old.wait_exit(GUARD).await.success(),
        "a SIGTERMed node exits 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_with_another_cookie_is_refused() {
    let _turn = TURN.lock().await;
    let nodes = direct_nodes(&["a", "b", "x"]);
    let mut fleet = fleet("solo");
    let mut procs = HashMap::new();
    for (name, url) in &nodes {
        let cookie = if name == "x" {
            "another-cookie"
        } else {
            COOKIE
        };
        let env = [
            ("HIGHLANDER_BACKEND", url.as_str()),
            ("HIGHLANDER_COOKIE", cookie),
        ];
        procs.insert(name.clone(), fleet.spawn(name, &env).await);
    }
    // x cannot join: it runs its own instance, and a and b share one.
    until(&mut fleet, "x alone and a|b together", |l| {
        l.get("solo")
            .is_some_and(|n| n.len() == 2 && n.iter().any(|x| x == "x"))
    })
    .await;
    fleet.drain(Duration::from_millis(1500)).await;
    let now = running(&fleet, "solo");
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(
        conflicts(&fleet).is_empty(),
        "x never met the others: {:#?}",
        fleet.history
    );
}

/// SIGTERM while the node is still starting (here: waiting for a seed that
/// never answers, `join_ms=5000`) stops it cleanly with exit code 0, as after
/// start-up, instead of killing it by the signal's default action:
/// `highlander::run()` listens for signals before it connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_still_starting_exits_cleanly() {
    let _turn = TURN.lock().await;
    let [me, silent] = highlander_tests::free_ports(2)[..] else {
        unreachable!()
    };
    let url = format!("cluster://127.0.0.1:{me}?seeds=127.0.0.1:{silent}&join_ms=5000");
    let mut fleet = fleet("early");
    let mut node = fleet.spawn("early", &[("HIGHLANDER_BACKEND", &url)]).await;
    // READY comes just before `run()`: this lands inside the 5 s join wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.signal("TERM");
    let status = node.wait_exit(GUARD).await;
    assert!(status.success(), "exit status {status}");
}

/// 2,000 connections that never say a word, kept open against a node whose
/// open-file limit is 1,024 (and whose failure timeout is a minute, which
/// must not let a stranger hold a connection that long): the node still
/// takes over when the holder is killed, and a new node still joins it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_lock_out_neither_failover_nor_a_join() {
    use highlander_tests::cluster::{IdleFlood, cluster_url, free_port_on, node_ip};
    use std::net::SocketAddr;
    let _turn = TURN.lock().await;
    let addr = |i: usize| SocketAddr::new(node_ip(i).into(), free_port_on(node_ip(i)));
    let (a, b, c) = (addr(0), addr(1), addr(2));
    let url = |me: SocketAddr, seed: SocketAddr, extra: &str| {
        format!(
            "{}{extra}",
            cluster_url(&me.to_string(), None, &[seed.to_string()])
        )
    };
    let mut fleet = fleet("solo");
    // a is its own seed, so it may found the cluster before b is up.
    let pa = fleet
        .spawn("a", &[("HIGHLANDER_BACKEND", &url(a, a, ""))])
        .await;
    fleet.wait_start("solo", GUARD).await;
    // Each node also runs an id of its own, which starts once it has joined.
    let _pb = fleet
        .spawn(
            "b",
            &[
                (
                    "HIGHLANDER_BACKEND",
                    &url(b, a, "&failure_timeout_ms=60000"),
                ),
                ("HL_IDS", "solo,joined-b"),
                ("HL_NOFILE", "1024"),
            ],
        )
        .await;
    fleet.wait_start("joined-b", GUARD).await;
    let flood = IdleFlood::start(b, std::net::Ipv4Addr::new(127, 0, 0, 99).into(), 2000);
    // More connections open than the node has file descriptors (the rest of
    // the 2,000 keep trying).
    let deadline = tokio::time::Instant::now() + GUARD;
    while flood.opened() < 1100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flood opened only {} connections",
            flood.opened()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Failover: the holder dies, the flooded node takes over.
    pa.signal("KILL");
    let next = fleet.wait_start("solo", GUARD).await;
    assert_eq!(next.node, "b");
    // A join: c starts its own id only once it has joined b (its join
    // window is longer than the guard), and never runs `solo` beside b.
    let _pc = fleet
        .spawn(
            "c",
            &[
                ("HIGHLANDER_BACKEND", &url(c, b, "&join_ms=120000")),
                ("HL_IDS", "solo,joined-c"),
            ],
        )
        .await;
    fleet.wait_start("joined-c", GUARD).await;
    fleet.drain(Duration::from_millis(300)).await;
    let alive: Vec<String> = running(&fleet, "solo")
        .into_iter()
        .filter(|n| n != "a")
        .collect();
    assert_eq!(
        alive,
        vec!["b".to_string()],
        "c joined b instead of running alone"
    );
    drop(flood);
}
