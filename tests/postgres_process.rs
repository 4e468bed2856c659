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
    let third = fleet.wait_start("solo", GUARD).await;
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
