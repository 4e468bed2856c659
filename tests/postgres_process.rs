//! Three OS processes of the `node` binary on a real Postgres: SIGKILL the
//! holder and another process takes over with a larger token; SIGTERM the
//! next holder and the last one takes over at once (NOTIFY).

use std::time::Duration;

use highlander_tests::postgres::PgServer;
use highlander_tests::process::{EventKind, Fleet};

const GUARD: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_the_holder_process_and_another_takes_over() {
    let pg = PgServer::start();
    let mut fleet = Fleet::new(env!("CARGO_BIN_EXE_node"), &pg.url(), &[("HL_IDS", "solo")]);
    let mut nodes = Vec::new();
    for name in ["p1", "p2", "p3"] {
        nodes.push(fleet.spawn(name, &[]).await);
    }
    let first = fleet.wait_start("solo", GUARD).await;
    let holder = nodes.iter().position(|n| n.name == first.node).unwrap();
    nodes[holder].signal("KILL");
    nodes[holder].wait_exit(GUARD).await;

    let second = fleet.wait_start("solo", GUARD).await;
    assert_ne!(second.node, first.node);
    assert!(second.token > first.token, "{second:?} after {first:?}");

    // Graceful: SIGTERM stops the instance, releases, and the last node
    // takes over.
    let next = nodes.iter().position(|n| n.name == second.node).unwrap();
    nodes[next].signal("TERM");
    let stop = fleet
        .wait_for(GUARD, |e| {
            e.kind == EventKind::Stop && e.node == second.node
        })
        .await;
    assert_eq!(stop.reason.as_deref(), Some("node_shutdown"));
    let third = fleet
        .seen_or_wait(GUARD, |e| {
            e.kind == EventKind::Start && e.node != first.node && e.node != second.node
        })
        .await;
    assert!(third.node != first.node && third.node != second.node);
    assert!(third.token > second.token);
    assert!(
        third.at_nanos >= stop.at_nanos,
        "{third:?} began before {stop:?}"
    );
    assert!(nodes[next].wait_exit(GUARD).await.success());

    // Exactly one START per tenure: nobody else started meanwhile.
    let starts = fleet
        .history
        .iter()
        .filter(|e| e.kind == EventKind::Start)
        .count();
    assert_eq!(starts, 3, "{:#?}", fleet.history);
    for (i, node) in nodes.iter().enumerate() {
        if i != holder && i != next {
            node.signal("TERM");
        }
    }
}

/// A paused holder (SIGSTOP) keeps its session: its kernel still answers
/// TCP, so the server frees nothing and nobody else starts. When it
/// resumes, its deadline has passed: it stops its instance with
/// `lease_lost` first, and only then closes the connection, so the next
/// holder starts after that stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_stops_before_anyone_else_starts() {
    let pg = PgServer::start();
    // Server timeout 3 s; the holder vouches for 3 s × 0.99 − 0.5 s − 0.2 s
    // = 2.27 s after its last round trip.
    let url = format!(
        "{}?server_timeout=3s&heartbeat=200ms&margin=200ms",
        pg.url()
    );
    let mut fleet = Fleet::new(
        env!("CARGO_BIN_EXE_node"),
        &url,
        &[("HL_IDS", "paused"), ("HL_SHUTDOWN_MS", "500")],
    );
    let mut q1 = fleet.spawn("q1", &[]).await;
    let first = fleet.wait_start("paused", GUARD).await;
    assert_eq!(first.node, "q1");
    let mut q2 = fleet.spawn("q2", &[]).await;

    q1.signal("STOP");
    // Longer than the server timeout and the holder's deadline: nothing
    // happens while it is paused.
    let during = fleet.next_event(Duration::from_secs(4)).await;
    assert!(during.is_none(), "{during:?} while the holder was paused");
    q1.signal("CONT");

    let stop = fleet
        .wait_for(GUARD, |e| e.kind == EventKind::Stop && e.node == "q1")
        .await;
    assert_eq!(stop.reason.as_deref(), Some("lease_lost"));
    let next = fleet
        .seen_or_wait(GUARD, |e| e.kind == EventKind::Start && e.node == "q2")
        .await;
    assert_eq!(next.node, "q2");
    assert!(next.token > first.token);
    assert!(
        stop.at_nanos < next.at_nanos,
        "q2 started before q1 had stopped: {stop:?} {next:?}"
    );
    q1.signal("TERM");
    q2.signal("TERM");
    assert!(q1.wait_exit(GUARD).await.success());
    assert!(q2.wait_exit(GUARD).await.success());
}
