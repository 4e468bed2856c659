//! The fleet scenarios (`highlander_tests::fleet`) on each backend: one test
//! per backend that runs every scenario (each in a space of its own; the
//! fixtures are in `highlander_tests::fixtures`). The second argument of
//! `run_all` says whether the backend promises that an id never runs on two
//! nodes at once, even across a handoff (not the embedded cluster, which is AP).

use highlander_tests::fixtures::{Embedded, EtcdFixture, Memory, Pg};
use highlander_tests::fleet::run_all;

/// The in-process memory backend, on the real clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory() {
    run_all(&Memory, true).await;
}

/// The embedded cluster over loopback TCP (AP: a handoff may overlap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster() {
    run_all(&Embedded, false).await;
}

/// Postgres: one server for every scenario.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    let pg = tokio::task::spawn_blocking(highlander_tests::postgres::PgServer::start)
        .await
        .expect("the Postgres harness starts");
    run_all(&Pg(pg.url()), true).await;
}

/// etcd: one single-member server for every scenario.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd() {
    let etcd = highlander_tests::etcd::EtcdCluster::single().await;
    run_all(&EtcdFixture(etcd.endpoints()), true).await;
}
