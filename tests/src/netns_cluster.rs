//! A multi-node network of namespaces for real node processes: one network
//! namespace per node, all plugged into one bridge, with DNS names from
//! per-namespace hosts files, and link faults made with `iptables` where
//! packets arrive, so that the kernel (not a proxy of the test) drops them.
//!
//! # The network
//!
//! ```text
//!   host namespace            hub namespace (hlc-<pid>-<n>-hub)        node namespaces
//!   <host_if> .1  ──veth──  host ┐                                    ┌ eth0 .2  (hlc-…-a)
//!                                ├── br0 (bridge) ── p0, p1, p2 ──veth┼ eth0 .3  (hlc-…-b)
//!                                ┘                                    └ eth0 .4  (hlc-…-c)
//! ```
//!
//! - **The bridge lives in a namespace of its own** (the hub), not in the
//!   host: node-to-node traffic never crosses the host's netfilter (with
//!   `br_netfilter` loaded, bridged frames go through the bridge
//!   namespace's `FORWARD` chain, and a host with Docker sets that to
//!   `DROP`), nothing of the host's is reconfigured, and deleting the hub
//!   deletes the bridge and every port with it.
//! - **Each node namespace** has `lo` and one veth end, `eth0`, with one
//!   address of the topology's /24: node `i` is `.{i+2}`. All nodes can use
//!   the same port, each on its own address.
//! - **The host** is plugged into the bridge too, at `.1`
//!   ([`Topology::host_ip`]), so that the test can reach the nodes and the
//!   nodes a server of the test (both ways unfiltered). That puts the /24 in
//!   the host's routing table, so it is picked per test process and instance
//!   from `10.215.0.0/16` and skipped when the host already routes it.
//! - **Names**: `/etc/netns/<ns>/hosts` of every node namespace maps
//!   `<node>.node.test` to each node's address and `cluster.test` to ALL of
//!   them (one line per address; glibc's `getaddrinfo` returns every one),
//!   plus `host.test` for the host. `ip netns exec` bind-mounts that file
//!   over `/etc/hosts` for the program it runs, so names resolve inside
//!   ([`Topology::exec_prefix`]). `.test` is reserved (RFC 2606): these
//!   names can never mean a real host.
//!
//! # Faults
//!
//! Every node namespace has an `iptables` chain `HL` jumped to first from
//! `INPUT`; every fault is a rule in it, so [`Topology::heal`] is one flush
//! per namespace and leaves no stray rule. Rules drop packets **where they
//! arrive**: the sender's kernel sees nothing but silence (no RST, no ICMP),
//! as when a cable is pulled.
//!
//! - [`partition`](Topology::partition): each node drops what comes from any
//!   node of another side (symmetric).
//! - [`one_way`](Topology::one_way): the `to` nodes drop what comes from the
//!   `from` nodes; the other direction flows (so does the TCP handshake's
//!   first half, never its answer).
//! - [`flap`](Topology::flap): a partition cut and healed on a schedule.
//! - [`loss`](Topology::loss): every node drops each arriving packet on
//!   `eth0` with a probability (`-m statistic --mode random`; `tc netem`
//!   would need the `sch_netem` module, which not every kernel has).
//!
//! # Clean-up
//!
//! Dropping the [`Topology`] (also while a test panics) kills whatever still
//! runs in its node namespaces, deletes the namespaces (their veths, rules
//! and the bridge go with them), the host's veth and `/etc/netns/<ns>`
//! (and `/etc/netns` itself when that leaves it empty). A test process
//! killed before it could drop leaves its namespaces behind; the next
//! [`Topology::create`] deletes those of processes that no longer exist.
//!
//! Needs root, `ip` (iproute2), `iptables` with the `statistic` match,
//! `nsenter` (util-linux) and `ss`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::netns::run;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Namespace names of this harness start with this, then `<pid>-`.
const PREFIX: &str = "hlc-";

/// The chain every fault rule goes to.
const CHAIN: &str = "HL";

/// The shared name that resolves to every node's address.
pub const CLUSTER_NAME: &str = "cluster.test";

/// One node's namespace.
struct NodeNs {
    name: String,
    ns: String,
    ip: Ipv4Addr,
}

/// A bridge, one namespace per node and the host plugged in; deleted on
/// drop. See the [module documentation](self).
pub struct Topology {
    hub: String,
    host_if: String,
    net: [u8; 3],
    nodes: Vec<NodeNs>,
}

/// Runs a command, ignoring whether it works (clean-up of what may not exist).
fn quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn ns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

fn etc_dir(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

/// Deletes namespace `ns` after killing what runs in it, and its /etc dir.
fn delete_ns(ns: &str) {
    if let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
    {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            quiet(&["kill", "-KILL", pid]);
        }
    }
    quiet(&["ip", "netns", "del", ns]);
    let _ = std::fs::remove_dir_all(etc_dir(ns));
}

/// Deletes the namespaces (and /etc dirs) this harness left behind in
/// processes that are gone (killed before their `Topology` was dropped).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    let etc: Vec<String> = std::fs::read_dir("/etc/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let names = listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .chain(etc);
    for ns in names {
        let Some(pid) = ns
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete_ns(&ns);
        }
    }
}

/// Picks a /24 of 10.215.0.0/16 that the host does not route yet.
fn pick_net(pid: u32, n: u32) -> [u8; 3] {
    let routes = run(&["ip", "-4", "route", "show"]);
    let start = (u128::from(pid) * 7919 + u128::from(n) * 104_729 + crate::unix_nanos()) % 256;
    for k in 0..256u128 {
        let third = ((start + k) % 256) as u8;
        if !routes.contains(&format!("10.215.{third}.")) {
            return [10, 215, third];
        }
    }
    panic!("every /24 of 10.215.0.0/16 is routed already; delete stale test networks");
}

impl Topology {
    /// Builds the network for nodes `names` (at most 200; names of letters,
    /// digits and `-`). Panics with the reason when a step fails; whatever
    /// was made by then is deleted as the half-built value drops.
    pub fn create(names: &[&str]) -> Topology {
        assert!(names.len() <= 200, "at most 200 nodes");
        remove_stale();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let net = pick_net(pid, n);
        let base = format!("{PREFIX}{pid}-{n}");
        let topo = Topology {
            hub: format!("{base}-hub"),
            // pid in hex (at most 6 digits on Linux) and the instance: at
            // most 15 bytes, as interface names must be.
            host_if: format!("hlc{pid:x}x{n}"),
            net,
            nodes: names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    assert!(
                        name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
                        "node name `{name}`: letters, digits and - only"
                    );
                    NodeNs {
                        name: name.to_string(),
                        ns: format!("{base}-{name}"),
                        ip: Ipv4Addr::new(net[0], net[1], net[2], i as u8 + 2),
                    }
                })
                .collect(),
        };
        assert!(topo.host_if.len() <= 15, "interface name too long");
        // From here on, Drop deletes whatever was made.
        let hub = topo.hub.as_str();
        run(&["ip", "netns", "add", hub]);
        run(&["ip", "-n", hub, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", hub, "link", "set", "br0", "up"]);
        run(&[
            "ip",
            "link",
            "add",
            &topo.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "host",
            "netns",
            hub,
        ]);
        run(&["ip", "-n", hub, "link", "set", "host", "master", "br0"]);
        run(&["ip", "-n", hub, "link", "set", "host", "up"]);
        let host_cidr = format!("{}/24", topo.host_ip());
        run(&["ip", "addr", "add", &host_cidr, "dev", &topo.host_if]);
        run(&["ip", "link", "set", &topo.host_if, "up"]);
        let hosts = topo.hosts_file();
        for (i, node) in topo.nodes.iter().enumerate() {
            let ns = node.ns.as_str();
            let port = format!("p{i}");
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            run(&[
                "ip", "-n", hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ]);
            run(&["ip", "-n", hub, "link", "set", &port, "master", "br0"]);
            run(&["ip", "-n", hub, "link", "set", &port, "up"]);
            let cidr = format!("{}/24", node.ip);
            run(&["ip", "-n", ns, "addr", "add", &cidr, "dev", "eth0"]);
            // An IPv6 address too (no duplicate detection: usable at once),
            // for dual-stack names.
            let cidr6 = format!("{}/64", topo.ip6(&node.name));
            run(&[
                "ip", "-n", ns, "addr", "add", &cidr6, "dev", "eth0", "nodad",
            ]);
            run(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
            let path = ns_path(ns);
            let net = format!("--net={path}");
            run(&["nsenter", &net, "iptables", "-w", "-N", CHAIN]);
            run(&[
                "nsenter", &net, "iptables", "-w", "-I", "INPUT", "-j", CHAIN,
            ]);
            write_hosts(ns, &hosts);
        }
        topo
    }

    fn hosts_file(&self) -> String {
        let all: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        self.hosts_naming(&all)
    }

    /// The hosts file with `cluster.test` standing for `members` only.
    fn hosts_naming(&self, members: &[&str]) -> String {
        let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost\n");
        hosts.push_str(&format!("{} host.test\n", self.host_ip()));
        for node in &self.nodes {
            hosts.push_str(&format!("{} {}\n", node.ip, Self::dns(&node.name)));
        }
        for node in &self.nodes {
            let dual = Self::dual_dns(&node.name);
            hosts.push_str(&format!(
                "{} {dual}\n{} {dual}\n",
                node.ip,
                self.ip6(&node.name)
            ));
        }
        for node in self
            .nodes
            .iter()
            .filter(|n| members.contains(&n.name.as_str()))
        {
            hosts.push_str(&format!("{} {CLUSTER_NAME}\n", node.ip));
        }
        hosts
    }

    /// Rewrites every namespace's hosts file so that `cluster.test` resolves
    /// to the addresses of `members` only, as DNS does when pods come and go
    /// behind a headless Service.
    pub fn name_cluster(&self, members: &[&str]) {
        let hosts = self.hosts_naming(members);
        for node in &self.nodes {
            write_hosts(&node.ns, &hosts);
        }
    }

    /// The DNS name of node `name` inside the namespaces: `<name>.node.test`.
    pub fn dns(name: &str) -> String {
        format!("{name}.node.test")
    }

    /// The host's address on the bridge (`.1`), `host.test` inside.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 1)
    }

    /// The topology's subnet, `a.b.c.0/24`.
    pub fn subnet(&self) -> String {
        format!("{}.{}.{}.0/24", self.net[0], self.net[1], self.net[2])
    }

    fn node(&self, name: &str) -> &NodeNs {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node `{name}` in this topology"))
    }

    /// The node names, in the order given to [`create`](Self::create).
    pub fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Node `name`'s address.
    pub fn ip(&self, name: &str) -> Ipv4Addr {
        self.node(name).ip
    }

    /// Node `name`'s IPv6 address (a unique local address beside its IPv4
    /// one on the same bridge).
    pub fn ip6(&self, name: &str) -> std::net::Ipv6Addr {
        let v4 = self.node(name).ip.octets();
        std::net::Ipv6Addr::new(
            0xfd15,
            u16::from(v4[0]),
            u16::from(v4[1]),
            u16::from(v4[2]),
            0,
            0,
            0,
            u16::from(v4[3]),
        )
    }

    /// A dual-stack DNS name of node `name` inside the namespaces:
    /// `<name>.dual.test`, resolving to its IPv4 and its IPv6 address.
    pub fn dual_dns(name: &str) -> String {
        format!("{name}.dual.test")
    }

    /// Node `name`'s namespace (as `ip netns list` shows it).
    pub fn namespace(&self, name: &str) -> String {
        self.node(name).ns.clone()
    }

    /// Every namespace of the topology, the hub's included.
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(self.hub.clone())
            .chain(self.nodes.iter().map(|n| n.ns.clone()))
            .collect()
    }

    /// `ip netns exec <ns>`: put it before a program to run it in node
    /// `name`'s namespace with that namespace's hosts file as `/etc/hosts`
    /// (`ip` execs the program: the child's pid is the program's).
    pub fn exec_prefix(&self, name: &str) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.node(name).ns.clone(),
        ]
    }

    fn iptables(&self, name: &str, rule: &[&str]) {
        let net = format!("--net={}", ns_path(&self.node(name).ns));
        let mut args = vec!["nsenter", &net, "iptables", "-w"];
        args.extend_from_slice(rule);
        run(&args);
    }

    /// Makes node `to` drop every packet arriving from node `from`.
    fn drop_from(&self, to: &str, from: &str) {
        let src = self.ip(from).to_string();
        self.iptables(to, &["-A", CHAIN, "-s", &src, "-j", "DROP"]);
    }

    /// Cuts every link between nodes of different sides, both ways.
    pub fn partition(&self, sides: &[&[&str]]) {
        for (i, side) in sides.iter().enumerate() {
            for other in &sides[i + 1..] {
                for a in *side {
                    for b in *other {
                        self.drop_from(a, b);
                        self.drop_from(b, a);
                    }
                }
            }
        }
    }

    /// Cuts the links from each `from` node to each `to` node in that
    /// direction only: the `to` nodes drop what the `from` nodes send, and
    /// what they send the `from` nodes arrives.
    pub fn one_way(&self, from: &[&str], to: &[&str]) {
        for t in to {
            for f in from {
                self.drop_from(t, f);
            }
        }
    }

    /// Every node drops each packet arriving on `eth0` with `probability`
    /// (0 to 1), independently: packet loss on every link, both ways.
    pub fn loss(&self, probability: f64) {
        assert!((0.0..=1.0).contains(&probability), "a probability");
        let p = format!("{probability}");
        for node in &self.nodes {
            self.iptables(
                &node.name,
                &[
                    "-A",
                    CHAIN,
                    "-i",
                    "eth0",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ],
            );
        }
    }

    /// Removes every fault: all links carry everything again.
    pub fn heal(&self) {
        for node in &self.nodes {
            self.iptables(&node.name, &["-F", CHAIN]);
        }
    }

    /// How many fault rules are in place, over all nodes.
    pub fn rules(&self) -> usize {
        self.nodes
            .iter()
            .map(|node| {
                let net = format!("--net={}", ns_path(&node.ns));
                run(&["nsenter", &net, "iptables", "-w", "-S", CHAIN])
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .count()
            })
            .sum()
    }

    /// A flapping link: for each `(cut, up)` of `schedule`, partitions
    /// `sides`, waits `cut`, heals, waits `up`. Ends healed.
    pub async fn flap(&self, sides: &[&[&str]], schedule: &[(Duration, Duration)]) {
        for (cut, up) in schedule {
            self.partition(sides);
            tokio::time::sleep(*cut).await;
            self.heal();
            tokio::time::sleep(*up).await;
        }
    }

    /// Whether node `a`'s namespace has an established TCP connection to
    /// node `b`'s address. Established sockets outlive a dead link for the
    /// kernel's retransmission limit (minutes): when there is none, both
    /// ends' programs have closed theirs.
    pub fn established(&self, a: &str, b: &str) -> bool {
        let net = format!("--net={}", ns_path(&self.node(a).ns));
        let dst = self.ip(b).to_string();
        !run(&[
            "nsenter",
            &net,
            "ss",
            "-Htn",
            "state",
            "established",
            "dst",
            &dst,
        ])
        .trim()
        .is_empty()
    }
}

/// Writes `/etc/netns/<ns>/hosts`. Another process may remove an empty
/// `/etc/netns` in between (its own clean-up), so this retries.
fn write_hosts(ns: &str, hosts: &str) {
    let dir = etc_dir(ns);
    let mut last = None;
    for _ in 0..10 {
        match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join("hosts"), hosts))
        {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
    }
    panic!("cannot write {}/hosts: {last:?}", dir.display());
}

impl Drop for Topology {
    fn drop(&mut self) {
        for node in &self.nodes {
            delete_ns(&node.ns);
        }
        delete_ns(&self.hub);
        // Usually gone with the hub (its peer was there); not if the hub
        // was never made.
        quiet(&["ip", "link", "del", &self.host_if]);
        // Only when empty: other tests' dirs stay.
        let _ = std::fs::remove_dir("/etc/netns");
    }
}
