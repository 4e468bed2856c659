//! The backend fixtures that the conformance suite (`tests/conformance.rs`)
//! and the fleet suite (`tests/fleet.rs`) both run on: how each backend gives
//! every scenario a space of its own.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use highlander::MemoryCluster;
use highlander::backend::Backend;
use highlander::backend::cluster::Cluster;
use highlander::backend::etcd::Etcd;
use highlander::backend::postgres::Postgres;

use crate::conformance::{Fixture, Space};

/// A space whose every node gets the same backend configuration.
struct Same<B>(B);

impl<B: Backend + Clone> Space for Same<B> {
    fn backend(&self, _node: &str) -> Box<dyn Backend> {
        Box::new(self.0.clone())
    }
}

/// The in-process memory backend: a new `MemoryCluster` per scenario.
pub struct Memory;

impl Fixture for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn space(&self, _scenario: &str) -> Box<dyn Space> {
        Box::new(Same(MemoryCluster::new()))
    }
}

/// The embedded cluster over loopback TCP: a new cluster per scenario,
/// each node listening on a free port and seeded with the nodes started
/// before it (the latest incarnation of each other name).
pub struct Embedded;

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
        // The latest incarnation of every other name.
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
            .cookie("suite test cookie")
            .seeds(seeds);
        nodes.push((node.to_string(), cluster.clone()));
        Box::new(cluster)
    }
}

/// Postgres at the URL it holds: one server, a namespace per scenario.
pub struct Pg(pub String);

impl Fixture for Pg {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn space(&self, scenario: &str) -> Box<dyn Space> {
        Box::new(Same(Postgres::new(self.0.clone()).namespace(scenario)))
    }
}

/// etcd at the endpoints it holds: a namespace per scenario, a short TTL so
/// that a crashed holder's lease expires soon.
pub struct EtcdFixture(pub Vec<String>);

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
