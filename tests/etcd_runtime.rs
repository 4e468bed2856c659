//! The etcd backend driven through the runtime, against a real etcd started
//! by the harness: several runtimes in this process, each its own node with
//! its own etcd lease. Deadlines here are hang guards, never timing claims.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use highlander::backend::etcd::Etcd;
use highlander::{
    ChildSpec, Context, Runtime, RuntimeHandle, Service, ShutdownReason, SingletonState,
};
use highlander_tests::etcd::EtcdCluster;

/// A short TTL keeps the tests fast; the instances stop well within it.
const TTL: Duration = Duration::from_secs(3);
const BUDGET: Duration = Duration::from_millis(300);
const GUARD: Duration = Duration::from_secs(60);

use highlander_tests::log::Log;

struct Probe {
    log: Log,
    tag: String,
}

impl Service for Probe {
    async fn run(&mut self, ctx: &Context) -> highlander::Result<()> {
        self.tag = format!("{} {} {}", ctx.id(), ctx.node(), ctx.fencing_token());
        self.log.push(format!("start {}", self.tag));
        ctx.cancelled().await;
        Ok(())
    }
    async fn terminate(&mut self, reason: ShutdownReason) {
        self.log.push(format!("stop {} {reason}", self.tag));
    }
}

/// The member-failure test rides out a raft election (1–2 s with etcd's
/// default 1 s election timeout) without giving anything up: that needs
/// `TTL·0.99 − 250 ms − budget` comfortably above it.
const MEMBER_TTL: Duration = Duration::from_secs(5);

fn etcd(cluster: &EtcdCluster) -> Etcd {
    etcd_with(cluster, TTL)
}

fn etcd_with(cluster: &EtcdCluster, ttl: Duration) -> Etcd {
    Etcd::new(cluster.endpoints())
        .ttl(ttl)
        .keepalive_interval(Duration::from_millis(250))
}

async fn node(cluster: &EtcdCluster, name: &str, ids: &[String], log: &Log) -> RuntimeHandle {
    node_with(cluster, name, ids, log, TTL).await
}

async fn node_with(
    cluster: &EtcdCluster,
    name: &str,
    ids: &[String],
    log: &Log,
    ttl: Duration,
) -> RuntimeHandle {
    let mut builder = Runtime::builder()
        .node(name)
        .backend(etcd_with(cluster, ttl));
    for id in ids {
        let log = log.clone();
        builder = builder.child(
            ChildSpec::new(id.clone(), move |_ctx| {
                let log = log.clone();
                async move {
                    Ok(Probe {
                        log,
                        tag: String::new(),
                    })
                }
            })
            .shutdown(BUDGET),
        );
    }
    builder.start().await.expect("the runtime starts on etcd")
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("hang guard: {what} did not happen within {GUARD:?}"))
}

fn token_of(handle: &RuntimeHandle, id: &str) -> Option<u64> {
    handle
        .status()
        .running()
        .find(|(i, _)| *i == id)
        .map(|(_, t)| t)
}

/// The one node running `id` among `nodes`, once exactly one runs it.
async fn sole_holder(nodes: &[&RuntimeHandle], id: &str) -> (usize, u64) {
    within("a single holder", async {
        loop {
            let running: Vec<(usize, u64)> = nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| token_of(n, id).map(|t| (i, t)))
                .collect();
            assert!(
                running.len() <= 1,
                "two nodes run `{id}` at once: {running:?}"
            );
            if let [one] = running[..] {
                return one;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_among_three_then_takeovers_with_growing_tokens() {
    let cluster = EtcdCluster::single().await;
    let log = Log::default();
    let ids = vec!["solo".to_string()];
    let a = node(&cluster, "a", &ids, &log).await;
    let b = node(&cluster, "b", &ids, &log).await;
    let c = node(&cluster, "c", &ids, &log).await;
    let nodes = [&a, &b, &c];
    let (first, token1) = sole_holder(&nodes, "solo").await;
    // The others wait, and know who holds it.
    for (i, n) in nodes.iter().enumerate().filter(|(i, _)| *i != first) {
        let status = within(
            "waiting",
            n.wait_until(|s| matches!(s.get("solo"), Some(SingletonState::Waiting { .. }))),
        )
        .await;
        match status.get("solo") {
            Some(SingletonState::Waiting { holder: Some(h) }) => {
                assert_eq!(h.node, nodes[first].node(), "node {i} names the holder");
                assert_eq!(h.token, Some(token1));
            }
            other => panic!("node {i}: {other:?}"),
        }
    }
    let holder = a.holder("solo").await.unwrap().expect("a holder is known");
    assert_eq!(holder.node, nodes[first].node());
    assert_eq!(
        cluster
            .etcdctl(&["get", "/highlander/solo", "--print-value-only"])
            .trim(),
        nodes[first].node()
    );

    // Graceful stop of the holder: the id is released, another node takes it.
    nodes[first].shutdown().await;
    let rest: Vec<&RuntimeHandle> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != first)
        .map(|(_, n)| *n)
        .collect();
    let (second, token2) = sole_holder(&rest, "solo").await;
    assert!(
        token2 > token1,
        "tokens grow across takeovers: {token1} then {token2}"
    );
    assert!(
        log.lines()
            .iter()
            .any(|l| l.starts_with("stop solo") && l.ends_with("node shutdown")),
        "{:?}",
        log.lines()
    );

    // Revoke the holder's lease from outside: it loses the id at once, and a
    // node takes over with a larger token. Usually the last node wins, but
    // the revoked node gets a new lease and claims again, so on a busy
    // machine it may win the race: either is a correct takeover.
    let lease = cluster
        .lease_of("/highlander/solo")
        .expect("the key has a lease");
    cluster.etcdctl(&["lease", "revoke", &lease]);
    let revoked = rest[second];
    within("the lease-lost terminate", async {
        while !log
            .lines()
            .iter()
            .any(|l| l == &format!("stop solo {} {token2} lease lost", revoked.node()))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The revoked tenure may still show in status for a moment after its
    // terminate: wait for a tenure other than it.
    let (third, token3) = loop {
        let (i, t) = sole_holder(&rest, "solo").await;
        if t != token2 {
            break (i, t);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        token3 > token2,
        "tokens grow across takeovers: {token2} then {token3}"
    );
    let (holder, other) = (rest[third], rest[1 - third]);
    // The other node (with a lease of its own, new or old) waits again.
    within(
        "the other node waits",
        other.wait_until(|s| matches!(s.get("solo"), Some(SingletonState::Waiting { .. }))),
    )
    .await;
    holder.shutdown().await;
    within(
        "the other node takes over at last",
        other.wait_until(|s| s.is_running("solo")),
    )
    .await;
    assert!(token_of(other, "solo").unwrap() > token3);
    other.shutdown().await;
    assert_eq!(
        cluster
            .etcdctl(&["get", "--prefix", "/highlander/", "--keys-only"])
            .trim(),
        "",
        "every key is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_ids_on_three_nodes_with_one_lease_each() {
    let cluster = EtcdCluster::single().await;
    let log = Log::default();
    let ids: Vec<String> = (0..1000).map(|i| format!("tenant-{i}")).collect();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(node(&cluster, name, &ids, &log).await);
    }
    within("every id running once", async {
        loop {
            let running: usize = nodes.iter().map(|n| n.status().running().count()).sum();
            if running == ids.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let mut owners: BTreeMap<String, usize> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for (id, _) in n.status().running() {
            assert!(
                owners.insert(id.to_string(), i).is_none(),
                "`{id}` runs twice"
            );
        }
    }
    assert_eq!(owners.len(), 1000);
    let leases = cluster.leases();
    assert_eq!(leases.len(), 3, "one lease per node: {leases:?}");
    let keys = cluster.etcdctl(&["get", "--prefix", "/highlander/", "--keys-only"]);
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 1000);

    // Kill (abort) the node with the most ids: the others take all of them
    // after its lease expires.
    let busiest = (0..3)
        .max_by_key(|&i| nodes[i].status().running().count())
        .unwrap();
    let crashed = nodes.remove(busiest);
    crashed.abort();
    // The handle keeps the session (and so the keep-alive) alive: a crash
    // is the handle gone too.
    drop(crashed);
    let survivors: Vec<&RuntimeHandle> = nodes.iter().collect();
    within("every id running again", async {
        loop {
            let running: usize = survivors.iter().map(|n| n.status().running().count()).sum();
            if running == ids.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    for n in survivors {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoints_and_bad_urls_are_one_line_errors() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("etcd://app:hunter2@127.0.0.1:{port}?connect_timeout=1s");
    let err = Runtime::builder()
        .node("x")
        .backend_url(&url)
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("cannot reach etcd at 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    assert!(!err.contains('\n'), "{err}");

    let err = Runtime::builder()
        .node("x")
        .backend_url("etcd://app:hunter2@nowhere")
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("invalid etcd URL") && !err.contains("hunter2") && !err.contains('\n'),
        "{err}"
    );
}

/// The start-up policy: an etcd nobody answers for fails `start()` with
/// `Error::Unreachable` once the start timeout has passed (the URL's
/// `start_timeout=`, or the builder's, which wins), naming the last cause;
/// a refused password fails at once, whatever the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_fails_start_with_unreachable_after_the_start_timeout() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("etcd://app:hunter2@127.0.0.1:{port}?start_timeout=2s");
    let started = within(
        "start() gives up",
        Runtime::builder().node("x").backend_url(&url).start(),
    )
    .await;
    let Err(error) = started else {
        panic!("nothing listens on port {port}");
    };
    let text = error.to_string();
    assert!(
        matches!(error, highlander::Error::Unreachable { .. }),
        "{error:?}"
    );
    assert!(!error.is_retryable(), "{text}");
    assert!(text.contains("within 2s"), "{text}");
    assert!(
        text.contains(&format!("cannot reach etcd at 127.0.0.1:{port}")),
        "{text}"
    );
    assert!(!text.contains("hunter2") && !text.contains('\n'), "{text}");

    // The builder's start timeout wins over the URL's.
    let started = within(
        "start() gives up",
        Runtime::builder()
            .node("x")
            .backend_url(&url)
            .start_timeout(Duration::from_millis(500))
            .start(),
    )
    .await;
    let Err(error) = started else {
        panic!("nothing listens on port {port}");
    };
    assert!(error.to_string().contains("within 500ms"), "{error}");

    // A refused password is not retried until the start timeout.
    let cluster = EtcdCluster::single().await;
    cluster.etcdctl(&["user", "add", "root", "--new-user-password=r00t-Secret"]);
    cluster.etcdctl(&["user", "grant-role", "root", "root"]);
    cluster.etcdctl(&["auth", "enable"]);
    let wrong = Etcd::new(cluster.endpoints())
        .user("root", "Wr0ng-Passw0rd")
        .start_timeout(Duration::from_secs(600));
    let started = within(
        "a refused password fails at once",
        Runtime::builder().node("x").backend(wrong).start(),
    )
    .await;
    let Err(error) = started else {
        panic!("the password is wrong");
    };
    assert_eq!(
        error.kind(),
        Some(highlander::BackendErrorKind::Auth),
        "{error:?}"
    );
    assert!(error.to_string().contains("refused user `root`"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_auth_and_the_password_stays_hidden() {
    let cluster = EtcdCluster::single().await;
    cluster.etcdctl(&["user", "add", "root", "--new-user-password=r00t-Secret"]);
    cluster.etcdctl(&["user", "grant-role", "root", "root"]);
    cluster.etcdctl(&["auth", "enable"]);
    let endpoints = cluster.endpoints().join(",");

    let wrong = format!("etcd://root:Wr0ng-Passw0rd@{endpoints}?ttl=3s");
    let err = Runtime::builder()
        .node("x")
        .backend_url(&wrong)
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("refused user `root`"), "{err}");
    assert!(
        !err.contains("Wr0ng-Passw0rd") && !err.contains('\n'),
        "{err}"
    );

    let log = Log::default();
    let backend = Etcd::new(cluster.endpoints())
        .ttl(TTL)
        .user("root", "r00t-Secret");
    assert!(!format!("{backend:?}").contains("r00t-Secret"));
    let handle = Runtime::builder()
        .node("authed")
        .backend(backend)
        .child(
            ChildSpec::new("guarded", {
                let log = log.clone();
                move |_ctx| {
                    let log = log.clone();
                    async move {
                        Ok(Probe {
                            log,
                            tag: String::new(),
                        })
                    }
                }
            })
            .shutdown(BUDGET),
        )
        .start()
        .await
        .expect("the right password is accepted");
    within(
        "running with auth",
        handle.wait_until(|s| s.is_running("guarded")),
    )
    .await;
    assert!(!format!("{:?}", handle.status()).contains("r00t-Secret"));
    // Turning auth off and on again drops every token etcd issued ("invalid
    // auth token"): the next request gets a new token and goes through.
    cluster.etcdctl(&["--user=root:r00t-Secret", "auth", "disable"]);
    cluster.etcdctl(&["auth", "enable"]);
    let holder = handle
        .holder("guarded")
        .await
        .expect("the dropped token is renewed")
        .expect("guarded is held");
    assert_eq!(holder.node, "authed");
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_budget_that_does_not_fit_the_ttl_is_refused_at_start() {
    let cluster = EtcdCluster::single().await;
    let started = Runtime::builder()
        .node("slow")
        .backend(etcd(&cluster))
        .child(
            ChildSpec::new("slow-stopper", |_ctx| async {
                Ok(Probe {
                    log: Log::default(),
                    tag: String::new(),
                })
            })
            .shutdown(Duration::from_secs(5)),
        )
        .start()
        .await;
    let Err(error) = started else {
        panic!("a 5s shutdown budget with a 3s TTL must not start");
    };
    let error = error.to_string();
    assert!(
        error.contains("does not fit in the etcd lease TTL of 3s")
            && error.contains("5s")
            && error.contains("slow-stopper"),
        "{error}"
    );
    assert!(!error.contains('\n'), "{error}");
    assert!(
        cluster
            .etcdctl(&["get", "--prefix", "", "--keys-only"])
            .trim()
            .is_empty()
    );
    // The refused start gave its lease back at once.
    assert!(cluster.leases().is_empty(), "{:?}", cluster.leases());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_of_three_killed_under_load_changes_nothing_for_holders() {
    highlander_tests::init_tracing();
    let mut cluster = EtcdCluster::start(3).await;
    let log = Log::default();
    let ids: Vec<String> = (0..50).map(|i| format!("job-{i}")).collect();
    let a = node_with(&cluster, "a", &ids, &log, MEMBER_TTL).await;
    let b = node_with(&cluster, "b", &ids, &log, MEMBER_TTL).await;
    let before = within("all running", async {
        loop {
            let mut all: Vec<(String, String, u64)> = Vec::new();
            for n in [&a, &b] {
                all.extend(
                    n.status()
                        .running()
                        .map(|(id, t)| (id.to_string(), n.node().to_string(), t)),
                );
            }
            if all.len() == ids.len() {
                all.sort();
                return all;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Load: a third node keeps asking for every id while a member dies.
    let c = node_with(&cluster, "c", &ids, &log, MEMBER_TTL).await;
    // Kill the leader: the hardest member to lose (an election follows,
    // during which keep-alives fail).
    let leader = cluster.leader();
    cluster.kill_member(leader);
    // Ride through several TTLs with a member gone.
    tokio::time::sleep(MEMBER_TTL * 3).await;
    let mut after: Vec<(String, String, u64)> = Vec::new();
    for n in [&a, &b, &c] {
        after.extend(
            n.status()
                .running()
                .map(|(id, t)| (id.to_string(), n.node().to_string(), t)),
        );
    }
    after.sort();
    assert_eq!(
        before, after,
        "no holder changed while one member of three died"
    );
    let stops: Vec<String> = log
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("stop"))
        .collect();
    assert!(stops.is_empty(), "no instance stopped: {stops:?}");
    // Graceful handoff still works on the two survivors.
    a.shutdown().await;
    within("b and c take a's ids", async {
        loop {
            let running: HashSet<String> = [&b, &c]
                .iter()
                .flat_map(|n| {
                    n.status()
                        .running()
                        .map(|(i, _)| i.to_string())
                        .collect::<Vec<_>>()
                })
                .collect();
            if running.len() == ids.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    b.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_from_etcd_a_holder_gives_up_claims_nothing_and_comes_back() {
    let mut cluster = EtcdCluster::single().await;
    let log = Log::default();
    let ids = vec!["solo".to_string()];
    let a = node(&cluster, "a", &ids, &log).await;
    within("running", a.wait_until(|s| s.is_running("solo"))).await;
    let token = token_of(&a, "solo").unwrap();

    // The only member dies: no keep-alive can succeed, so the holder stops
    // its instance with lease_lost before the lease could expire.
    cluster.kill_member(0);
    within(
        "the holder gives up",
        a.wait_until(|s| !s.is_running("solo")),
    )
    .await;
    let lost = format!("stop solo a {token} lease lost");
    within("the lease-lost terminate", async {
        while !log.lines().contains(&lost) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // While cut off it claims nothing: it retries, and says why.
    let status = within(
        "retrying while cut off",
        a.wait_until(|s| matches!(s.get("solo"), Some(SingletonState::Retrying { .. }))),
    )
    .await;
    assert!(!status.is_running("solo"));
    tokio::time::sleep(TTL).await;
    assert!(
        !a.status().is_running("solo"),
        "nothing is claimed while etcd is down"
    );
    assert_eq!(
        log.lines()
            .iter()
            .filter(|l| l.starts_with("start"))
            .count(),
        1
    );

    // etcd comes back: the node reconnects, gets a new lease, and claims the
    // id again with a larger token.
    cluster.restart_member(0).await;
    within(
        "back after etcd returns",
        a.wait_until(|s| s.is_running("solo")),
    )
    .await;
    assert!(token_of(&a, "solo").unwrap() > token);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_node_waits_for_the_watch_and_does_not_spin() {
    let cluster = EtcdCluster::single().await;
    let log = Log::default();
    let ids = vec!["solo".to_string()];
    let a = node(&cluster, "a", &ids, &log).await;
    within("a runs", a.wait_until(|s| s.is_running("solo"))).await;
    let b = node(&cluster, "b", &ids, &log).await;
    within(
        "b waits",
        b.wait_until(|s| matches!(s.get("solo"), Some(SingletonState::Waiting { .. }))),
    )
    .await;
    // A waiter that retried without a change would flip between Claiming
    // and Waiting: no state change may happen while nothing changes in etcd.
    let quiet = tokio::time::timeout(TTL, b.changed()).await;
    assert!(
        quiet.is_err(),
        "b's state changed while the holder held on: {:?}",
        b.status()
    );
    // Writes to other keys of the namespace wake nobody either.
    cluster.etcdctl(&["put", "/highlander/unrelated", "x"]);
    cluster.etcdctl(&["del", "/highlander/unrelated"]);
    let quiet = tokio::time::timeout(Duration::from_millis(500), b.changed()).await;
    assert!(quiet.is_err(), "an unrelated key woke b: {:?}", b.status());
    a.shutdown().await;
    within("b takes over", b.wait_until(|s| s.is_running("solo"))).await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_nodes_lease_ends_all_its_tenures_at_once() {
    let cluster = EtcdCluster::single().await;
    let log = Log::default();
    let ids: Vec<String> = (0..20).map(|i| format!("part-{i}")).collect();
    let a = node(&cluster, "a", &ids, &log).await;
    within(
        "a runs all",
        a.wait_until(|s| s.running().count() == ids.len()),
    )
    .await;
    let b = node(&cluster, "b", &ids, &log).await;
    within(
        "b waits for all",
        b.wait_until(|s| {
            s.singletons
                .iter()
                .all(|x| matches!(x.state, SingletonState::Waiting { .. }))
        }),
    )
    .await;
    let leases = cluster.leases();
    let a_lease = cluster
        .lease_of("/highlander/part-0")
        .expect("a's key has a lease");
    assert!(leases.contains(&a_lease), "{leases:?}");
    cluster.etcdctl(&["lease", "revoke", &a_lease]);
    within(
        "b runs all",
        b.wait_until(|s| s.running().count() == ids.len()),
    )
    .await;
    within("a stopped all with lease lost", async {
        loop {
            let lost = log
                .lines()
                .iter()
                .filter(|l| {
                    l.starts_with("stop part-") && l.contains(" a ") && l.ends_with("lease lost")
                })
                .count();
            if lost == ids.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(a.status().running().count(), 0);
    // a got a new lease and waits for every id again.
    within(
        "a waits again",
        a.wait_until(|s| {
            s.singletons
                .iter()
                .all(|x| matches!(x.state, SingletonState::Waiting { .. }))
        }),
    )
    .await;
    assert!(!cluster.leases().contains(&a_lease));
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_in_the_list_neither_stops_a_start_nor_a_holder() {
    let cluster = EtcdCluster::single().await;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("127.0.0.1:{}", listener.local_addr().unwrap().port())
    };
    let log = Log::default();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let backend = Etcd::new([dead.clone(), cluster.endpoints()[0].clone()])
            .ttl(TTL)
            .keepalive_interval(Duration::from_millis(250));
        let log = log.clone();
        let handle = Runtime::builder()
            .node(name)
            .backend(backend)
            .child(
                ChildSpec::new("solo", move |_ctx| {
                    let log = log.clone();
                    async move {
                        Ok(Probe {
                            log,
                            tag: String::new(),
                        })
                    }
                })
                .shutdown(BUDGET),
            )
            .start()
            .await
            .expect("a node starts when one of its two endpoints is dead");
        nodes.push(handle);
    }
    let refs: Vec<&RuntimeHandle> = nodes.iter().collect();
    let (holder, token) = sole_holder(&refs, "solo").await;
    // Keep-alives that land on the dead endpoint are retried on the live
    // one: two TTLs later the same tenure still runs.
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(token_of(refs[holder], "solo"), Some(token));
    assert!(
        !log.lines().iter().any(|l| l.starts_with("stop")),
        "{:?}",
        log.lines()
    );
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_member_of_three_changes_nothing_for_holders() {
    highlander_tests::init_tracing();
    let cluster = EtcdCluster::start(3).await;
    let log = Log::default();
    let ids: Vec<String> = (0..30).map(|i| format!("task-{i}")).collect();
    let a = node_with(&cluster, "a", &ids, &log, MEMBER_TTL).await;
    let b = node_with(&cluster, "b", &ids, &log, MEMBER_TTL).await;
    let running = |nodes: &[&RuntimeHandle]| {
        let mut all: Vec<(String, String, u64)> = Vec::new();
        for n in nodes {
            all.extend(
                n.status()
                    .running()
                    .map(|(id, t)| (id.to_string(), n.node().to_string(), t)),
            );
        }
        all.sort();
        all
    };
    let before = within("all running", async {
        loop {
            let all = running(&[&a, &b]);
            if all.len() == ids.len() {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // A member that stops answering but keeps its connections open (the
    // leader: the worst case) is detected by request timeouts.
    let hung = cluster.leader();
    cluster.signal_member(hung, "STOP");
    tokio::time::sleep(MEMBER_TTL * 3).await;
    assert_eq!(
        before,
        running(&[&a, &b]),
        "no holder changed while a member hung"
    );
    let stops: Vec<String> = log
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("stop"))
        .collect();
    assert!(stops.is_empty(), "no instance stopped: {stops:?}");
    cluster.signal_member(hung, "CONT");
    a.shutdown().await;
    within(
        "b takes a's ids",
        b.wait_until(|s| s.running().count() == ids.len()),
    )
    .await;
    b.shutdown().await;
}

/// A graceful handoff while a member hangs with its connections open (the
/// leader, the worst case): the old holder's releases and the waiting
/// node's watch must not stay stuck on the silent member. Whichever member
/// each node's requests and watch happen to use, the waiting node runs every
/// id before the member comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_while_a_member_hangs_completes() {
    highlander_tests::init_tracing();
    let cluster = EtcdCluster::start(3).await;
    let log = Log::default();
    let ids: Vec<String> = (0..30).map(|i| format!("job-{i}")).collect();
    let a = node_with(&cluster, "a", &ids, &log, MEMBER_TTL).await;
    within(
        "a runs every id",
        a.wait_until(|s| s.running().count() == ids.len()),
    )
    .await;
    let b = node_with(&cluster, "b", &ids, &log, MEMBER_TTL).await;
    within(
        "b waits for every id",
        b.wait_until(|s| {
            ids.iter()
                .all(|id| matches!(s.get(id), Some(SingletonState::Waiting { .. })))
        }),
    )
    .await;
    let hung = cluster.leader();
    cluster.signal_member(hung, "STOP");
    // Let the others elect a new leader, then hand over.
    tokio::time::sleep(MEMBER_TTL).await;
    let started = std::time::Instant::now();
    a.shutdown().await;
    within(
        "b takes every id while a member hangs",
        b.wait_until(|s| s.running().count() == ids.len()),
    )
    .await;
    eprintln!(
        "handoff of {} ids with a hung member: {:?}",
        ids.len(),
        started.elapsed()
    );
    cluster.signal_member(hung, "CONT");
    b.shutdown().await;
}

/// A probe service spec for `id`.
fn probe(id: &str, log: &Log) -> ChildSpec {
    let log = log.clone();
    ChildSpec::new(id, move |_ctx| {
        let log = log.clone();
        async move {
            Ok(Probe {
                log,
                tag: String::new(),
            })
        }
    })
    .shutdown(BUDGET)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_namespaces_never_share_a_key() {
    let cluster = EtcdCluster::single().await;
    let log = Log::default();
    // Namespace `billing` + id `v2/x` and namespace `billing/v2` + id `x`
    // were the same key, `/billing/v2/x`: one of the two never ran.
    let a = Runtime::builder()
        .node("a")
        .backend(etcd(&cluster).namespace("billing"))
        .child(probe("v2/x", &log))
        .start()
        .await
        .unwrap();
    within("a runs v2/x", a.wait_until(|s| s.is_running("v2/x"))).await;
    let b = Runtime::builder()
        .node("b")
        .backend(etcd(&cluster).namespace("billing/v2"))
        .child(probe("x", &log))
        .start()
        .await
        .unwrap();
    within("b runs x beside a", b.wait_until(|s| s.is_running("x"))).await;
    assert!(a.status().is_running("v2/x"));
    let keys = cluster.etcdctl(&["get", "--prefix", "", "--keys-only"]);
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(keys.len(), 2, "two keys: {keys:?}");
    // Each node's watch covers its own namespace only: b's release wakes
    // nothing at a, and a's tenure goes on.
    b.shutdown().await;
    let quiet = tokio::time::timeout(Duration::from_millis(500), a.changed()).await;
    assert!(quiet.is_err(), "b's release reached a: {:?}", a.status());
    assert!(a.status().is_running("v2/x"));
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_key_deleted_while_the_watch_was_away_past_a_compaction_ends_the_tenure() {
    let mut cluster = EtcdCluster::start(3).await;
    let member = (cluster.leader() + 1) % 3;
    let log = Log::default();
    // The node talks to one follower only, so while that member is down its
    // watch has nowhere to go. The TTL is long: the lease outlives the
    // outage by far, so nothing but the watch and what follows it can end
    // the tenure.
    let backend = Etcd::new([cluster.endpoints()[member].clone()])
        .ttl(Duration::from_secs(30))
        .keepalive_interval(Duration::from_millis(250));
    let a = Runtime::builder()
        .node("a")
        .backend(backend)
        .child(probe("solo", &log))
        .start()
        .await
        .unwrap();
    within("a runs", a.wait_until(|s| s.is_running("solo"))).await;
    let token = token_of(&a, "solo").unwrap();
    cluster.kill_member(member);
    // From outside, while a's watch is down: delete a's key, write another
    // key, and compact the history past both, so the resumed watch starts
    // after the deletion and never sees it.
    cluster.etcdctl(&["del", "/highlander/solo"]);
    let put = cluster.etcdctl(&["put", "/elsewhere", "x", "-w", "json"]);
    let revision: u64 = put
        .split("\"revision\":")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a revision in {put}"));
    cluster.etcdctl(&["compact", &revision.to_string()]);
    cluster.restart_member(member).await;
    let lost = format!("stop solo a {token} lease lost");
    within("a's tenure of the deleted key ends", async {
        while !log.lines().contains(&lost) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    within(
        "a claims solo again, with a new token",
        a.wait_until(|s| s.running().any(|(id, t)| id == "solo" && t > token)),
    )
    .await;
    a.shutdown().await;
}

/// The session reports when this node must give its ids up if etcd stays
/// silent (the `highlander_lease_deadline_seconds` gauge): nothing while it
/// holds nothing, then a moment within one TTL that every keep-alive moves
/// forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_deadline_is_reported_while_ids_are_held() {
    let cluster = EtcdCluster::single().await;
    let log = Log::default();
    let observer = node(&cluster, "observer", &[], &log).await;
    let holder = node(&cluster, "holder", &["deadline".to_string()], &log).await;
    holder.wait_until(|s| s.is_running("deadline")).await;
    assert_eq!(observer.session().unwrap().lease_deadline(), None);
    let session = holder.session().unwrap();
    let first = session.lease_deadline().expect("a deadline while holding");
    let now = std::time::Instant::now();
    assert!(first > now && first < now + TTL, "{:?}", first - now);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let later = session.lease_deadline().expect("still held");
    assert!(later > first, "keep-alives move the deadline forward");
    holder.shutdown().await;
    observer.shutdown().await;
}
