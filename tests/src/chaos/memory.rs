//! The in-process driver for the memory backend: one runtime per node on
//! one `MemoryCluster`, each running a probe per id that writes to the
//! fence register while it runs. A crash is an aborted runtime, a
//! partition the cluster's, a pause (one process cannot pause in part) a
//! partition too; a join a runtime under a new name, a leave a runtime shut
//! down for good, a drain `RuntimeHandle::drain` and later `resume`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use highlander::{MemoryCluster, Runtime, RuntimeHandle};

use super::config::{RunConfig, SHUTDOWN_MS};
use super::fence::Fence;
use super::history::{Exit, Fault, FaultKind, FenceWrite};
use super::run::Driver;
use crate::probe::{Kind, Probe};
use crate::process::{Event, EventKind};
use crate::unix_nanos;

/// How often a running instance writes to the fence.
const FENCE_EVERY: Duration = Duration::from_millis(20);

pub(super) struct MemoryDriver {
    cluster: MemoryCluster,
    ids: Vec<String>,
    /// The nodes in the fleet now, sorted.
    names: Vec<String>,
    /// How many nodes were ever started (the next joining node is
    /// `n{named}`).
    named: usize,
    rebalance: bool,
    handles: HashMap<String, RuntimeHandle>,
    probe: Probe,
    seen: Vec<Event>,
    fence: Fence,
}

impl MemoryDriver {
    pub(super) async fn start(cfg: &RunConfig) -> MemoryDriver {
        let mut d = MemoryDriver {
            cluster: MemoryCluster::new(),
            ids: cfg.ids.clone(),
            names: (0..cfg.nodes).map(|i| format!("n{i}")).collect(),
            named: cfg.nodes,
            rebalance: cfg.rebalance,
            handles: HashMap::new(),
            probe: Probe::new(),
            seen: Vec::new(),
            fence: Fence::new(),
        };
        for n in d.names.clone() {
            d.spawn(&n).await;
        }
        d
    }

    fn builder(&self, name: &str) -> highlander::Builder {
        let mut builder = Runtime::builder()
            .node(name)
            .backend(self.cluster.clone())
            .rebalance(self.rebalance);
        for id in &self.ids {
            let fence = self.fence.clone();
            let write = Arc::new(move |id: &str, token: u64, node: &str| {
                fence.write(id, token, node);
            });
            builder = builder.child(
                self.probe
                    .ticking_spec(id, FENCE_EVERY, write)
                    .shutdown(Duration::from_millis(SHUTDOWN_MS)),
            );
        }
        builder
    }

    async fn spawn(&mut self, name: &str) {
        // An aborted runtime lets go of its name once its tasks are
        // dropped, a moment after `abort`: retry until then.
        let mut tries = 0;
        let handle = loop {
            match self.builder(name).start().await {
                Ok(h) => break h,
                Err(e) if tries < 500 && e.to_string().contains("already connected") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("a memory runtime starts: {e}"),
            }
        };
        self.handles.insert(name.to_string(), handle);
    }
}

impl Driver for MemoryDriver {
    fn nodes(&self) -> Vec<String> {
        self.names.clone()
    }

    async fn collect(&mut self, wait: Duration) {
        tokio::time::sleep(wait).await;
        self.seen = self
            .probe
            .events()
            .into_iter()
            .filter_map(|e| {
                let (kind, reason) = match e.kind {
                    Kind::Start => (EventKind::Start, None),
                    Kind::Stop(reason) => {
                        (EventKind::Stop, Some(reason.to_string().replace(' ', "_")))
                    }
                    Kind::Cut => return None,
                };
                Some(Event {
                    kind,
                    at_nanos: e.at_nanos,
                    node: e.node,
                    id: e.id,
                    token: e.token,
                    reason,
                })
            })
            .collect();
    }

    fn events(&self) -> &[Event] {
        &self.seen
    }

    async fn kill(&mut self, node: &str) -> Fault {
        let at = unix_nanos();
        let h = self.handles.remove(node).expect("a running node");
        h.abort();
        h.stopped().await;
        self.spawn(node).await;
        Fault::new(FaultKind::Kill, Some(node), at, unix_nanos())
    }

    async fn pause(&mut self, node: &str, hold: Duration) -> Fault {
        // One process cannot be paused in part: a pause is a partition.
        let mut f = self.partition(node, hold).await;
        f.kind = FaultKind::Pause;
        f
    }

    async fn restart(&mut self, node: &str) -> (Fault, Option<String>) {
        let at = unix_nanos();
        let h = self.handles.remove(node).expect("a running node");
        h.shutdown().await;
        self.spawn(node).await;
        let fault = Fault::new(FaultKind::Restart, Some(node), at, unix_nanos());
        (fault, None)
    }

    async fn partition(&mut self, node: &str, hold: Duration) -> Fault {
        let at = unix_nanos();
        let others: Vec<&str> = self
            .names
            .iter()
            .map(String::as_str)
            .filter(|n| *n != node)
            .collect();
        self.cluster.partition(&[&[node], &others]);
        self.collect(hold).await;
        self.cluster.heal();
        Fault::new(FaultKind::Partition, Some(node), at, unix_nanos())
    }

    async fn backend_restart(&mut self) -> Fault {
        let now = unix_nanos();
        Fault::new(FaultKind::BackendRestart, None, now, now)
    }

    async fn join(&mut self) -> Fault {
        let name = format!("n{}", self.named);
        self.named += 1;
        let at = unix_nanos();
        self.spawn(&name).await;
        self.names.push(name.clone());
        self.names.sort();
        Fault::new(FaultKind::Join, Some(&name), at, unix_nanos())
    }

    async fn leave(&mut self, node: &str) -> (Fault, Option<String>) {
        let at = unix_nanos();
        let h = self.handles.remove(node).expect("a running node");
        let done = tokio::time::timeout(Duration::from_secs(30), h.shutdown()).await;
        self.names.retain(|n| n != node);
        let problem = done
            .is_err()
            .then(|| "did not shut down within 30 s".to_string());
        (
            Fault::new(FaultKind::Leave, Some(node), at, unix_nanos()),
            problem,
        )
    }

    async fn drain(&mut self, node: &str, hold: Duration) -> Fault {
        let at = unix_nanos();
        let h = self.handles[node].clone();
        let drained = match tokio::time::timeout(Duration::from_secs(30), h.drain()).await {
            Ok(Ok(())) => Some(unix_nanos()),
            Ok(Err(e)) => {
                eprintln!("chaos: the drain of {node} failed: {e}");
                None
            }
            Err(_) => None,
        };
        self.collect(hold).await;
        h.resume();
        let mut f = Fault::new(FaultKind::Drain, Some(node), at, unix_nanos());
        f.drained = drained;
        f
    }

    async fn shutdown(&mut self) -> Vec<Exit> {
        let mut exits = Vec::new();
        let mut names: Vec<String> = self.handles.keys().cloned().collect();
        names.sort();
        for name in names {
            let h = self.handles.remove(&name).expect("listed");
            let done = tokio::time::timeout(Duration::from_secs(30), h.shutdown()).await;
            exits.push(Exit {
                node: name,
                problem: done
                    .is_err()
                    .then(|| "did not shut down within 30 s".to_string()),
            });
        }
        exits
    }

    fn writes(&self) -> Vec<FenceWrite> {
        self.fence.log()
    }
}
