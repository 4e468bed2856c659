//! etcd behind a silent link, on a real network: the etcd server runs in a
//! network namespace of its own, the holder and a standby in theirs, all on
//! one bridge (`highlander_tests::netns_cluster`). Cutting the holder's link
//! to the server drops packets where they arrive (iptables DROP): nothing is
//! refused or closed, exactly as when a cable is pulled, unlike a TCP proxy
//! whose kernel keeps answering.

use std::time::Duration;

use highlander_tests::etcd::EtcdCluster;
use highlander_tests::netns_cluster::Topology;
use highlander_tests::process::{EventKind, Fleet};

const GUARD: Duration = Duration::from_secs(60);

/// The holder, cut off from etcd while the standby still reaches it, stops
/// its instance with `lease_lost` on its own deadline (the last keep-alive
/// + TTL·0.99 − budget − margin), so the standby, which starts only once the
/// server has expired the holder's lease, starts after that stop: never two
/// tenures at once, judged on the one clock the host's processes share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cut_off_from_etcd_stops_before_the_standby_starts() {
    let topo = tokio::task::block_in_place(|| Topology::create(&["srv", "h", "s"]));
    let etcd = EtcdCluster::single_in(topo.exec_prefix("srv"), topo.ip("srv")).await;
    let url = etcd.url_with("ttl=3s");
    let mut fleet = Fleet::new(
        env!("CARGO_BIN_EXE_node"),
        &url,
        &[("HL_IDS", "fenced"), ("HL_SHUTDOWN_MS", "500")],
    );
    let _h = fleet.spawn_in("h", &[], &topo.exec_prefix("h")).await;
    let first = fleet.wait_start("fenced", GUARD).await;
    assert_eq!(first.node, "h");
    let _s = fleet.spawn_in("s", &[], &topo.exec_prefix("s")).await;
    fleet.drain(Duration::from_millis(500)).await;

    topo.partition(&[&["h"], &["srv"]]);
    let stop = fleet
        .wait_for(GUARD, |e| e.kind == EventKind::Stop && e.node == "h")
        .await;
    assert_eq!(stop.reason.as_deref(), Some("lease_lost"), "{stop:?}");
    let next = fleet
        .seen_or_wait(GUARD, |e| e.kind == EventKind::Start && e.node == "s")
        .await;
    assert!(next.token > first.token, "{next:?} after {first:?}");
    assert!(
        next.at_nanos >= stop.at_nanos,
        "s started {} ms before h had stopped",
        (stop.at_nanos - next.at_nanos) as f64 / 1e6
    );
    println!(
        "holder stopped; the standby started {:.0} ms later",
        (next.at_nanos - stop.at_nanos) as f64 / 1e6
    );
    topo.heal();
}
