//! The cluster backend across real `node` processes, each in a network
//! namespace of its own on one bridge (`highlander_tests::netns_cluster`):
//! links cut by the kernel with `iptables` where packets arrive, not by a
//! proxy of the test. Nodes listen on their namespace's address and find
//! each other by the DNS names of their hosts files. A symmetric 1|2 split,
//! a one-way cut, a flapping link and 30 % packet loss each end with exactly
//! one instance. Deadlines are hang guards, never timing assertions. The
//! tests take turns (one cluster of processes at a time) so a busy machine
//! does not fake a failure. Needs root.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use highlander_tests::cluster::live;
use highlander_tests::netns_cluster::{CLUSTER_NAME, Topology};
use highlander_tests::process::{Event, EventKind, Fleet, NodeProcess};

/// Generous: three processes, `ip netns exec`, and a loaded 2-core machine.
const GUARD: Duration = Duration::from_secs(90);
const COOKIE: &str = "netns-test-cookie-not-a-real-secret";
/// Every node listens on this port of its own address.
const PORT: u16 = 7400;
const NODES: [&str; 3] = ["a", "b", "c"];

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    fleet: Fleet,
    _procs: HashMap<String, NodeProcess>,
    // Dropped last: kills what still runs inside, then deletes the network.
    topo: Topology,
}

/// The network and one `node` process per node, listening on its address,
/// with every node's DNS name as seeds.
async fn start(ids: &str) -> Cluster {
    let topo = tokio::task::block_in_place(|| Topology::create(&NODES));
    let seeds: Vec<String> = NODES
        .iter()
        .map(|n| format!("{}:{PORT}", Topology::dns(n)))
        .collect();
    start_on(topo, &NODES, ids, |topo, n| {
        format!("cluster://{}:{PORT}?seeds={}", topo.ip(n), seeds.join(","))
    })
    .await
}

/// One `node` process per name in `nodes`, inside its namespace of `topo`,
/// each with `HIGHLANDER_BACKEND` = `url(topo, name)`.
async fn start_on(
    topo: Topology,
    nodes: &[&str],
    ids: &str,
    url: impl Fn(&Topology, &str) -> String,
) -> Cluster {
    let mut fleet = Fleet::new(
        env!("CARGO_BIN_EXE_node"),
        "",
        &[
            ("HIGHLANDER_COOKIE", COOKIE),
            ("HL_IDS", ids),
            ("HL_SHUTDOWN_MS", "1000"),
        ],
    );
    let mut procs = HashMap::new();
    for n in nodes {
        let url = url(&topo, n);
        let p = fleet
            .spawn_in(n, &[("HIGHLANDER_BACKEND", &url)], &topo.exec_prefix(n))
            .await;
        procs.insert(n.to_string(), p);
    }
    Cluster {
        fleet,
        _procs: procs,
        topo,
    }
}
impl Cluster {
    /// Reads events until `done` holds for what is running, or panics after
    /// the guard.
    async fn until(&mut self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + GUARD;
        loop {
            if done(self) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{what}: not reached within {GUARD:?}; running: {:?}; history: {:#?}",
                    live(&self.fleet.history),
                    self.fleet.history
                );
            }
            self.fleet.next_event(Duration::from_millis(100)).await;
        }
    }

    fn running(&self, id: &str) -> Vec<String> {
        live(&self.fleet.history)
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits for exactly one instance of `solo`, then for quiet, and returns
    /// where it runs (checked again after the quiet).
    async fn settle_to_one(&mut self) -> String {
        self.until("one instance", |c| c.running("solo").len() == 1)
            .await;
        self.fleet.drain(Duration::from_millis(1500)).await;
        let now = self.running("solo");
        assert_eq!(now.len(), 1, "history: {:#?}", self.fleet.history);
        now[0].clone()
    }

    fn stops(&self) -> Vec<Event> {
        self.fleet
            .history
            .iter()
            .filter(|e| e.kind == EventKind::Stop)
            .cloned()
            .collect()
    }

    fn starts(&self) -> usize {
        self.fleet
            .history
            .iter()
            .filter(|e| e.kind == EventKind::Start)
            .count()
    }

    /// No shutdown was asked for: an instance may stop only because it lost
    /// a conflict.
    fn assert_only_conflict_stops(&self) {
        for e in self.stops() {
            assert_eq!(
                e.reason.as_deref(),
                Some("conflict"),
                "{e:?}; history: {:#?}",
                self.fleet.history
            );
        }
    }

    /// The first instance: one in the whole cluster (so the nodes met by
    /// their DNS names), returns its holder.
    async fn first_holder(&mut self) -> String {
        let first = self.fleet.wait_start("solo", GUARD).await;
        self.fleet.drain(Duration::from_millis(800)).await;
        assert_eq!(
            self.running("solo"),
            vec![first.node.clone()],
            "one instance in the whole cluster: the nodes found each other by name"
        );
        first.node
    }
}

fn others(holder: &str) -> Vec<&'static str> {
    NODES.into_iter().filter(|n| *n != holder).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolve_inside_the_namespaces() {
    let _turn = TURN.lock().await;
    let topo = tokio::task::block_in_place(|| Topology::create(&NODES));
    let getent = |node: &str, name: &str| {
        let prefix = topo.exec_prefix(node);
        let out = std::process::Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(["getent", "ahostsv4", name])
            .output()
            .expect("getent runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for node in NODES {
        for other in NODES {
            let out = getent(node, &Topology::dns(other));
            assert!(
                out.contains(&topo.ip(other).to_string()),
                "{other}'s name from {node}: {out}"
            );
        }
        // The shared name: every node's address.
        let out = getent(node, CLUSTER_NAME);
        for other in NODES {
            assert!(
                out.contains(&topo.ip(other).to_string()),
                "{CLUSTER_NAME} from {node} lacks {other}: {out}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_test_leaves_nothing_behind() {
    let _turn = TURN.lock().await;
    struct Made {
        namespaces: Vec<String>,
        subnet: String,
        child: Option<std::process::Child>,
    }
    let made = Arc::new(Mutex::new(Made {
        namespaces: Vec::new(),
        subnet: String::new(),
        child: None,
    }));
    let inside = made.clone();
    let joined = std::thread::spawn(move || {
        let topo = Topology::create(&["x", "y"]);
        topo.partition(&[&["x"], &["y"]]);
        topo.loss(0.3);
        let prefix = topo.exec_prefix("x");
        let child = std::process::Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(["sleep", "600"])
            .spawn()
            .expect("sleep starts");
        let mut m = inside.lock().unwrap();
        m.namespaces = topo.namespaces();
        m.subnet = topo.subnet();
        m.child = Some(child);
        drop(m);
        panic!("a test failing with the network up");
    })
    .join();
    assert!(joined.is_err(), "the thread panicked");
    let mut made = made.lock().unwrap();
    assert_eq!(made.namespaces.len(), 3, "hub, x and y were made");
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip runs");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for ns in &made.namespaces {
        assert!(!listed.contains(ns.as_str()), "{ns} left: {listed}");
        let dir = std::path::Path::new("/etc/netns").join(ns);
        assert!(!dir.exists(), "{} left", dir.display());
    }
    let routes = std::process::Command::new("ip")
        .args(["-4", "route", "show", &made.subnet])
        .output()
        .expect("ip runs");
    assert!(
        routes.stdout.is_empty(),
        "the host still routes {}: {}",
        made.subnet,
        String::from_utf8_lossy(&routes.stdout)
    );
    // The process inside was killed (a hang guard, not a timing check).
    let mut child = made.child.take().expect("the child was started");
    let deadline = std::time::Instant::now() + GUARD;
    loop {
        if let Some(status) = child.try_wait().expect("wait works") {
            assert!(!status.success(), "killed, not finished: {status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the process in the namespace still runs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A symmetric 1|2 split: the side without the holder takes over (AP, as
/// `:global`): two instances run; after the heal exactly one survives, the
/// earlier tenure, and the loser stops with `conflict`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symmetric_split_one_two_heals_to_one_survivor() {
    let _turn = TURN.lock().await;
    let mut c = start("solo").await;
    let holder = c.first_holder().await;
    // The minority is a node without the singleton.
    let rest = others(&holder);
    let (minority, majority) = (rest[0], [holder.as_str(), rest[1]]);
    c.topo.partition(&[&[minority], &majority]);

    let next = c.fleet.wait_start("solo", GUARD).await;
    assert_eq!(next.node, minority, "the minority starts its own instance");
    c.fleet.drain(Duration::from_millis(300)).await;
    let mut both = c.running("solo");
    both.sort();
    let mut expected = vec![holder.clone(), minority.to_string()];
    expected.sort();
    assert_eq!(both, expected, "one instance on each side");

    c.topo.heal();
    let survivor = c.settle_to_one().await;
    assert_eq!(survivor, holder, "the earlier tenure keeps the id");
    let stops = c.stops();
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert_eq!(stops[0].node, minority);
    assert_eq!(stops[0].reason.as_deref(), Some("conflict"));
}

/// A one-way cut: what the holder sends the others is dropped, what they
/// send it arrives. Each end sees the link dead: the others hear no
/// heartbeat, and the holder, whose acknowledgements never arrive, soon
/// gets no new data either, so both close their connections (the kernel
/// would keep an unacknowledged connection established for many minutes).
/// As in a split, the others take over; after the heal one instance is
/// left, the holder's, and the takeover stops with `conflict`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_cut_kills_the_link_both_ways_then_heals_to_one() {
    let _turn = TURN.lock().await;
    let mut c = start("solo").await;
    let holder = c.first_holder().await;
    let rest = others(&holder);
    for o in &rest {
        assert!(
            c.topo.established(&holder, o) && c.topo.established(o, &holder),
            "connected before the cut"
        );
    }
    c.topo.one_way(&[&holder], &rest);

    let next = c.fleet.wait_start("solo", GUARD).await;
    assert!(
        rest.contains(&next.node.as_str()),
        "the others take over: {next:?}"
    );
    // Both ends close: the holder's side too, although the others'
    // packets still reach it.
    c.until("no established connection across the cut", |c| {
        rest.iter()
            .all(|o| !c.topo.established(&holder, o) && !c.topo.established(o, &holder))
    })
    .await;
    // And the link stays dead while the cut lasts: redials cannot finish
    // a handshake whose answer is dropped.
    c.fleet.drain(Duration::from_millis(1500)).await;
    for o in &rest {
        assert!(
            !c.topo.established(&holder, o) && !c.topo.established(o, &holder),
            "a connection across a one-way cut"
        );
    }
    let mut now = c.running("solo");
    now.sort();
    let mut expected = vec![holder.clone(), next.node.clone()];
    expected.sort();
    assert_eq!(now, expected, "one instance on each side of the cut");

    c.topo.heal();
    let survivor = c.settle_to_one().await;
    assert_eq!(survivor, holder, "the earlier tenure keeps the id");
    let stops = c.stops();
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert_eq!(stops[0].node, next.node);
    assert_eq!(stops[0].reason.as_deref(), Some("conflict"));
    c.until("the holder reconnected to both others", |c| {
        rest.iter().all(|o| c.topo.established(&holder, o))
    })
    .await;
}

/// The holder's links flap: three times cut until the others have taken
/// over, then up again for a short while (shorter than, about and longer
/// than a heal takes), then a burst of cuts shorter than the failure
/// timeout. It ends with exactly one instance, and every stop on the way
/// was a lost conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_link_ends_with_one_instance() {
    let _turn = TURN.lock().await;
    let mut c = start("solo").await;
    let holder = c.first_holder().await;
    let rest = others(&holder);
    let sides: [&[&str]; 2] = [&[holder.as_str()], &rest];
    let mut rounds = 0;
    for up_ms in [100, 400, 1500] {
        c.topo.partition(&sides);
        // Cut until the other side runs its own instance.
        c.until("a takeover during the cut", |c| {
            c.running("solo").iter().any(|n| rest.contains(&n.as_str()))
        })
        .await;
        rounds += 1;
        c.topo.heal();
        c.fleet.drain(Duration::from_millis(up_ms)).await;
    }
    let fast: Vec<(Duration, Duration)> = (0..6)
        .map(|i| {
            (
                Duration::from_millis(200 + 100 * i),
                Duration::from_millis(150),
            )
        })
        .collect();
    // Events queue meanwhile and are read afterwards.
    c.topo.flap(&sides, &fast).await;
    assert_eq!(c.topo.rules(), 0, "healed after the flaps");

    let survivor = c.settle_to_one().await;
    c.assert_only_conflict_stops();
    eprintln!(
        "flapping: {rounds} cuts held until the other side ran an instance, then 6 short ones; \
         {} starts and {} conflict stops in all, survivor {survivor}",
        c.starts(),
        c.stops().len()
    );
}

/// 30 % of the packets arriving at every node are dropped, for a while.
/// Meanwhile the singleton never stops running somewhere (an instance
/// stops only for a conflict, which leaves the winner); heartbeats lost
/// in a row past the failure timeout may split the cluster, so more than
/// one may run for a while. When the loss ends, exactly one runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_packet_loss_ends_with_one_instance() {
    let _turn = TURN.lock().await;
    let mut c = start("solo").await;
    c.first_holder().await;
    let before = c.fleet.history.len();
    c.topo.loss(0.3);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        c.fleet.next_event(Duration::from_millis(200)).await;
    }
    // Replayed in the order the nodes printed them (one clock on this
    // host), not the order the pipes were read in.
    let mut sorted = c.fleet.history.clone();
    sorted.sort_by_key(|e| e.at_nanos);
    let counts: Vec<usize> = (1..=sorted.len())
        .map(|k| live(&sorted[..k]).get("solo").map_or(0, Vec::len))
        .collect();
    let most = counts.iter().copied().max().unwrap_or(0);
    let never_none = counts.iter().all(|n| *n > 0);
    let during = &c.fleet.history[before..];
    let starts = during.iter().filter(|e| e.kind == EventKind::Start).count();
    let stops = during.len() - starts;
    eprintln!(
        "30% loss for 20 s: {starts} takeovers, {stops} conflict stops, at most {most} instances at once"
    );
    c.topo.heal();
    c.settle_to_one().await;
    c.assert_only_conflict_stops();
    assert!(
        never_none,
        "no instance for a while: {:#?}",
        c.fleet.history
    );
}

/// DNS discovery: three nodes whose only seed is `cluster.test`, a name that
/// resolves to all their addresses (each node's own among them), form one
/// cluster: one instance of the singleton. Then a fourth node starts whose
/// only seed is its own name, so it cannot find anyone by itself and runs
/// its own instance; once `cluster.test` also names it, the first three
/// find it by resolving the name again, without a restart, and the two
/// instances settle to one (the loser's reason is `conflict`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_find_each_other_through_one_name_and_a_new_address_is_found_again() {
    let _turn = TURN.lock().await;
    let all = ["a", "b", "c", "d"];
    let topo = tokio::task::block_in_place(|| Topology::create(&all));
    topo.name_cluster(&["a", "b", "c"]);
    let mut cluster = start_on(topo, &["a", "b", "c"], "solo", |topo, n| {
        format!(
            "cluster://{}:{PORT}?seeds={CLUSTER_NAME}:{PORT}",
            topo.ip(n)
        )
    })
    .await;
    cluster.first_holder().await;

    let url = format!(
        "cluster://{}:{PORT}?seeds={}:{PORT}",
        cluster.topo.ip("d"),
        Topology::dns("d")
    );
    let prefix = cluster.topo.exec_prefix("d");
    let d = cluster
        .fleet
        .spawn_in("d", &[("HIGHLANDER_BACKEND", &url)], &prefix)
        .await;
    cluster._procs.insert("d".into(), d);
    cluster
        .until("d alone runs its own instance", |c| {
            c.running("solo").contains(&"d".to_string())
        })
        .await;
    cluster.topo.name_cluster(&all);
    cluster.settle_to_one().await;
    let stops = cluster.stops();
    assert_eq!(stops.len(), 1, "history: {:#?}", cluster.fleet.history);
    cluster.assert_only_conflict_stops();
}

/// Dual-stack names: each node listens on `[::]` (IPv4 and IPv6) and its
/// seeds are names that resolve to both an IPv4 and an IPv6 address. The
/// nodes form one cluster (one instance), and a crash of the holder moves
/// the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_names_form_one_cluster_and_fail_over() {
    let _turn = TURN.lock().await;
    let topo = tokio::task::block_in_place(|| Topology::create(&NODES));
    let seeds: Vec<String> = NODES
        .iter()
        .map(|n| format!("{}:{PORT}", Topology::dual_dns(n)))
        .collect();
    let url = format!("cluster://[::]:{PORT}?seeds={}", seeds.join(","));
    let mut cluster = start_on(topo, &NODES, "solo", |_, _| url.clone()).await;
    let holder = cluster.first_holder().await;
    cluster._procs[&holder].signal("KILL");
    cluster
        .until("another node takes over", |c| {
            let r = c.running("solo");
            r.iter().any(|n| *n != holder)
        })
        .await;
}
