//! The cluster backend with several runtimes in one process, over real
//! loopback TCP, with links cut and healed through `Faults` (and, for what
//! crosses the wire, through the harness's proxies). Deadlines are hang
//! guards, never timing assertions.

use std::time::Duration;

use highlander::backend::cluster::{Cluster, Faults};
use highlander::{
    ChildSpec, Context, Runtime, RuntimeHandle, Service, ShutdownReason, SingletonState,
};

const GUARD: Duration = Duration::from_secs(20);

use highlander_tests::log::Log;

struct Probe {
    log: Log,
    id: String,
    node: String,
    token: u64,
}

impl Service for Probe {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.id = ctx.id().to_string();
        self.node = ctx.node().to_string();
        self.token = ctx.fencing_token();
        self.log
            .push(format!("start {} {} {}", self.id, self.node, self.token));
        ctx.cancelled().await;
        Ok(())
    }

    async fn terminate(&mut self, reason: ShutdownReason) {
        self.log.push(format!(
            "stop {} {} {} {reason}",
            self.id, self.node, self.token
        ));
    }
}

fn probe(id: &str, log: &Log) -> ChildSpec {
    let log = log.clone();
    ChildSpec::new(id, move |_ctx| {
        let log = log.clone();
        async move {
            Ok(Probe {
                log,
                id: String::new(),
                node: String::new(),
                token: 0,
            })
        }
    })
    .shutdown(Duration::from_secs(2))
}

async fn start(name: &str, cluster: Cluster, ids: &[&str], log: &Log) -> RuntimeHandle {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let mut builder = Runtime::builder().node(name).backend(cluster);
    for id in ids {
        builder = builder.child(probe(id, log));
    }
    builder.start().await.expect("runtime starts")
}

fn node_cfg(faults: &Faults, seeds: &[String]) -> Cluster {
    Cluster::new("127.0.0.1:0")
        .cookie("in-process test cookie")
        .faults(faults)
        .seeds(seeds.iter().cloned())
}

/// This node's own advertised address, from its member list.
async fn address(handle: &RuntimeHandle) -> String {
    let members = handle.members().await.unwrap();
    members
        .into_iter()
        .find(|m| m.node == handle.node())
        .and_then(|m| m.address)
        .expect("own address")
}

/// Starts nodes `names` in order, each seeded with the first one's address.
async fn cluster_of(
    names: &[&str],
    faults: &Faults,
    ids: &[&str],
    log: &Log,
) -> Vec<RuntimeHandle> {
    let first = start(names[0], node_cfg(faults, &[]), ids, log).await;
    let seed = address(&first).await;
    let mut nodes = vec![first];
    for name in &names[1..] {
        nodes.push(
            start(
                name,
                node_cfg(faults, std::slice::from_ref(&seed)),
                ids,
                log,
            )
            .await,
        );
    }
    for n in &nodes {
        wait_members(n, names.len()).await;
    }
    nodes
}

async fn wait_members(handle: &RuntimeHandle, reachable: usize) {
    tokio::time::timeout(GUARD, async {
        loop {
            let up = handle
                .members()
                .await
                .unwrap()
                .iter()
                .filter(|m| m.reachable)
                .count();
            if up == reachable {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} never saw {reachable} reachable members", handle.node()));
}

async fn wait_waiting(handle: &RuntimeHandle, id: &str) {
    tokio::time::timeout(
        GUARD,
        handle.wait_until(|s| matches!(s.get(id), Some(SingletonState::Waiting { .. }))),
    )
    .await
    .unwrap_or_else(|_| panic!("{} never waited for `{id}`", handle.node()));
}

/// Nodes among `nodes` that run `id` now.
fn runners<'a>(nodes: &'a [RuntimeHandle], id: &str) -> Vec<&'a str> {
    nodes
        .iter()
        .filter(|n| n.status().is_running(id))
        .map(|n| n.node())
        .collect()
}

async fn wait_runners(nodes: &[RuntimeHandle], id: &str, count: usize) -> Vec<String> {
    tokio::time::timeout(GUARD, async {
        loop {
            let r = runners(nodes, id);
            if r.len() == count {
                return r.into_iter().map(str::to_string).collect::<Vec<_>>();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "`{id}` never ran on exactly {count} nodes; now on {:?}",
            runners(nodes, id)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_takeover_on_split_and_one_survivor_after_heal() {
    let log = Log::default();
    let faults = Faults::new();
    let nodes = cluster_of(&["a", "b", "c"], &faults, &["solo"], &log).await;
    let holder = wait_runners(&nodes, "solo", 1).await.remove(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        runners(&nodes, "solo").len(),
        1,
        "one instance in a whole cluster"
    );
    let holder_token = log
        .matching("start solo")
        .last()
        .unwrap()
        .split(' ')
        .nth(3)
        .unwrap()
        .parse::<u64>()
        .unwrap();

    // Cut the holder off: the other side takes over, the holder keeps its own.
    let others: Vec<&str> = ["a", "b", "c"]
        .into_iter()
        .filter(|n| *n != holder)
        .collect();
    faults.partition(&[&[holder.as_str()], &others]);
    let both = wait_runners(&nodes, "solo", 2).await;
    assert!(both.contains(&holder));

    // Heal: the holder's tenure is older, so it stays; the other stops with Conflict.
    faults.heal();
    let survivor = wait_runners(&nodes, "solo", 1).await;
    assert_eq!(
        survivor,
        vec![holder.clone()],
        "the earliest tenure survives the heal"
    );
    tokio::time::timeout(GUARD, async {
        while log
            .matching("stop solo")
            .iter()
            .all(|l| !l.ends_with("conflict"))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the loser's terminate runs with Conflict");
    let takeover = log
        .matching("start solo")
        .into_iter()
        .find(|l| !l.contains(&format!(" {holder} ")))
        .unwrap();
    let takeover_token = takeover.split(' ').nth(3).unwrap().parse::<u64>().unwrap();
    assert!(
        takeover_token > holder_token,
        "fencing tokens grow: {takeover_token} after {holder_token}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        runners(&nodes, "solo"),
        vec![holder.as_str()],
        "still one instance after settling"
    );
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_leave_hands_over_and_members_follow() {
    let log = Log::default();
    let faults = Faults::new();
    let nodes = cluster_of(&["a", "b", "c"], &faults, &["solo"], &log).await;
    let holder = wait_runners(&nodes, "solo", 1).await.remove(0);
    let (gone, rest): (Vec<RuntimeHandle>, Vec<RuntimeHandle>) =
        nodes.into_iter().partition(|n| n.node() == holder);
    gone[0].shutdown().await;
    let stops = log.matching(&format!("stop solo {holder} "));
    assert_eq!(stops.len(), 1, "{:?}", log.lines());
    assert!(stops[0].ends_with("node shutdown"), "{:?}", log.lines());
    let next = wait_runners(&rest, "solo", 1).await.remove(0);
    assert_ne!(next, holder);
    for n in &rest {
        // The leaver is gone from the member list, not merely unreachable.
        wait_members(n, 2).await;
        assert!(n.members().await.unwrap().iter().all(|m| m.node != holder));
        // Every member learns the new holder directly.
        tokio::time::timeout(GUARD, async {
            while n.holder("solo").await.unwrap().map(|h| h.node) != Some(next.clone()) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("every member learns the new holder");
    }
    for n in &rest {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_node_is_replaced_at_once() {
    let log = Log::default();
    let faults = Faults::new();
    let nodes = cluster_of(&["a", "b", "c"], &faults, &["solo"], &log).await;
    let holder = wait_runners(&nodes, "solo", 1).await.remove(0);
    let (crashed, rest): (Vec<RuntimeHandle>, Vec<RuntimeHandle>) =
        nodes.into_iter().partition(|n| n.node() == holder);
    // Abort and drop every handle: the session is dropped, sockets reset.
    crashed[0].abort();
    drop(crashed);
    let next = wait_runners(&rest, "solo", 1).await.remove(0);
    assert_ne!(next, holder);
    for n in &rest {
        wait_members(n, 2).await;
        let m = n.members().await.unwrap();
        assert!(
            m.iter().any(|m| m.node == holder && !m.reachable),
            "the crashed node shows unreachable: {m:?}"
        );
    }
    for n in &rest {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_at_once_end_with_one_instance() {
    for round in 0..3 {
        let log = Log::default();
        let faults = Faults::new();
        let ports = highlander_tests::cluster::free_ports(3);
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let tasks: Vec<_> = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let cfg = Cluster::new(addrs[i].clone())
                    .cookie("k")
                    .faults(&faults)
                    .seeds(addrs.clone());
                let (log, name) = (log.clone(), name.to_string());
                tokio::spawn(async move { start(&name, cfg, &["x", "y", "z"], &log).await })
            })
            .collect();
        let mut nodes = Vec::new();
        for t in tasks {
            nodes.push(t.await.unwrap());
        }
        for id in ["x", "y", "z"] {
            wait_runners(&nodes, id, 1).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for id in ["x", "y", "z"] {
            assert_eq!(
                runners(&nodes, id).len(),
                1,
                "round {round}: `{id}` runs once"
            );
        }
        assert!(
            log.matching("stop").is_empty(),
            "round {round}: no instance had to be stopped: {:?}",
            log.lines()
        );
        for n in &nodes {
            n.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_ids_spread_and_each_runs_once() {
    let log = Log::default();
    let faults = Faults::new();
    let ids: Vec<String> = (0..1000).map(|i| format!("t-{i}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let nodes = cluster_of(&["a", "b", "c"], &faults, &id_refs, &log).await;
    tokio::time::timeout(GUARD, async {
        loop {
            let running: usize = nodes.iter().map(|n| n.status().running().count()).sum();
            if running >= ids.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every id runs");
    tokio::time::sleep(Duration::from_millis(200)).await;
    for id in &id_refs {
        assert_eq!(runners(&nodes, id).len(), 1, "`{id}` runs exactly once");
    }
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_cookie_is_refused() {
    let log = Log::default();
    let a = start(
        "a",
        Cluster::new("127.0.0.1:0").cookie("right"),
        &["solo"],
        &log,
    )
    .await;
    let seed = address(&a).await;
    let b = start(
        "b",
        Cluster::new("127.0.0.1:0")
            .cookie("wrong")
            .seeds([seed.clone()]),
        &["solo"],
        &log,
    )
    .await;
    // b never becomes a member: both run their own instance, and keep doing so.
    b.wait_until(|s| s.is_running("solo")).await;
    a.wait_until(|s| s.is_running("solo")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in [&a, &b] {
        let members = n.members().await.unwrap();
        assert_eq!(
            members.len(),
            1,
            "{} sees only itself: {members:?}",
            n.node()
        );
    }
    // A third node with the right cookie joins a fine.
    let c = start(
        "c",
        Cluster::new("127.0.0.1:0").cookie("right").seeds([seed]),
        &["solo"],
        &log,
    )
    .await;
    wait_members(&c, 2).await;
    wait_waiting(&c, "solo").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!c.status().is_running("solo"));
    for n in [&a, &b, &c] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn no_cookie_refuses_a_public_listen_address() {
    let start = Runtime::builder()
        .node("a")
        .backend(Cluster::new("0.0.0.0:0"))
        .start()
        .await;
    if std::env::var_os("HIGHLANDER_COOKIE").is_some_and(|c| !c.is_empty()) {
        // The environment provides a cookie: then listening anywhere is fine.
        start
            .expect("a cookie from the environment allows 0.0.0.0")
            .shutdown()
            .await;
        return;
    }
    let msg = start.expect_err("refused without a cookie").to_string();
    assert!(
        msg.contains("HIGHLANDER_COOKIE") && msg.contains("0.0.0.0"),
        "{msg}"
    );
    // The same with a cookie from the builder starts.
    let ok = Runtime::builder()
        .node("a")
        .backend(Cluster::new("0.0.0.0:0").cookie("k"))
        .start()
        .await
        .expect("a cookie allows 0.0.0.0");
    ok.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_is_a_new_incarnation() {
    let log = Log::default();
    let faults = Faults::new();
    let a = start("a", node_cfg(&faults, &[]), &["solo"], &log).await;
    a.wait_until(|s| s.is_running("solo")).await;
    let seed = address(&a).await;
    let b = start(
        "b",
        node_cfg(&faults, std::slice::from_ref(&seed)),
        &["solo"],
        &log,
    )
    .await;
    wait_members(&b, 2).await;
    // b crashes while a holds the id, and comes back under the same name.
    b.abort();
    drop(b);
    wait_members(&a, 1).await;
    let b = start(
        "b",
        node_cfg(&faults, std::slice::from_ref(&seed)),
        &["solo"],
        &log,
    )
    .await;
    wait_members(&b, 2).await;
    wait_members(&a, 2).await;
    wait_waiting(&b, "solo").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.status().is_running("solo") && !b.status().is_running("solo"));
    // a leaves: the new b takes over.
    a.shutdown().await;
    tokio::time::timeout(GUARD, async {
        while log.matching("start solo b").is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the new b takes over");
    b.shutdown().await;
    assert_eq!(log.matching("start solo").len(), 2, "{:?}", log.lines());
}

/// A heal reaches the nodes of a side one connection at a time. Here the
/// node that took over during the split (`x`) reconnects to the old holder
/// first, loses the conflict and releases; its neighbour (`y`, its own
/// arbiter), still cut off from the old holder, must not see the id free
/// and start a second tenure that the old holder would end with a second
/// conflict a moment later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heal_reaching_one_node_first_ends_in_one_conflict() {
    let log = Log::default();
    let faults = Faults::new();
    let nodes = cluster_of(&["a", "b", "c"], &faults, &["solo"], &log).await;
    let holder = wait_runners(&nodes, "solo", 1).await.remove(0);
    let mut others: Vec<&str> = ["a", "b", "c"]
        .into_iter()
        .filter(|n| *n != holder)
        .collect();
    others.sort();
    let (y, x) = (others[0], others[1]);
    let handle = |name: &str| nodes.iter().find(|n| n.node() == name).unwrap();

    // x alone takes over; y still sees the holder.
    faults.cut(&holder, x);
    faults.cut(y, x);
    wait_runners(&nodes, "solo", 2).await;
    assert!(runners(&nodes, "solo").contains(&x));
    // y joins x, then loses the holder: y waits for x's tenure.
    faults.heal_link(y, x);
    wait_members(handle(y), 3).await;
    faults.cut(&holder, y);
    wait_members(handle(y), 2).await;
    tokio::time::timeout(GUARD, async {
        while handle(y).holder("solo").await.unwrap().map(|h| h.node) != Some(x.to_string()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("y sees x hold the id");

    // Only x's link to the old holder comes back.
    faults.heal_link(&holder, x);
    tokio::time::timeout(GUARD, async {
        while !log
            .matching(&format!("stop solo {x} "))
            .iter()
            .any(|l| l.ends_with("conflict"))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("x stops with Conflict");
    tokio::time::sleep(Duration::from_millis(150)).await;
    faults.heal();
    let survivor = wait_runners(&nodes, "solo", 1).await;
    assert_eq!(survivor, vec![holder.clone()]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        log.matching(&format!("start solo {y} ")).is_empty(),
        "{y} took the id while its neighbour {x} saw {holder} hold it: {:?}",
        log.matching("")
    );
    let conflicts: Vec<String> = log
        .matching("stop solo")
        .into_iter()
        .filter(|l| l.ends_with("conflict"))
        .collect();
    assert_eq!(conflicts.len(), 1, "exactly one conflict: {conflicts:?}");
    assert_eq!(runners(&nodes, "solo"), vec![holder.as_str()]);
    for n in &nodes {
        n.shutdown().await;
    }
}

/// What crosses the network is sealed: someone on the path reads no id and
/// no holder, and a frame altered on the way is refused (the connection
/// closes and is made again) instead of being believed; the cluster ends
/// with one instance and both members connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wire_is_sealed_against_reading_and_tampering() {
    use highlander_tests::cluster::{Partitioner, node_ip};
    let id = "ledger-reconciliation";
    let log = Log::default();
    let mut proxies = Partitioner::new();
    let mut listens = Vec::new();
    let mut fronts = Vec::new();
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        let ip = node_ip(i);
        let listen =
            std::net::SocketAddr::new(ip.into(), highlander_tests::cluster::free_port_on(ip));
        fronts.push(proxies.add(name, listen).await.to_string());
        listens.push(listen.to_string());
    }
    let cfg = |i: usize| {
        Cluster::new(listens[i].clone())
            .advertise(fronts[i].clone())
            .seeds(fronts.clone())
            .cookie("in-process test cookie")
    };
    let a = start("a", cfg(0), &[id], &log).await;
    tokio::time::timeout(GUARD, a.wait_until(|s| s.is_running(id)))
        .await
        .expect("a runs the id");
    let b = start("b", cfg(1), &[id], &log).await;
    wait_waiting(&b, id).await;
    // b learnt over the wire that a holds the id...
    match b.status().get(id) {
        Some(SingletonState::Waiting { holder: Some(h) }) => assert_eq!(h.node, "a"),
        other => panic!("b should wait on a: {other:?}"),
    }
    // ...yet the id never crossed it in the clear.
    let seen = proxies.captured();
    assert!(!seen.is_empty(), "the nodes talk through the proxies");
    assert!(
        !seen.windows(id.len()).any(|w| w == id.as_bytes()),
        "the id crossed the wire readable"
    );

    // Alter a frame in flight, several times over.
    for round in 1..=3 {
        proxies.corrupt_next();
        tokio::time::timeout(GUARD, async {
            while proxies.corrupted() < round {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("heartbeats carry a frame to alter");
        let nodes = [a.clone(), b.clone()];
        for n in &nodes {
            wait_members(n, 2).await;
        }
        wait_runners(&nodes, id, 1).await;
    }
    let lines = log.lines();
    let starts = lines.iter().filter(|l| l.starts_with("start")).count();
    let stops = lines.iter().filter(|l| l.starts_with("stop")).count();
    assert_eq!(starts, stops + 1, "one tenure left running: {lines:?}");
    assert!(
        lines
            .iter()
            .filter(|l| l.starts_with("stop"))
            .all(|l| l.ends_with("conflict")),
        "a broken link ends only in a conflict after the heal: {lines:?}"
    );
    for n in [a, b] {
        n.shutdown().await;
    }
}
