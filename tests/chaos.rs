//! Short seeded chaos runs of every backend (the long runs and their last
//! results are in `docs/chaos.md`). Each run fails with the offending pair
//! when the checker finds a broken promise; the checker itself is tested on
//! hand-made bad histories in `highlander_tests::chaos::checker`.

use highlander_tests::chaos::{Backend, RunConfig, run};

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn chaos(backend: Backend, faults: usize, seed: u64) {
    let _turn = TURN.lock().await;
    let mut cfg = RunConfig::new(backend, faults, seed, env!("CARGO_BIN_EXE_node").into());
    cfg.quick = true;
    let outcome = run(&cfg).await;
    println!("{}", outcome.summary());
    assert_eq!(
        outcome.history.faults.len(),
        faults,
        "every fault was injected"
    );
    assert!(outcome.verdict.passed(), "{}", outcome.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_chaos() {
    chaos(Backend::Memory, 40, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_chaos() {
    chaos(Backend::Postgres, 24, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_chaos() {
    chaos(Backend::Etcd, 16, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_chaos() {
    chaos(Backend::Cluster, 24, 7).await;
}
