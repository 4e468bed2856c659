//! The etcd backend driven through the runtime, against a real etcd started
//! by the harness: several runtimes in this process, each its own node with
//! its own etcd lease. `conformance.rs` runs what every backend must do (one
//! holder, handoffs, crashes, step-down, tokens, many ids, shutdown); here
//! is what is particular to etcd: keys and leases, revocation, auth, member
//! failures, watches. Deadlines here are hang guards, never timing claims.

use std::collections::HashSet;
use std::time::Duration;

use highlander::backend::etcd::Etcd;
use highlander::{ChildSpec, Runtime, RuntimeHandle, ShutdownReason, SingletonState};
use highlander_tests::etcd::EtcdCluster;
use highlander_tests::probe::Probe;
use highlander_tests::wait::{self, GUARD, holder, is_waiting, token_of, total_running, wait_all};

/// A short TTL keeps the tests fast; the instances stop well within it.
const TTL: Duration = Duration::from_secs(3);
const BUDGET: Duration = Duration::from_millis(300);

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

/// A probe service spec for `id`.
fn probe_spec(probe: &Probe, id: &str) -> ChildSpec {
    probe.spec(id).shutdown(BUDGET)
}

async fn node(cluster: &EtcdCluster, name: &str, ids: &[String], probe: &Probe) -> RuntimeHandle {
    node_with(cluster, name, ids, probe, TTL).await
}

async fn node_with(
    cluster: &EtcdCluster,
    name: &str,
    ids: &[String],
    probe: &Probe,
    ttl: Duration,
) -> RuntimeHandle {
    // The backend's own promises: ids stay where first claimed.
    let mut builder = Runtime::builder()
        .node(name)
        .backend(etcd_with(cluster, ttl))
        .rebalance(false);
    for id in ids {
        builder = builder.child(probe_spec(probe, id));
    }
    builder.start().await.expect("the runtime starts on etcd")
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    wait::within(what, GUARD, f).await
}

/// Every id `nodes` run, with its node and token, sorted.
fn running(nodes: &[&RuntimeHandle]) -> Vec<(String, String, u64)> {
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
}

/// The key names the holder; revoking the holder's lease from outside ends
/// its tenure with `LeaseLost` at once and a node takes over with a larger
/// token; once every node has left, no key is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_names_the_holder_and_a_revoked_lease_is_taken_over() {
    let cluster = EtcdCluster::single().await;
    let probe = Probe::new();
    let ids = vec!["solo".to_string()];
    let a = node(&cluster, "a", &ids, &probe).await;
    let b = node(&cluster, "b", &ids, &probe).await;
    let nodes = [&a, &b];
    let held = holder(&nodes, "solo", GUARD).await;
    assert_eq!(
        cluster
            .etcdctl(&["get", "/highlander/solo", "--print-value-only"])
            .trim(),
        held.node
    );

    // Revoke the holder's lease from outside: it loses the id at once, and a
    // node takes over with a larger token. Usually the other node wins, but
    // the revoked node gets a new lease and claims again, so on a busy
    // machine it may win the race: either is a correct takeover. The keys
    // go with the lease at once, before the holder can hear of it: its
    // tenure ends here.
    probe.cut(&held.node);
    let lease = cluster
        .lease_of("/highlander/solo")
        .expect("the key has a lease");
    cluster.etcdctl(&["lease", "revoke", &lease]);
    probe
        .wait_stop(&held.node, "solo", &ShutdownReason::LeaseLost)
        .await;
    // The revoked tenure may still show in status for a moment after its
    // terminate: wait for a tenure other than it.
    wait_all(&nodes, "a tenure after the revoked one", GUARD, || {
        let tenures = running(&nodes);
        tenures.len() == 1 && tenures[0].2 != held.token
    })
    .await;
    let next = holder(&nodes, "solo", GUARD).await;
    assert!(
        next.token > held.token,
        "tokens grow across takeovers: {} then {}",
        held.token,
        next.token
    );
    nodes[1 - next.index].shutdown().await;
    nodes[next.index].shutdown().await;
    probe.assert_one_at_a_time();
    assert_eq!(
        cluster
            .etcdctl(&["get", "--prefix", "/highlander/", "--keys-only"])
            .trim(),
        "",
        "every key is gone"
    );
}

/// A thousand ids on three nodes: one lease per node, one key per id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_ids_on_three_nodes_with_one_lease_each() {
    let cluster = EtcdCluster::single().await;
    let probe = Probe::new();
    let ids: Vec<String> = (0..1000).map(|i| format!("tenant-{i}")).collect();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(node(&cluster, name, &ids, &probe).await);
    }
    let all: Vec<&RuntimeHandle> = nodes.iter().collect();
    wait_all(&all, "every id running once", GUARD, || {
        total_running(&all) == ids.len()
    })
    .await;
    let owners: HashSet<String> = running(&all).into_iter().map(|(id, _, _)| id).collect();
    assert_eq!(owners.len(), 1000, "every id runs once");
    let leases = cluster.leases();
    assert_eq!(leases.len(), 3, "one lease per node: {leases:?}");
    // The ids' keys: `[/highlander/, /highlander/~)` (members are under `~`).
    let keys = cluster.etcdctl(&["get", "/highlander/", "/highlander/~", "--keys-only"]);
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 1000);
    for n in &nodes {
        n.shutdown().await;
    }
    probe.assert_one_at_a_time();
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

    let probe = Probe::new();
    let backend = Etcd::new(cluster.endpoints())
        .ttl(TTL)
        .user("root", "r00t-Secret");
    assert!(!format!("{backend:?}").contains("r00t-Secret"));
    let handle = Runtime::builder()
        .node("authed")
        .backend(backend)
        .child(probe_spec(&probe, "guarded"))
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
            Probe::new()
                .spec("slow-stopper")
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
    let probe = Probe::new();
    let ids: Vec<String> = (0..50).map(|i| format!("job-{i}")).collect();
    let a = node_with(&cluster, "a", &ids, &probe, MEMBER_TTL).await;
    let b = node_with(&cluster, "b", &ids, &probe, MEMBER_TTL).await;
    wait_all(&[&a, &b], "all running", GUARD, || {
        total_running(&[&a, &b]) == ids.len()
    })
    .await;
    let before = running(&[&a, &b]);
    // Load: a third node keeps asking for every id while a member dies.
    let c = node_with(&cluster, "c", &ids, &probe, MEMBER_TTL).await;
    // Kill the leader: the hardest member to lose (an election follows,
    // during which keep-alives fail).
    let leader = cluster.leader();
    cluster.kill_member(leader);
    // Ride through several TTLs with a member gone.
    tokio::time::sleep(MEMBER_TTL * 3).await;
    assert_eq!(
        before,
        running(&[&a, &b, &c]),
        "no holder changed while one member of three died"
    );
    let stops = probe.filter(|e| e.is_stop());
    assert!(stops.is_empty(), "no instance stopped: {stops:?}");
    // Graceful handoff still works on the two survivors.
    a.shutdown().await;
    wait_all(&[&b, &c], "b and c taking a's ids", GUARD, || {
        total_running(&[&b, &c]) == ids.len()
    })
    .await;
    b.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_from_etcd_a_holder_gives_up_claims_nothing_and_comes_back() {
    let mut cluster = EtcdCluster::single().await;
    let probe = Probe::new();
    let ids = vec!["solo".to_string()];
    let a = node(&cluster, "a", &ids, &probe).await;
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
    probe
        .wait_stop("a", "solo", &ShutdownReason::LeaseLost)
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
    assert_eq!(probe.starts("solo").len(), 1, "{probe:?}");

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
    let probe = Probe::new();
    let ids = vec!["solo".to_string()];
    let a = node(&cluster, "a", &ids, &probe).await;
    within("a runs", a.wait_until(|s| s.is_running("solo"))).await;
    let b = node(&cluster, "b", &ids, &probe).await;
    within("b waits", b.wait_until(|s| is_waiting(s, "solo"))).await;
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

/// Revoking a node's lease from outside ends every tenure under it with
/// `LeaseLost`, and every id then runs once more on a larger token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_nodes_lease_ends_all_its_tenures_at_once() {
    let cluster = EtcdCluster::single().await;
    let probe = Probe::new();
    let ids: Vec<String> = (0..20).map(|i| format!("part-{i}")).collect();
    let a = node(&cluster, "a", &ids, &probe).await;
    within(
        "a runs all",
        a.wait_until(|s| s.running().count() == ids.len()),
    )
    .await;
    let b = node(&cluster, "b", &ids, &probe).await;
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
    let before = running(&[&a]);
    cluster.etcdctl(&["lease", "revoke", &a_lease]);
    probe
        .wait_for("a stopping every id with lease lost", |events| {
            events
                .iter()
                .filter(|e| e.node == "a" && e.reason() == Some(&ShutdownReason::LeaseLost))
                .count()
                == ids.len()
        })
        .await;
    // Every id runs again, once, on a new tenure. Mostly on b, which saw the
    // keys go at once; but a gets a new lease within moments and, as the ids'
    // last holder, claims without deferring, so on a loaded machine it may win
    // some back. Either is right: what matters is one holder per id.
    wait::wait_until("every id runs again exactly once", GUARD, || {
        let now = running(&[&a, &b]);
        let mut seen: Vec<&str> = now.iter().map(|(id, _, _)| id.as_str()).collect();
        seen.dedup();
        seen.len() == ids.len() && now.len() == ids.len()
    })
    .await;
    for (id, node, token) in running(&[&a, &b]) {
        let (_, _, old) = before.iter().find(|(i, _, _)| *i == id).expect("a ran it");
        assert!(
            token > *old,
            "{id} on {node}: token {token} not above {old}"
        );
    }
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
    let probe = Probe::new();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let backend = Etcd::new([dead.clone(), cluster.endpoints()[0].clone()])
            .ttl(TTL)
            .keepalive_interval(Duration::from_millis(250));
        let handle = Runtime::builder()
            .node(name)
            .backend(backend)
            .rebalance(false)
            .child(probe_spec(&probe, "solo"))
            .start()
            .await
            .expect("a node starts when one of its two endpoints is dead");
        nodes.push(handle);
    }
    let refs: Vec<&RuntimeHandle> = nodes.iter().collect();
    let held = holder(&refs, "solo", GUARD).await;
    // Keep-alives that land on the dead endpoint are retried on the live
    // one: two TTLs later the same tenure still runs.
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(token_of(refs[held.index], "solo"), Some(held.token));
    assert!(probe.filter(|e| e.is_stop()).is_empty(), "{probe:?}");
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_member_of_three_changes_nothing_for_holders() {
    highlander_tests::init_tracing();
    let cluster = EtcdCluster::start(3).await;
    let probe = Probe::new();
    let ids: Vec<String> = (0..30).map(|i| format!("task-{i}")).collect();
    let a = node_with(&cluster, "a", &ids, &probe, MEMBER_TTL).await;
    let b = node_with(&cluster, "b", &ids, &probe, MEMBER_TTL).await;
    wait_all(&[&a, &b], "all running", GUARD, || {
        total_running(&[&a, &b]) == ids.len()
    })
    .await;
    let before = running(&[&a, &b]);
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
    let stops = probe.filter(|e| e.is_stop());
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
    let probe = Probe::new();
    let ids: Vec<String> = (0..30).map(|i| format!("job-{i}")).collect();
    let a = node_with(&cluster, "a", &ids, &probe, MEMBER_TTL).await;
    within(
        "a runs every id",
        a.wait_until(|s| s.running().count() == ids.len()),
    )
    .await;
    let b = node_with(&cluster, "b", &ids, &probe, MEMBER_TTL).await;
    within(
        "b waits for every id",
        b.wait_until(|s| ids.iter().all(|id| is_waiting(s, id))),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_namespaces_never_share_a_key() {
    let cluster = EtcdCluster::single().await;
    let probe = Probe::new();
    // Namespace `billing` + id `v2/x` and namespace `billing/v2` + id `x`
    // were the same key, `/billing/v2/x`: one of the two never ran.
    let a = Runtime::builder()
        .node("a")
        .backend(etcd(&cluster).namespace("billing"))
        .child(probe_spec(&probe, "v2/x"))
        .start()
        .await
        .unwrap();
    within("a runs v2/x", a.wait_until(|s| s.is_running("v2/x"))).await;
    let b = Runtime::builder()
        .node("b")
        .backend(etcd(&cluster).namespace("billing/v2"))
        .child(probe_spec(&probe, "x"))
        .start()
        .await
        .unwrap();
    within("b runs x beside a", b.wait_until(|s| s.is_running("x"))).await;
    assert!(a.status().is_running("v2/x"));
    let keys = cluster.etcdctl(&["get", "--prefix", "", "--keys-only"]);
    let keys: Vec<&str> = keys
        .lines()
        .filter(|l| !l.is_empty() && !l.contains("/~"))
        .collect();
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
    let probe = Probe::new();
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
        .child(probe_spec(&probe, "solo"))
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
    let lost = probe
        .wait_stop("a", "solo", &ShutdownReason::LeaseLost)
        .await;
    assert_eq!(lost.token, token, "a's tenure of the deleted key ends");
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
    let probe = Probe::new();
    let observer = node(&cluster, "observer", &[], &probe).await;
    let holder = node(&cluster, "holder", &["deadline".to_string()], &probe).await;
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
