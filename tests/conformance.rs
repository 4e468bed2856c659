//! The scenarios every backend must pass (`highlander_tests::conformance`),
//! run on each backend: one test per backend that runs every scenario on one
//! server (each scenario in a namespace, or a cluster, of its own; the
//! fixtures are in `highlander_tests::fixtures`). What is particular to a
//! backend is tested in its own file.

use highlander_tests::conformance::run_all;
use highlander_tests::fixtures::{Embedded, EtcdFixture, Memory, Pg};

/// The in-process memory backend, on tokio's paused clock.
#[tokio::test(start_paused = true)]
async fn memory() {
    run_all(&Memory).await;
}

/// The embedded cluster over loopback TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster() {
    run_all(&Embedded).await;
}

/// Postgres: one server for every scenario.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    let pg = tokio::task::spawn_blocking(highlander_tests::postgres::PgServer::start)
        .await
        .expect("the Postgres harness starts");
    run_all(&Pg(pg.url())).await;
}

/// etcd: one single-member server for every scenario.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd() {
    let etcd = highlander_tests::etcd::EtcdCluster::single().await;
    run_all(&EtcdFixture(etcd.endpoints())).await;
}
