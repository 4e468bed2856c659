//! The fleet scenarios (`highlander_tests::fleet`) on each backend: one
//! module per backend, each with its fixture and one test that runs every
//! scenario (each in a space of its own).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use highlander::backend::Backend;
use highlander_tests::conformance::{Fixture, Space};
use highlander_tests::fleet::run_all;

/// A space whose every node gets the same backend configuration.
struct Same<B>(B);

impl<B: Backend + Clone> Space for Same<B> {
    fn backend(&self, _node: &str) -> Box<dyn Backend> {
        Box::new(self.0.clone())
    }
}

/// The in-process memory backend, on the real clock: a new
/// `MemoryCluster` per scenario.
mod memory {
    use super::*;
    use highlander::MemoryCluster;

    struct Memory;

    impl Fixture for Memory {
        fn name(&self) -> &'static str {
            "memory"
        }

        fn space(&self, _scenario: &str) -> Box<dyn Space> {
            Box::new(Same(MemoryCluster::new()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_scenario() {
        run_all(&Memory, true).await;
    }
}

/// The embedded cluster over loopback TCP (AP: a handoff may overlap), a
/// new cluster per scenario, each node seeded with the nodes started
/// before it.
mod cluster {
    use super::*;
    use highlander::backend::cluster::Cluster;

    struct Embedded;

    impl Fixture for Embedded {
        fn name(&self) -> &'static str {
            "cluster"
        }

        fn space(&self, _scenario: &str) -> Box<dyn Space> {
            Box::new(Nodes::default())
        }
    }

    /// The configuration of every node started so far, in start order.
    #[derive(Default)]
    struct Nodes(Mutex<Vec<(String, Cluster)>>);

    impl Space for Nodes {
        fn backend(&self, node: &str) -> Box<dyn Backend> {
            let mut nodes = self.0.lock().unwrap();
            let mut latest: BTreeMap<&str, &Cluster> = BTreeMap::new();
            for (name, cluster) in nodes.iter().filter(|(name, _)| name != node) {
                latest.insert(name, cluster);
            }
            let seeds: Vec<String> = latest
                .values()
                .filter_map(|c| c.local_addr())
                .map(|a| a.to_string())
                .collect();
            let cluster = Cluster::new("127.0.0.1:0")
                .cookie("fleet test cookie")
                .seeds(seeds);
            nodes.push((node.to_string(), cluster.clone()));
            Box::new(cluster)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_scenario() {
        run_all(&Embedded, false).await;
    }
}

/// Postgres: one server, a namespace per scenario.
mod postgres {
    use super::*;
    use highlander::backend::postgres::Postgres;
    use highlander_tests::postgres::PgServer;

    struct Pg(String);

    impl Fixture for Pg {
        fn name(&self) -> &'static str {
            "postgres"
        }

        fn space(&self, scenario: &str) -> Box<dyn Space> {
            Box::new(Same(Postgres::new(self.0.clone()).namespace(scenario)))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_scenario() {
        let pg = tokio::task::spawn_blocking(PgServer::start)
            .await
            .expect("the Postgres harness starts");
        run_all(&Pg(pg.url()), true).await;
    }
}

/// etcd: one single-member server, a namespace per scenario.
mod etcd {
    use super::*;
    use highlander::backend::etcd::Etcd;
    use highlander_tests::etcd::EtcdCluster;

    struct EtcdFixture(Vec<String>);

    impl Fixture for EtcdFixture {
        fn name(&self) -> &'static str {
            "etcd"
        }

        fn space(&self, scenario: &str) -> Box<dyn Space> {
            Box::new(Same(
                Etcd::new(self.0.clone())
                    .namespace(scenario)
                    .ttl(Duration::from_secs(3))
                    .keepalive_interval(Duration::from_millis(250)),
            ))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_scenario() {
        let etcd = EtcdCluster::single().await;
        run_all(&EtcdFixture(etcd.endpoints()), true).await;
    }
}
