//! The cluster backend with several runtimes in one process, over real
//! loopback TCP, with links cut and healed through `Faults` (and, for what
//! crosses the wire, through the harness's proxies): what is particular to
//! it. `conformance.rs` runs what every backend must do (one holder,
//! handoffs, crashes, step-down, tokens, many ids, shutdown). Deadlines are
//! hang guards, never timing assertions.

use std::time::Duration;

use highlander::backend::cluster::{Cluster, Faults};
use highlander::{Runtime, RuntimeHandle, ShutdownReason, SingletonState};
use highlander_tests::probe::Probe;
use highlander_tests::wait::{
    self, GUARD, holder, runners, runners_of, wait_until, wait_until_async, within,
};

async fn start(name: &str, cluster: Cluster, ids: &[&str], probe: &Probe) -> RuntimeHandle {
    highlander_tests::init_tracing();
    // The backend's own promises: ids stay where first claimed (rebalancing
    // is tests/src/fleet.rs's).
    let mut builder = Runtime::builder()
        .node(name)
        .backend(cluster)
        .rebalance(false);
    for id in ids {
        builder = builder.child(probe.spec(id).shutdown(Duration::from_secs(2)));
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
    probe: &Probe,
) -> Vec<RuntimeHandle> {
    let first = start(names[0], node_cfg(faults, &[]), ids, probe).await;
    let seed = address(&first).await;
    let mut nodes = vec![first];
    for name in &names[1..] {
        nodes.push(
            start(
                name,
                node_cfg(faults, std::slice::from_ref(&seed)),
                ids,
                probe,
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
    let what = format!("{} seeing {reachable} reachable members", handle.node());
    wait_until_async(&what, GUARD, async || {
        let members = handle.members().await.unwrap();
        members.iter().filter(|m| m.reachable).count() == reachable
    })
    .await;
}

async fn wait_waiting(handle: &RuntimeHandle, id: &str) {
    wait::waiting(handle, id).await;
}

/// Waits until every one of `nodes` is told that `node` holds `id`.
async fn wait_holder_seen(nodes: &[&RuntimeHandle], id: &str, node: &str) {
    for n in nodes {
        let what = format!("{} seeing {node} hold `{id}`", n.node());
        wait_until_async(&what, GUARD, async || {
            n.holder(id).await.unwrap().map(|h| h.node).as_deref() == Some(node)
        })
        .await;
    }
}

fn refs(nodes: &[RuntimeHandle]) -> Vec<&RuntimeHandle> {
    nodes.iter().collect()
}

async fn wait_runners(nodes: &[RuntimeHandle], id: &str, count: usize) -> Vec<String> {
    runners_of(&refs(nodes), id, count, GUARD).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_takeover_on_split_and_one_survivor_after_heal() {
    let probe = Probe::new();
    let faults = Faults::new();
    let nodes = cluster_of(&["a", "b", "c"], &faults, &["solo"], &probe).await;
    let held = holder(&refs(&nodes), "solo", GUARD).await;
    let holder = held.node.clone();

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
    let lost = probe
        .wait_for("the loser's terminate with Conflict", |events| {
            events
                .iter()
                .any(|e| e.reason() == Some(&ShutdownReason::Conflict))
        })
        .await;
    let takeover = lost
        .iter()
        .find(|e| e.is_start() && e.node != holder)
        .expect("the other side's start");
    assert!(
        takeover.token > held.token,
        "fencing tokens grow: {} after {}",
        takeover.token,
        held.token
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        runners(&refs(&nodes), "solo"),
        vec![holder.clone()],
        "still one instance after settling"
    );
    for n in &nodes {
        n.shutdown().await;
    }
}

/// A node that leaves gracefully is gone from every member list, not
/// merely unreachable; every member learns the new holder directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaver_is_gone_from_the_member_list() {
    let probe = Probe::new();
    let faults = Faults::new();
    let nodes = cluster_of(&["a", "b", "c"], &faults, &["solo"], &probe).await;
    let held = holder(&refs(&nodes), "solo", GUARD).await;
    let (gone, rest): (Vec<RuntimeHandle>, Vec<RuntimeHandle>) =
        nodes.into_iter().partition(|n| n.node() == held.node);
    gone[0].shutdown().await;
    let next = holder(&refs(&rest), "solo", GUARD).await;
    for n in &rest {
        wait_members(n, 2).await;
        assert!(
            n.members()
                .await
                .unwrap()
                .iter()
                .all(|m| m.node != held.node)
        );
    }
    wait_holder_seen(&refs(&rest), "solo", &next.node).await;
    for n in &rest {
        n.shutdown().await;
    }
}

/// A crashed node stays in every member list, unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_node_shows_unreachable() {
    let probe = Probe::new();
    let faults = Faults::new();
    let nodes = cluster_of(&["a", "b", "c"], &faults, &["solo"], &probe).await;
    let held = holder(&refs(&nodes), "solo", GUARD).await;
    let (crashed, rest): (Vec<RuntimeHandle>, Vec<RuntimeHandle>) =
        nodes.into_iter().partition(|n| n.node() == held.node);
    // Abort and drop every handle: the session is dropped, sockets reset.
    probe.cut(&held.node);
    crashed[0].abort();
    drop(crashed);
    holder(&refs(&rest), "solo", GUARD).await;
    for n in &rest {
        wait_members(n, 2).await;
        let m = n.members().await.unwrap();
        assert!(
            m.iter().any(|m| m.node == held.node && !m.reachable),
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
        let probe = Probe::new();
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
                let (probe, name) = (probe.clone(), name.to_string());
                tokio::spawn(async move { start(&name, cfg, &["x", "y", "z"], &probe).await })
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
                runners(&refs(&nodes), id).len(),
                1,
                "round {round}: `{id}` runs once"
            );
        }
        assert!(
            probe.filter(|e| e.is_stop()).is_empty(),
            "round {round}: no instance had to be stopped: {probe:?}"
        );
        for n in &nodes {
            n.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_cookie_is_refused() {
    let probe = Probe::new();
    let a = start(
        "a",
        Cluster::new("127.0.0.1:0").cookie("right"),
        &["solo"],
        &probe,
    )
    .await;
    let seed = address(&a).await;
    let b = start(
        "b",
        Cluster::new("127.0.0.1:0")
            .cookie("wrong")
            .seeds([seed.clone()]),
        &["solo"],
        &probe,
    )
    .await;
    // b never becomes a member: both run their own instance, and keep doing so.
    wait::running(&b, "solo").await;
    wait::running(&a, "solo").await;
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
        &probe,
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
        .backend(Cluster::new("0.0.0.0:0").cookie(LONG_COOKIE))
        .start()
        .await
        .expect("a cookie allows 0.0.0.0");
    ok.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_is_a_new_incarnation() {
    let probe = Probe::new();
    let faults = Faults::new();
    let a = start("a", node_cfg(&faults, &[]), &["solo"], &probe).await;
    wait::running(&a, "solo").await;
    let seed = address(&a).await;
    let b = start(
        "b",
        node_cfg(&faults, std::slice::from_ref(&seed)),
        &["solo"],
        &probe,
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
        &probe,
    )
    .await;
    wait_members(&b, 2).await;
    wait_members(&a, 2).await;
    wait_waiting(&b, "solo").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.status().is_running("solo") && !b.status().is_running("solo"));
    // a leaves: the new b takes over.
    a.shutdown().await;
    probe.wait_start("b", "solo").await;
    b.shutdown().await;
    assert_eq!(probe.starts("solo").len(), 2, "{probe:?}");
}

/// A heal reaches the nodes of a side one connection at a time. Here the
/// node that took over during the split (`x`) reconnects to the old holder
/// first, loses the conflict and releases; its neighbour (`y`, its own
/// arbiter), still cut off from the old holder, must not see the id free
/// and start a second tenure that the old holder would end with a second
/// conflict a moment later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heal_reaching_one_node_first_ends_in_one_conflict() {
    let probe = Probe::new();
    let faults = Faults::new();
    let nodes = cluster_of(&["a", "b", "c"], &faults, &["solo"], &probe).await;
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
    let both = wait_runners(&nodes, "solo", 2).await;
    assert!(both.iter().any(|n| n == x), "{both:?}");
    // y joins x, then loses the holder: y waits for x's tenure.
    faults.heal_link(y, x);
    wait_members(handle(y), 3).await;
    faults.cut(&holder, y);
    wait_members(handle(y), 2).await;
    wait_holder_seen(&[handle(y)], "solo", x).await;

    // Only x's link to the old holder comes back.
    faults.heal_link(&holder, x);
    probe.wait_stop(x, "solo", &ShutdownReason::Conflict).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    faults.heal();
    let survivor = wait_runners(&nodes, "solo", 1).await;
    assert_eq!(survivor, vec![holder.clone()]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        probe.started("solo", y),
        0,
        "{y} took the id while its neighbour {x} saw {holder} hold it: {probe:?}"
    );
    let conflicts = probe.filter(|e| e.reason() == Some(&ShutdownReason::Conflict));
    assert_eq!(conflicts.len(), 1, "exactly one conflict: {probe:?}");
    assert_eq!(runners(&refs(&nodes), "solo"), vec![holder.clone()]);
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
    let probe = Probe::new();
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
    let a = start("a", cfg(0), &[id], &probe).await;
    wait::running(&a, id).await;
    let b = start("b", cfg(1), &[id], &probe).await;
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
        wait_until("a heartbeat's frame altered", GUARD, || {
            proxies.corrupted() >= round
        })
        .await;
        let nodes = [a.clone(), b.clone()];
        for n in &nodes {
            wait_members(n, 2).await;
        }
        wait_runners(&nodes, id, 1).await;
    }
    let starts = probe.starts(id).len();
    let stops = probe.stops(id);
    assert_eq!(
        starts,
        stops.len() + 1,
        "one tenure left running: {probe:?}"
    );
    assert!(
        stops
            .iter()
            .all(|e| e.reason() == Some(&ShutdownReason::Conflict)),
        "a broken link ends only in a conflict after the heal: {probe:?}"
    );
    for n in [a, b] {
        n.shutdown().await;
    }
}

/// A cookie long enough for a non-loopback listen address.
const LONG_COOKIE: &str = "in-process test cookie, long enough for 0.0.0.0";

/// An empty cookie is an HMAC key anyone has: refused everywhere. A short
/// one is refused on an address other nodes can reach, with the way to make
/// a good one.
#[tokio::test]
async fn empty_and_short_cookies_are_refused() {
    async fn refused(cluster: Cluster) -> String {
        Runtime::builder()
            .node("a")
            .backend(cluster)
            .start()
            .await
            .expect_err("a weak cookie is refused")
            .to_string()
    }
    for listen in ["127.0.0.1:0", "0.0.0.0:0"] {
        let msg = refused(Cluster::new(listen).cookie("")).await;
        assert!(msg.contains("empty"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
    let msg = refused(Cluster::new("0.0.0.0:0").cookie("hunter2")).await;
    assert!(
        msg.contains("16 bytes") && msg.contains("head -c 32 /dev/urandom | base64"),
        "{msg}"
    );
    assert!(!msg.contains("hunter2"), "the cookie is never shown: {msg}");
    // A short cookie on loopback only keeps local clusters apart: allowed.
    let ok = Runtime::builder()
        .node("a")
        .backend(Cluster::new("127.0.0.1:0").cookie("hunter2"))
        .start()
        .await
        .expect("a short cookie on loopback");
    ok.shutdown().await;
}

/// Anything answering at a seed's address can send a `Reject{SelfDial}`
/// before any authentication: that must not make the node give the seed up.
/// Here a fake listener answers so, then a real node takes over its port,
/// and the first node joins it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_self_dial_reject_does_not_disable_a_seed() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    let probe = Probe::new();
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let seed = fake.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    let fake_task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = fake.accept().await else {
                continue;
            };
            // A 6-byte frame: length 2, tag Reject, reason SelfDial.
            let _ = s.write_all(&[0, 0, 0, 2, 5, 3]).await;
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    let a = start(
        "a",
        Cluster::new("127.0.0.1:0")
            .cookie(LONG_COOKIE)
            .seeds([seed.to_string()]),
        &["solo"],
        &probe,
    )
    .await;
    wait_until("a dialing its seed", GUARD, || {
        answered.load(Ordering::SeqCst) > 0
    })
    .await;
    fake_task.abort();
    let _ = fake_task.await;
    let b = start(
        "b",
        Cluster::new(seed.to_string()).cookie(LONG_COOKIE),
        &["solo"],
        &probe,
    )
    .await;
    wait_members(&a, 2).await;
    wait_members(&b, 2).await;
    wait_runners(&[a.clone(), b.clone()], "solo", 1).await;
    for n in [a, b] {
        n.shutdown().await;
    }
}

/// A proxy in front of `target` that applies `rewrite` to the payload of
/// the first frame the dialer sends (its `Hello`) when `hello`, else to the
/// first the acceptor answers (its `Challenge`), and reports the tag of the
/// acceptor's verdict on each handshake (4 = Welcome, 5 = Reject).
async fn tampering_proxy(
    target: std::net::SocketAddr,
    hello: bool,
    rewrite: fn(&mut Vec<u8>),
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<u8>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn frame(r: &mut tokio::net::tcp::OwnedReadHalf) -> Option<Vec<u8>> {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).await.ok()?;
        let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
        r.read_exact(&mut payload).await.ok()?;
        Some(payload)
    }
    async fn put(w: &mut tokio::net::tcp::OwnedWriteHalf, payload: &[u8]) -> Option<()> {
        w.write_all(&(payload.len() as u32).to_be_bytes())
            .await
            .ok()?;
        w.write_all(payload).await.ok()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (verdicts, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((inbound, _)) = listener.accept().await else {
                continue;
            };
            let verdicts = verdicts.clone();
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut di, mut dw) = inbound.into_split();
                let (mut ai, mut aw) = outbound.into_split();
                let up = async move {
                    let mut hello_frame = frame(&mut di).await?;
                    if hello {
                        rewrite(&mut hello_frame);
                    }
                    put(&mut aw, &hello_frame).await?;
                    tokio::io::copy(&mut di, &mut aw).await.ok()
                };
                let down = async move {
                    let mut first = frame(&mut ai).await?;
                    if first.first() == Some(&5) {
                        let _ = verdicts.send(5);
                    }
                    if !hello {
                        rewrite(&mut first);
                    }
                    put(&mut dw, &first).await?;
                    let verdict = frame(&mut ai).await?;
                    let _ = verdicts.send(verdict[0]);
                    put(&mut dw, &verdict).await?;
                    tokio::io::copy(&mut ai, &mut dw).await.ok()
                };
                let _ = tokio::join!(up, down);
            });
        }
    });
    (addr, rx)
}

fn replace_once(payload: &mut [u8], from: &[u8], to: &[u8]) {
    let at = payload
        .windows(from.len())
        .position(|w| w == from)
        .expect("the field to alter is in the frame");
    payload[at..at + to.len()].copy_from_slice(to);
}

/// One handshake altered on the way: the acceptor must refuse it, and no
/// member may learn the altered value.
async fn altered_handshake_is_refused(
    dialer: Cluster,
    hello: bool,
    rewrite: fn(&mut Vec<u8>),
    poisoned: &str,
) {
    let probe = Probe::new();
    let port = highlander_tests::free_port();
    let a = start(
        "a",
        Cluster::new(format!("127.0.0.1:{port}"))
            .cookie(LONG_COOKIE)
            .advertise("a.example:7400"),
        &["solo"],
        &probe,
    )
    .await;
    let (proxy, mut verdicts) =
        tampering_proxy(format!("127.0.0.1:{port}").parse().unwrap(), hello, rewrite).await;
    let b = start("b", dialer.seeds([proxy.to_string()]), &["solo"], &probe).await;
    let verdict = within("a handshake through the proxy", GUARD, verdicts.recv())
        .await
        .expect("the proxy reports each verdict");
    for n in [&a, &b] {
        let members = n.members().await.unwrap();
        assert!(
            members
                .iter()
                .all(|m| m.address.as_deref() != Some(poisoned)),
            "{} learnt the altered address {poisoned}: {members:?}",
            n.node()
        );
    }
    assert_eq!(verdict, 5, "the altered handshake was welcomed");
    for n in [a, b] {
        n.shutdown().await;
    }
}

/// `addr`, `listen_port` and `version` are bound into the handshake's MACs:
/// one rewrite on the path cannot poison the address every member learns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_altered_on_the_way_is_refused() {
    // The dialer's advertised address, in its Hello.
    altered_handshake_is_refused(
        Cluster::new("127.0.0.1:0")
            .cookie(LONG_COOKIE)
            .advertise("b.example:7400"),
        true,
        |p| replace_once(p, b"b.example:7400", b"e.example:7400"),
        "e.example:7400",
    )
    .await;
    // The dialer's listen port, which the acceptor pairs with the address it
    // sees when the dialer advertises none (it listens on 0.0.0.0).
    altered_handshake_is_refused(
        Cluster::new("0.0.0.0:0").cookie(LONG_COOKIE),
        true,
        |p| {
            // Hello ends with the listen port (2 bytes) and the nonce (32).
            let at = p.len() - 34;
            p[at..at + 2].copy_from_slice(&9u16.to_be_bytes());
        },
        "127.0.0.1:9",
    )
    .await;
    // The acceptor's advertised address, in its Challenge.
    altered_handshake_is_refused(
        Cluster::new("127.0.0.1:0").cookie(LONG_COOKIE),
        false,
        |p| replace_once(p, b"a.example:7400", b"e.example:7400"),
        "e.example:7400",
    )
    .await;
}

/// Everything the `fmt` subscriber of a test writes.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A `Hello` frame (length prefix included) as an unauthenticated stranger
/// would send it.
fn raw_hello(version: u8, name: &[u8]) -> Vec<u8> {
    let mut p = vec![1, version];
    p.extend_from_slice(&(name.len() as u16).to_be_bytes());
    p.extend_from_slice(name);
    p.extend_from_slice(&7u64.to_be_bytes());
    p.push(0);
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&[9u8; 32]);
    let mut f = (p.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&p);
    f
}

/// One unauthenticated handshake attempt: `hello`, and when challenged, a
/// made-up proof; returns once the acceptor has answered or closed.
async fn stranger(target: std::net::SocketAddr, hello: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(target).await else {
        return;
    };
    if s.write_all(hello).await.is_err() {
        return;
    }
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).await.is_err() {
        return;
    }
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    if s.read_exact(&mut payload).await.is_err() || payload[0] != 2 {
        return;
    }
    let mut response = vec![0, 0, 0, 33, 3];
    response.extend_from_slice(&[0u8; 32]);
    let _ = s.write_all(&response).await;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
}

/// Strangers cannot use the warnings: a name with a line break does not
/// forge a log line, a flood from one address is rate-limited instead of
/// filling a table that then silences every later warning, and a real
/// misconfigured node is still reported after the flood.
#[tokio::test]
async fn refusals_are_logged_rate_limited_and_without_forged_lines() {
    use highlander::backend::Backend;
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let a = Cluster::new("127.0.0.1:0")
        .cookie(LONG_COOKIE)
        .connect("a")
        .await
        .unwrap();
    let addr: std::net::SocketAddr = a
        .members()
        .await
        .unwrap()
        .remove(0)
        .address
        .unwrap()
        .parse()
        .unwrap();
    // A name that would start a forged line.
    stranger(addr, &raw_hello(5, b"x\nERROR forged: cluster compromised")).await;
    stranger(addr, &raw_hello(3, b"x\nERROR forged: cluster compromised")).await;
    // A flood of refusals from one address, each from its own port and with
    // its own name.
    for i in 0..1100 {
        let version = if i % 2 == 0 { 99 } else { 5 };
        stranger(addr, &raw_hello(version, format!("flood-{i}").as_bytes())).await;
    }
    let text = captured.text();
    assert!(
        !text.lines().any(|l| l.starts_with("ERROR forged")),
        "a peer's name forged a log line: {text}"
    );
    let flood_lines = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("127.0.0.1"))
        .count();
    assert!(
        flood_lines <= 6,
        "{flood_lines} warnings for one address's flood"
    );
    // After the flood, a misconfigured node elsewhere is still reported.
    let ip = highlander_tests::cluster::node_ip(1);
    let x = Cluster::new(format!("{ip}:0"))
        .cookie("another cookie, just as long as ours")
        .seeds([addr.to_string()])
        .connect("x")
        .await
        .unwrap();
    tokio::time::timeout(GUARD, async {
        loop {
            let text = captured.text();
            if text
                .lines()
                .any(|l| l.contains("WARN") && l.contains("cookie") && l.contains(&ip.to_string()))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no warning for the node with another cookie: {}",
            captured.text()
        )
    });
    x.close().await;
    a.close().await;
}

/// A node holding 300,000 ids of about 220 bytes has more to send in its
/// first `Sync` than one frame may carry (64 MiB): a joining node must still
/// learn every holding, instead of reconnecting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_larger_than_one_frame_reaches_a_joining_node() {
    use highlander::backend::{Backend, Claim, ClaimRequest};
    const IDS: usize = 300_000;
    highlander_tests::init_tracing();
    // Sealing and applying 70 MB in a debug build keeps both cores busy for
    // seconds: a failure timeout that long keeps heartbeats out of the test.
    let cfg = || {
        Cluster::new("127.0.0.1:0")
            .cookie(LONG_COOKIE)
            .failure_timeout(Duration::from_secs(60))
    };
    let a = cfg().connect("a").await.unwrap();
    let pad = "p".repeat(210);
    let id = |i: usize| -> std::sync::Arc<str> { format!("{pad}-{i:06}").into() };
    for i in 0..IDS {
        let request = ClaimRequest::new(id(i), Duration::from_secs(1));
        match a.try_claim(request).await.unwrap() {
            Claim::Granted(_) => {}
            _ => panic!("a alone holds every id"),
        }
    }
    let seed = a.members().await.unwrap().remove(0).address.unwrap();
    let b = cfg().seeds([seed]).connect("b").await.unwrap();
    let learnt = async || {
        let first = b.holder(&id(0)).await.unwrap().map(|h| h.node);
        let last = b.holder(&id(IDS - 1)).await.unwrap().map(|h| h.node);
        first.as_deref() == Some("a") && last.as_deref() == Some("a")
    };
    wait_until_async(
        "b learning every holding of a",
        Duration::from_secs(120),
        learnt,
    )
    .await;
    let members = b.members().await.unwrap();
    assert!(members.iter().all(|m| m.reachable), "{members:?}");
    b.close().await;
    a.close().await;
}

/// A node bound to port 0 tells its address before any member list: on
/// `0.0.0.0` it advertises none, yet another node can dial it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_port_zero_tells_its_bound_address() {
    let probe = Probe::new();
    let cluster = Cluster::new("0.0.0.0:0").cookie(LONG_COOKIE);
    assert_eq!(cluster.local_addr(), None, "not started yet");
    let a = start("a", cluster.clone(), &["solo"], &probe).await;
    let bound = cluster.local_addr().expect("the bound address");
    assert!(bound.ip().is_unspecified() && bound.port() != 0, "{bound}");
    let own = a.members().await.unwrap();
    assert_eq!(own[0].address, None, "a advertises no address on 0.0.0.0");
    let b = start(
        "b",
        Cluster::new("127.0.0.1:0")
            .cookie(LONG_COOKIE)
            .seeds([format!("127.0.0.1:{}", bound.port())]),
        &["solo"],
        &probe,
    )
    .await;
    wait_members(&a, 2).await;
    wait_members(&b, 2).await;
    wait_runners(&[a.clone(), b.clone()], "solo", 1).await;
    for n in [a, b] {
        n.shutdown().await;
    }
}

/// The cluster over IPv6: three nodes listening on `[::1]`, seeded with the
/// first one's IPv6 address, form one cluster (one instance), advertise
/// IPv6 addresses, and a crash of the holder moves the id to another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_works_over_ipv6_loopback() {
    let probe = Probe::new();
    let faults = Faults::new();
    let v6 = |seeds: &[String]| {
        Cluster::new("[::1]:0")
            .cookie("in-process test cookie")
            .faults(&faults)
            .seeds(seeds.iter().cloned())
    };
    let first_cfg = v6(&[]);
    let first = start("a", first_cfg.clone(), &["v6"], &probe).await;
    let seed = first_cfg.local_addr().expect("bound").to_string();
    assert!(seed.starts_with("[::1]:"), "{seed}");
    let mut nodes = vec![first];
    for name in ["b", "c"] {
        nodes.push(start(name, v6(std::slice::from_ref(&seed)), &["v6"], &probe).await);
    }
    for node in &nodes {
        wait_members(node, 3).await;
        for m in node.members().await.unwrap() {
            let addr = m.address.expect("every member has an address");
            assert!(addr.starts_with("[::1]:"), "{addr}");
        }
    }
    let runners = wait_runners(&nodes, "v6", 1).await;
    let holder = nodes.iter().position(|n| n.node() == runners[0]).unwrap();
    nodes.remove(holder).abort();
    let next = wait_runners(&nodes, "v6", 1).await;
    assert_ne!(next, runners);
    for n in &nodes {
        n.shutdown().await;
    }
}

/// A node that is not one of its own seeds must hear from one: with its
/// only seed down, `start()` retries (binding its fixed port again each
/// time) and fails once the start timeout has passed, naming the seed and
/// the last dial's error. A node that lists itself among its seeds founds
/// the cluster alone instead, whatever the other seeds do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_hears_from_no_seed_fails_to_start_within_the_timeout() {
    use highlander::backend::Backend;
    use highlander::{BackendErrorKind, Error};
    let [me, dead, founder] = highlander_tests::free_ports(3)[..] else {
        unreachable!()
    };
    let dead = format!("127.0.0.1:{dead}");
    let timeout = Duration::from_secs(2);
    let lonely = Cluster::new(format!("127.0.0.1:{me}"))
        .cookie(LONG_COOKIE)
        .seeds([dead.clone()])
        .start_timeout(timeout);
    assert_eq!(Backend::start_timeout(&lonely), Some(timeout));
    let started = Runtime::builder().node("lonely").backend(lonely).start();
    let err = tokio::time::timeout(GUARD, started)
        .await
        .expect("start() gives up by itself")
        .expect_err("no seed answers");
    let Error::Unreachable { waited, source, .. } = &err else {
        panic!("expected Error::Unreachable, got {err:?}")
    };
    assert_eq!(*waited, timeout);
    assert_eq!(
        source.kind(),
        Some(BackendErrorKind::Unreachable),
        "{source}"
    );
    let text = err.to_string();
    assert!(text.contains("heard from none of its seeds"), "{text}");
    assert!(
        text.contains(&format!("cannot connect to {dead}")),
        "{text}"
    );
    assert!(
        !text.contains(LONG_COOKIE) && !text.contains('\n'),
        "{text}"
    );

    // Listing itself among its seeds, a node may found the cluster alone.
    let probe = Probe::new();
    let own = format!("127.0.0.1:{founder}");
    let alone = start(
        "founder",
        Cluster::new(own.clone())
            .cookie(LONG_COOKIE)
            .seeds([own, dead])
            .start_timeout(timeout),
        &["solo"],
        &probe,
    )
    .await;
    wait::running(&alone, "solo").await;
    alone.shutdown().await;
}
