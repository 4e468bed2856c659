//! The etcd backend across OS processes (the `node` binary), against a real
//! etcd: a paused holder (SIGSTOP past the TTL), a killed holder (SIGKILL),
//! a graceful stop (SIGTERM). Times are compared on the one clock every
//! process on this host shares; deadlines are hang guards only.

use std::time::Duration;

use highlander_tests::etcd::EtcdCluster;
use highlander_tests::process::{EventKind, Fleet};
use highlander_tests::unix_nanos;

const TTL: Duration = Duration::from_secs(3);
const BUDGET_MS: &str = "300";
const GUARD: Duration = Duration::from_secs(60);
/// What the backend subtracts besides the stop budget: 1 % of the TTL for
/// clock rate error, and a 250 ms margin (see docs/etcd.md).
const MARGIN: Duration = Duration::from_millis(250);

fn fleet(cluster: &EtcdCluster) -> Fleet {
    let url = cluster.url_with(&format!("ttl={}s&keepalive=100ms", TTL.as_secs()));
    Fleet::new(
        env!("CARGO_BIN_EXE_node"),
        &url,
        &[("HL_IDS", "solo"), ("HL_SHUTDOWN_MS", BUDGET_MS)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_gives_up_before_anyone_else_starts() {
    let cluster = EtcdCluster::single().await;
    let mut fleet = fleet(&cluster);
    let a = fleet.spawn("a", &[]).await;
    let first = fleet.wait_start("solo", GUARD).await;
    assert_eq!(first.node, "a");
    let mut b = fleet.spawn("b", &[]).await;

    // Pause the holder for longer than the TTL.
    let paused_at = unix_nanos();
    a.signal("STOP");
    let second = fleet.wait_start("solo", GUARD).await;
    assert_eq!(second.node, "b", "only the other node can take over");
    assert!(
        second.token > first.token,
        "tokens grow: {} then {}",
        first.token,
        second.token
    );

    // No overlap. The paused holder's deadline to begin stopping is
    // last_keepalive_sent + TTL·(1 − 1 %) − margin − budget, and its last
    // keep-alive was sent before the pause, so that deadline is at most
    // `deadline` below. The new tenure must begin after it: from then on the
    // paused node may no longer act as holder, and it was frozen meanwhile;
    // on waking its first act is to stop (checked below).
    let budget = Duration::from_millis(BUDGET_MS.parse().unwrap());
    let deadline = paused_at + (TTL - TTL / 100 - MARGIN - budget).as_nanos();
    assert!(
        second.at_nanos > deadline,
        "b started {} ms after the pause, before a's deadline ({} ms)",
        (second.at_nanos - paused_at) / 1_000_000,
        (deadline - paused_at) / 1_000_000
    );

    // Wake the holder: the first thing it does is stop with lease_lost.
    let resumed_at = unix_nanos();
    a.signal("CONT");
    let stop = fleet.wait_for(GUARD, |e| e.node == "a").await;
    assert_eq!(
        stop.kind,
        EventKind::Stop,
        "a's first event after waking: {stop:?}"
    );
    assert_eq!(stop.token, first.token);
    assert_eq!(stop.reason.as_deref(), Some("lease_lost"), "{stop:?}");
    assert!(stop.at_nanos >= resumed_at);

    // It does not run the id again while b holds it; when b stops, a takes
    // over with a larger token.
    b.signal("TERM");
    let b_stop = fleet
        .wait_for(GUARD, |e| e.kind == EventKind::Stop && e.node == "b")
        .await;
    assert_eq!(b_stop.reason.as_deref(), Some("node_shutdown"));
    b.wait_exit(GUARD).await;
    let third = fleet
        .seen_or_wait(GUARD, |e| {
            e.kind == EventKind::Start && e.token > second.token
        })
        .await;
    assert_eq!(third.node, "a");
    assert!(third.token > second.token);
    let starts: Vec<u64> = fleet
        .history
        .iter()
        .filter(|e| e.kind == EventKind::Start)
        .map(|e| e.token)
        .collect();
    assert!(
        starts.windows(2).all(|w| w[0] < w[1]),
        "every tenure has a larger token than the one before: {:#?}",
        fleet.history
    );
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_is_replaced_after_its_lease_expires() {
    let cluster = EtcdCluster::single().await;
    let mut fleet = fleet(&cluster);
    let mut a = fleet.spawn("a", &[]).await;
    let first = fleet.wait_start("solo", GUARD).await;
    let _b = fleet.spawn("b", &[]).await;
    let killed_at = unix_nanos();
    a.signal("KILL");
    a.wait_exit(GUARD).await;
    let second = fleet.wait_start("solo", GUARD).await;
    assert_eq!(second.node, "b");
    assert!(second.token > first.token);
    // The server freed the id only once the dead node's lease expired: a TTL
    // after its last keep-alive (sent at most 100 ms before the kill).
    let earliest = killed_at + (TTL - Duration::from_millis(500)).as_nanos();
    assert!(
        second.at_nanos > earliest,
        "b started {} ms after the kill, before a's lease could expire",
        (second.at_nanos - killed_at) / 1_000_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_holder_hands_over_at_once() {
    let cluster = EtcdCluster::single().await;
    let mut fleet = fleet(&cluster);
    let mut a = fleet.spawn("a", &[]).await;
    let first = fleet.wait_start("solo", GUARD).await;
    let _b = fleet.spawn("b", &[]).await;
    a.signal("TERM");
    let stop = fleet.wait_for(GUARD, |e| e.kind == EventKind::Stop).await;
    assert_eq!(stop.reason.as_deref(), Some("node_shutdown"));
    let second = fleet.wait_start("solo", GUARD).await;
    assert_eq!(second.node, "b");
    assert!(second.token > first.token);
    assert!(second.at_nanos > stop.at_nanos, "b started after a stopped");
    let status = a.wait_exit(GUARD).await;
    assert!(status.success(), "a exits 0 after SIGTERM: {status}");
}
