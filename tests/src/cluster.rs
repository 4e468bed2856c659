//! Harness for the cluster backend's tests: free loopback ports, per-node
//! loopback addresses, and a fault-injecting TCP proxy that partitions real
//! processes.
//!
//! # Partitioning real processes
//!
//! Each node `i` listens on its own loopback address `127.0.0.{10+i}` (the
//! cluster backend sends its outgoing connections from its listen address)
//! and advertises the address of its [`Partitioner`] proxy instead. Every
//! connection to a node therefore passes through that node's proxy, which
//! knows the destination (whose proxy it is) and the source (by the source
//! address). While the pair is cut, new connections are closed at once and
//! data on existing ones is dropped, and such a connection never carries
//! data again (it would be a corrupted stream), so both ends see silence
//! and time out, as in a real netsplit.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub use crate::{free_port, free_ports};

/// The loopback address node number `i` listens on in partition tests.
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 10 + i as u8)
}

/// A port free on `ip` a moment ago.
pub fn free_port_on(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .expect("bind a free port")
        .local_addr()
        .expect("bound")
        .port()
}

#[derive(Default)]
struct Cuts {
    pairs: HashSet<(String, String)>,
}

impl Cuts {
    fn key(a: &str, b: &str) -> (String, String) {
        if a <= b {
            (a.to_string(), b.to_string())
        } else {
            (b.to_string(), a.to_string())
        }
    }
    fn is_cut(&self, a: &str, b: &str) -> bool {
        self.pairs.contains(&Cuts::key(a, b))
    }
}

/// One proxy per node; cuts and heals links between named nodes, and can
/// record what crosses them and corrupt it.
pub struct Partitioner {
    cuts: Arc<Mutex<Cuts>>,
    tap: Arc<Tap>,
    by_ip: Arc<Mutex<HashMap<IpAddr, String>>>,
    proxies: HashMap<String, SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Default for Partitioner {
    fn default() -> Self {
        Partitioner::new()
    }
}

impl Partitioner {
    /// No proxies yet, nothing cut.
    pub fn new() -> Self {
        Partitioner {
            cuts: Arc::default(),
            tap: Arc::default(),
            by_ip: Arc::default(),
            proxies: HashMap::new(),
            tasks: Vec::new(),
        }
    }

    /// Starts the proxy in front of node `name`, which listens on `target`
    /// and sends its own connections from `target`'s IP. Returns the proxy
    /// address, which the node must advertise (and others use as seed).
    pub async fn add(&mut self, name: &str, target: SocketAddr) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy port");
        let addr = listener.local_addr().expect("bound");
        self.by_ip
            .lock()
            .unwrap()
            .insert(target.ip(), name.to_string());
        self.proxies.insert(name.to_string(), addr);
        let cuts = self.cuts.clone();
        let tap = self.tap.clone();
        let by_ip = self.by_ip.clone();
        let dest = name.to_string();
        self.tasks.push(tokio::spawn(async move {
            loop {
                let Ok((inbound, from)) = listener.accept().await else {
                    continue;
                };
                let source = by_ip
                    .lock()
                    .unwrap()
                    .get(&from.ip())
                    .cloned()
                    .unwrap_or_default();
                if cuts.lock().unwrap().is_cut(&source, &dest) {
                    drop(inbound);
                    continue;
                }
                let cuts = cuts.clone();
                let tap = tap.clone();
                let dest = dest.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let poisoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let link = Link {
                        cuts,
                        tap,
                        source,
                        dest,
                        poisoned,
                    };
                    let a = pump(ri, wo, &link);
                    let b = pump(ro, wi, &link);
                    tokio::join!(a, b);
                });
            }
        }));
        addr
    }

    /// The proxy address of node `name`.
    pub fn proxy(&self, name: &str) -> SocketAddr {
        self.proxies[name]
    }

    /// Cuts every link between nodes of different sides.
    pub fn partition(&self, sides: &[&[&str]]) {
        let mut cuts = self.cuts.lock().unwrap();
        for (i, side) in sides.iter().enumerate() {
            for other in &sides[i + 1..] {
                for a in *side {
                    for b in *other {
                        cuts.pairs.insert(Cuts::key(a, b));
                    }
                }
            }
        }
    }

    /// Heals every link.
    pub fn heal(&self) {
        self.cuts.lock().unwrap().pairs.clear();
    }

    /// Every byte that crossed any proxy so far (the first 16 MiB), both
    /// directions interleaved: what someone on the network would see.
    pub fn captured(&self) -> Vec<u8> {
        self.tap.bytes.lock().unwrap().clone()
    }

    /// Flips one bit in the next chunk any proxy forwards: an attacker or a
    /// faulty middlebox altering a frame on the way.
    pub fn corrupt_next(&self) {
        self.tap
            .corrupt
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many chunks [`corrupt_next`](Self::corrupt_next) has altered.
    pub fn corrupted(&self) -> usize {
        self.tap.corrupted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[derive(Default)]
struct Tap {
    bytes: Mutex<Vec<u8>>,
    corrupt: std::sync::atomic::AtomicBool,
    corrupted: std::sync::atomic::AtomicUsize,
}

/// One proxied connection, as both of its pumps see it.
struct Link {
    cuts: Arc<Mutex<Cuts>>,
    tap: Arc<Tap>,
    source: String,
    dest: String,
    poisoned: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Partitioner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: &Link,
) {
    use std::sync::atomic::Ordering;
    let poisoned = &link.poisoned;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !poisoned.load(Ordering::SeqCst)
            && link.cuts.lock().unwrap().is_cut(&link.source, &link.dest)
        {
            poisoned.store(true, Ordering::SeqCst);
        }
        if poisoned.load(Ordering::SeqCst) {
            continue;
        }
        {
            let mut seen = link.tap.bytes.lock().unwrap();
            let room = (16usize << 20).saturating_sub(seen.len());
            seen.extend_from_slice(&buf[..n.min(room)]);
        }
        if link.tap.corrupt.swap(false, Ordering::SeqCst) {
            // The chunk's last byte ends a frame: its MAC, or its payload.
            buf[n - 1] ^= 0x01;
            link.tap.corrupted.fetch_add(1, Ordering::SeqCst);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A `cluster://` URL for a node listening on `listen` with `seeds`, and
/// advertising `advertise` when given.
pub fn cluster_url(listen: &str, advertise: Option<&str>, seeds: &[String]) -> String {
    let mut url = format!("cluster://{listen}?seeds={}", seeds.join(","));
    if let Some(a) = advertise {
        url.push_str(&format!("&advertise={a}"));
    }
    url
}

/// `(name, HIGHLANDER_BACKEND)` for nodes that each listen on a free port
/// of 127.0.0.1, every node a seed of every other.
pub fn direct_nodes(names: &[&str]) -> Vec<(String, String)> {
    let addrs: Vec<String> = free_ports(names.len())
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    names
        .iter()
        .zip(&addrs)
        .map(|(n, a)| (n.to_string(), cluster_url(a, None, &addrs)))
        .collect()
}

/// `(name, HIGHLANDER_BACKEND)` for nodes behind `partitioner`'s proxies:
/// node `i` listens on `node_ip(i)` and advertises its proxy.
pub async fn proxied_nodes(names: &[&str], partitioner: &mut Partitioner) -> Vec<(String, String)> {
    let mut listens = Vec::new();
    let mut proxies = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let ip = node_ip(i);
        let listen = SocketAddr::new(IpAddr::V4(ip), free_port_on(ip));
        proxies.push(partitioner.add(name, listen).await.to_string());
        listens.push(listen.to_string());
    }
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                n.to_string(),
                cluster_url(&listens[i], Some(&proxies[i]), &proxies),
            )
        })
        .collect()
}

/// Which nodes run each id, from a history of `node` events.
pub fn live(history: &[crate::process::Event]) -> HashMap<String, Vec<String>> {
    use crate::process::EventKind;
    let mut live: HashMap<String, Vec<String>> = HashMap::new();
    for e in history {
        let nodes = live.entry(e.id.clone()).or_default();
        match e.kind {
            EventKind::Start => nodes.push(e.node.clone()),
            EventKind::Stop => {
                if let Some(i) = nodes.iter().position(|n| *n == e.node) {
                    nodes.remove(i);
                }
            }
        }
    }
    live
}

/// Connections that open and then say nothing, as a flood of strangers
/// would: `count` of them to `target`, from `source`, each opened again
/// shortly after the target closes it.
pub struct IdleFlood {
    opened: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl IdleFlood {
    /// Starts the flood. Raises this process's open-file limit as far as
    /// needed (panics when the hard limit does not allow `count` sockets).
    pub fn start(target: SocketAddr, source: IpAddr, count: usize) -> IdleFlood {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        let want = count as u64 + 1024;
        if limit.current.is_some_and(|n| n < want) {
            assert!(
                limit.maximum.is_none_or(|max| max >= want),
                "the flood needs {want} open files; the hard limit is {:?} (raise it with ulimit -Hn)",
                limit.maximum
            );
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(want),
                    maximum: limit.maximum,
                },
            )
            .expect("raise the open-file limit");
        }
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks = (0..count)
            .map(|_| {
                let opened = opened.clone();
                tokio::spawn(async move {
                    loop {
                        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
                        if socket.bind(SocketAddr::new(source, 0)).is_ok()
                            && let Ok(mut stream) = socket.connect(target).await
                        {
                            opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            // Idle: read until the target closes it.
                            let mut buf = [0u8; 64];
                            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                })
            })
            .collect();
        IdleFlood { opened, tasks }
    }

    /// How many connections were opened so far.
    pub fn opened(&self) -> usize {
        self.opened.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for IdleFlood {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
