//! The driver of node processes (the `node` binary, or for the BEAM
//! comparison `tests/beam/node.sh`) on a real backend: Postgres or etcd
//! behind a proxy per node, an embedded cluster behind the harness's
//! partitioning proxies or in network namespaces. Faults are signals,
//! cuts and server restarts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::config::{Backend, ETCD_TTL_S, PG_SERVER_TIMEOUT, RunConfig, SHUTDOWN_MS};
use super::epmd::Epmd;
use super::fence::{Fence, FenceServer};
use super::history::{Exit, Fault, FaultKind, FenceWrite};
use super::proxy::BackendProxy;
use super::run::Driver;
use crate::process::{Event, Fleet, NodeProcess};
use crate::unix_nanos;

enum Server {
    Postgres(crate::postgres::PgServer),
    Etcd(crate::etcd::EtcdCluster),
    Cluster(crate::cluster::Partitioner),
    ClusterNetns(crate::netns_cluster::Topology),
    Beam {
        epmd_port: u16,
        ctl_dir: PathBuf,
        _epmd: Epmd,
    },
}

pub(super) struct ProcessDriver {
    backend: Backend,
    fleet: Fleet,
    procs: HashMap<String, NodeProcess>,
    /// The nodes in the fleet now (a left node is gone for good), sorted.
    live: Vec<String>,
    /// How many nodes were ever started under a name of their own (the
    /// next joining node is `n{named}`).
    named: usize,
    /// When each node's current process was started.
    spawned_at: HashMap<String, u128>,
    urls: HashMap<String, String>,
    proxies: HashMap<String, BackendProxy>,
    /// Per node, what its binary is run through (`ip netns exec <ns>`).
    prefixes: HashMap<String, Vec<String>>,
    server: Server,
    fence: Fence,
    _fence_server: FenceServer,
}

const COOKIE: &str = "chaos-cookie-not-a-real-secret";

impl ProcessDriver {
    pub(super) async fn start(cfg: &RunConfig) -> ProcessDriver {
        let names: Vec<String> = (0..cfg.nodes).map(|i| format!("n{i}")).collect();
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let fence = Fence::new();
        let mut topology = (cfg.backend == Backend::Cluster && cfg.netns).then(|| {
            tokio::task::block_in_place(|| crate::netns_cluster::Topology::create(&name_refs))
        });
        // Nodes in namespaces reach the host at its address on their bridge.
        let fence_ip = topology.as_ref().map_or_else(
            || std::net::Ipv4Addr::LOCALHOST.into(),
            |t| t.host_ip().into(),
        );
        let fence_server = fence.serve_on(fence_ip).await;
        let mut proxies = HashMap::new();
        let mut urls = HashMap::new();
        let mut prefixes = HashMap::new();
        let server = match cfg.backend {
            Backend::Postgres => {
                let pg = tokio::task::spawn_blocking(crate::postgres::PgServer::start)
                    .await
                    .expect("the Postgres harness starts");
                let target: SocketAddr = ([127, 0, 0, 1], pg.port()).into();
                for n in &names {
                    let proxy = BackendProxy::start(target, Some(PG_SERVER_TIMEOUT)).await;
                    let url = pg.url().replace(
                        &format!(":{}/", pg.port()),
                        &format!(":{}/", proxy.addr.port()),
                    );
                    urls.insert(n.clone(), url);
                    proxies.insert(n.clone(), proxy);
                }
                Server::Postgres(pg)
            }
            Backend::Etcd => {
                let etcd = crate::etcd::EtcdCluster::single().await;
                let target: SocketAddr = etcd.endpoints()[0].parse().expect("an etcd endpoint");
                for n in &names {
                    let proxy = BackendProxy::start(target, None).await;
                    urls.insert(
                        n.clone(),
                        format!("etcd://{}/highlander?ttl={ETCD_TTL_S}s", proxy.addr),
                    );
                    proxies.insert(n.clone(), proxy);
                }
                Server::Etcd(etcd)
            }
            Backend::Cluster if topology.is_some() => {
                let topo = topology.take().expect("just checked");
                // Every node listens on its namespace's address, seeds by name.
                let seeds: Vec<String> = names
                    .iter()
                    .map(|n| format!("{}:7400", crate::netns_cluster::Topology::dns(n)))
                    .collect();
                for n in &names {
                    let url = format!("cluster://{}:7400?seeds={}", topo.ip(n), seeds.join(","));
                    urls.insert(n.clone(), url);
                    prefixes.insert(n.clone(), topo.exec_prefix(n));
                }
                Server::ClusterNetns(topo)
            }
            Backend::Cluster => {
                let mut partitioner = crate::cluster::Partitioner::new();
                for (n, url) in crate::cluster::proxied_nodes(&name_refs, &mut partitioner).await {
                    urls.insert(n, url);
                }
                Server::Cluster(partitioner)
            }
            Backend::Beam => {
                let ctl_dir = std::env::temp_dir().join(format!(
                    "hl-beam-{}-{}",
                    std::process::id(),
                    unix_nanos() % 1_000_000_000
                ));
                std::fs::create_dir_all(&ctl_dir).expect("create the BEAM control dir");
                for n in &names {
                    urls.insert(n.clone(), "beam".to_string());
                }
                let epmd_port = crate::cluster::free_port();
                Server::Beam {
                    epmd_port,
                    ctl_dir,
                    _epmd: Epmd(epmd_port),
                }
            }
            Backend::Memory => unreachable!("memory runs in-process"),
        };
        let shutdown = SHUTDOWN_MS.to_string();
        let fence_addr = fence_server.addr.to_string();
        let mut env: Vec<(String, String)> = vec![
            ("HL_IDS".into(), cfg.ids.join(",")),
            ("HL_SHUTDOWN_MS".into(), shutdown),
            ("HL_FENCE_ADDR".into(), fence_addr),
            ("HIGHLANDER_COOKIE".into(), COOKIE.into()),
            (
                "HL_REBALANCE".into(),
                if cfg.rebalance { "1" } else { "0" }.into(),
            ),
        ];
        let mut bin = cfg.node_bin.clone();
        if let Server::Beam {
            epmd_port, ctl_dir, ..
        } = &server
        {
            bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("beam/node.sh");
            let peers: Vec<String> = names.iter().map(|n| format!("{n}@127.0.0.1")).collect();
            env.extend([
                ("HL_PEERS".into(), peers.join(",")),
                ("HL_CTL_DIR".into(), ctl_dir.display().to_string()),
                ("ERL_EPMD_PORT".into(), epmd_port.to_string()),
                ("ERL_EPMD_ADDRESS".into(), "127.0.0.1".into()),
            ]);
        }
        let env_refs: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let fleet = Fleet::new(&bin, "", &env_refs);
        let mut driver = ProcessDriver {
            backend: cfg.backend,
            fleet,
            procs: HashMap::new(),
            live: names.clone(),
            named: names.len(),
            spawned_at: HashMap::new(),
            urls,
            proxies,
            prefixes,
            server,
            fence,
            _fence_server: fence_server,
        };
        for n in &names {
            driver.spawn(n).await;
        }
        driver
    }

    async fn spawn(&mut self, name: &str) {
        let url = self.urls[name].clone();
        let prefix = self.prefixes.get(name).cloned().unwrap_or_default();
        self.spawned_at.insert(name.to_string(), unix_nanos());
        let p = self
            .fleet
            .spawn_in(name, &[("HIGHLANDER_BACKEND", url.as_str())], &prefix)
            .await;
        self.procs.insert(name.to_string(), p);
    }

    /// The backend URL of a node that joins the fleet now, as `index`-th
    /// node ever: a proxy of its own to the server (Postgres, etcd), or a
    /// listener behind the partitioning proxies with the live nodes as
    /// seeds (cluster). Joins are not in the mix in network namespaces (made
    /// once, at the start) nor for the BEAM.
    async fn add_url(&mut self, name: &str, index: usize) -> String {
        match &mut self.server {
            Server::Postgres(pg) => {
                let target: SocketAddr = ([127, 0, 0, 1], pg.port()).into();
                let proxy = BackendProxy::start(target, Some(PG_SERVER_TIMEOUT)).await;
                let url = pg.url().replace(
                    &format!(":{}/", pg.port()),
                    &format!(":{}/", proxy.addr.port()),
                );
                self.proxies.insert(name.to_string(), proxy);
                url
            }
            Server::Etcd(etcd) => {
                let target: SocketAddr = etcd.endpoints()[0].parse().expect("an etcd endpoint");
                let proxy = BackendProxy::start(target, None).await;
                let url = format!("etcd://{}/highlander?ttl={ETCD_TTL_S}s", proxy.addr);
                self.proxies.insert(name.to_string(), proxy);
                url
            }
            Server::Cluster(partitioner) => {
                let ip = crate::cluster::node_ip(index);
                let listen = SocketAddr::new(ip.into(), crate::cluster::free_port_on(ip));
                let own = partitioner.add(name, listen).await.to_string();
                // Not its own seed: it joins the cluster that is there
                // rather than founding one of its own.
                let seeds: Vec<String> = self
                    .live
                    .iter()
                    .map(|n| partitioner.proxy(n).to_string())
                    .collect();
                crate::cluster::cluster_url(&listen.to_string(), Some(&own), &seeds)
            }
            Server::ClusterNetns(_) | Server::Beam { .. } => {
                panic!("a node cannot join a {} run here", self.backend.name())
            }
        }
    }

    /// The ids `node`'s current process runs now, from its `START` and
    /// `STOP` lines, and when the last of them stopped.
    fn running_on(&self, node: &str) -> (usize, u128) {
        let since = self.spawned_at.get(node).copied().unwrap_or(0);
        let mut open = std::collections::HashSet::new();
        let mut last_stop = 0;
        for e in self
            .fleet
            .history
            .iter()
            .filter(|e| e.node == node && e.at_nanos >= since)
        {
            match e.kind {
                crate::process::EventKind::Start => {
                    open.insert((e.id.as_str(), e.token));
                }
                crate::process::EventKind::Stop => {
                    open.remove(&(e.id.as_str(), e.token));
                    last_stop = last_stop.max(e.at_nanos);
                }
            }
        }
        (open.len(), last_stop)
    }
}

impl Driver for ProcessDriver {
    fn nodes(&self) -> Vec<String> {
        self.live.clone()
    }

    async fn collect(&mut self, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || self.fleet.next_event(left).await.is_none() {
                return;
            }
        }
    }

    fn events(&self) -> &[Event] {
        &self.fleet.history
    }

    async fn kill(&mut self, node: &str) -> Fault {
        let at = unix_nanos();
        let mut p = self.procs.remove(node).expect("a running node");
        p.signal("KILL");
        let _ = p.wait_exit(Duration::from_secs(30)).await;
        self.spawn(node).await;
        Fault::new(FaultKind::Kill, Some(node), at, unix_nanos())
    }

    async fn pause(&mut self, node: &str, hold: Duration) -> Fault {
        let at = unix_nanos();
        self.procs[node].signal("STOP");
        self.collect(hold).await;
        self.procs[node].signal("CONT");
        Fault::new(FaultKind::Pause, Some(node), at, unix_nanos())
    }

    async fn restart(&mut self, node: &str) -> (Fault, Option<String>) {
        let at = unix_nanos();
        let mut p = self.procs.remove(node).expect("a running node");
        p.signal("TERM");
        let status = p.wait_exit(Duration::from_secs(30)).await;
        let problem = (!status.success()).then(|| format!("after SIGTERM: {status}"));
        self.spawn(node).await;
        let fault = Fault::new(FaultKind::Restart, Some(node), at, unix_nanos());
        (fault, problem)
    }

    async fn partition(&mut self, node: &str, hold: Duration) -> Fault {
        let at = unix_nanos();
        match &self.server {
            Server::Cluster(p) => {
                let others: Vec<String> = self.nodes().into_iter().filter(|n| n != node).collect();
                let others: Vec<&str> = others.iter().map(String::as_str).collect();
                p.partition(&[&[node], &others]);
            }
            Server::ClusterNetns(t) => {
                let others: Vec<String> = self.nodes().into_iter().filter(|n| n != node).collect();
                let others: Vec<&str> = others.iter().map(String::as_str).collect();
                tokio::task::block_in_place(|| t.partition(&[&[node], &others]));
            }
            Server::Beam { ctl_dir, .. } => {
                std::fs::write(ctl_dir.join(node), "cut").expect("write the BEAM control file")
            }
            _ => self.proxies[node].cut(),
        }
        self.collect(hold).await;
        match &self.server {
            Server::Cluster(p) => p.heal(),
            Server::ClusterNetns(t) => tokio::task::block_in_place(|| t.heal()),
            Server::Beam { ctl_dir, .. } => {
                std::fs::write(ctl_dir.join(node), "heal").expect("write the BEAM control file")
            }
            _ => self.proxies[node].heal(),
        }
        Fault::new(FaultKind::Partition, Some(node), at, unix_nanos())
    }

    async fn backend_restart(&mut self) -> Fault {
        let at = unix_nanos();
        match &mut self.server {
            Server::Postgres(pg) => tokio::task::block_in_place(|| pg.restart()),
            Server::Etcd(etcd) => {
                etcd.kill_member(0);
                etcd.restart_member(0).await;
            }
            Server::Cluster(_) | Server::ClusterNetns(_) | Server::Beam { .. } => {}
        }
        let _ = self.backend;
        Fault::new(FaultKind::BackendRestart, None, at, unix_nanos())
    }

    async fn join(&mut self) -> Fault {
        let index = self.named;
        self.named += 1;
        let name = format!("n{index}");
        let at = unix_nanos();
        let url = self.add_url(&name, index).await;
        self.urls.insert(name.clone(), url);
        self.spawn(&name).await;
        self.live.push(name.clone());
        self.live.sort();
        Fault::new(FaultKind::Join, Some(&name), at, unix_nanos())
    }

    async fn leave(&mut self, node: &str) -> (Fault, Option<String>) {
        let at = unix_nanos();
        let mut p = self.procs.remove(node).expect("a running node");
        p.signal("TERM");
        let status = p.wait_exit(Duration::from_secs(30)).await;
        let problem = (!status.success()).then(|| format!("after SIGTERM: {status}"));
        self.live.retain(|n| n != node);
        (
            Fault::new(FaultKind::Leave, Some(node), at, unix_nanos()),
            problem,
        )
    }

    async fn drain(&mut self, node: &str, hold: Duration) -> Fault {
        let at = unix_nanos();
        self.procs[node].signal("USR1");
        let guard = tokio::time::Instant::now() + Duration::from_secs(30);
        let drained = loop {
            self.collect(Duration::from_millis(20)).await;
            let (running, last_stop) = self.running_on(node);
            if running == 0 {
                break Some(last_stop.max(at));
            }
            if tokio::time::Instant::now() > guard {
                break None;
            }
        };
        self.collect(hold).await;
        self.procs[node].signal("USR2");
        let mut f = Fault::new(FaultKind::Drain, Some(node), at, unix_nanos());
        f.drained = drained;
        f
    }

    async fn shutdown(&mut self) -> Vec<Exit> {
        for p in self.procs.values() {
            p.signal("TERM");
        }
        let mut exits = Vec::new();
        let mut names: Vec<String> = self.procs.keys().cloned().collect();
        names.sort();
        for name in names {
            let mut p = self.procs.remove(&name).expect("listed");
            let status = p.wait_exit(Duration::from_secs(30)).await;
            let mut problem = (!status.success()).then(|| format!("after SIGTERM: {status}"));
            // Reaped: no process of that pid may be left.
            let alive = std::process::Command::new("kill")
                .arg("-0")
                .arg(p.pid().to_string())
                .stderr(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if alive {
                problem = Some(format!("pid {} still running", p.pid()));
            }
            exits.push(Exit {
                node: name,
                problem,
            });
        }
        if let Server::Beam { ctl_dir, _epmd, .. } = &self.server {
            // The first node started epmd as a daemon: stop it too.
            _epmd.kill();
            let _ = std::fs::remove_dir_all(ctl_dir);
        }
        exits
    }

    fn writes(&self) -> Vec<FenceWrite> {
        self.fence.log()
    }
}
