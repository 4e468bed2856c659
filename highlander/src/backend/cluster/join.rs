//! Start-up: the listen address and the cookie checked, the listener
//! bound, the accept, dial and resolve loops started, and the wait until the
//! node has joined its seeds (or the join window has passed).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::info;

use super::discovery::{Seeds, have_names, seed_addresses};
use super::node::Node;
use super::tokens::unix_nanos;
use super::wire::MemberInfo;
use super::{MIN_PUBLIC_COOKIE, Settings};
use crate::{Error, Result};

/// Starts a node: binds the listener, dials the seeds, and returns once it
/// has joined (every seed and every member learned from them connected and
/// synced) or the join timeout has passed.
pub(super) async fn start(settings: Arc<Settings>, name: &str) -> Result<Arc<Node>> {
    let listen = resolve(&settings.listen).await?;
    let key = cluster_key(&settings, listen)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| Error::config(format!("cluster backend cannot listen on {listen}: {e}")))?;
    let bound = listener.local_addr().map_err(|e| {
        Error::backend(
            crate::BackendErrorKind::Other,
            format!("cluster listener: {e}"),
        )
    })?;
    *settings.bound.lock().unwrap_or_else(|e| e.into_inner()) = Some(bound);
    let advertise = match &settings.advertise {
        Some(a) => Some(a.clone()),
        None if !bound.ip().is_unspecified() => Some(bound.to_string()),
        None => None,
    };
    let local_ip = (!bound.ip().is_unspecified()).then(|| bound.ip());
    let me = MemberInfo {
        name: Arc::from(name),
        incarnation: unix_nanos(),
        addr: advertise,
    };
    let seeds = Seeds::new(seed_addresses(&settings.seeds).await);
    let node = Node::new(settings, me, key, bound.port(), local_ip, seeds);
    info!(node = %node.name, %bound, advertise = node.me.addr.as_deref().unwrap_or("(peer-seen address)"), "cluster node listening");
    tokio::spawn(node.clone().accept_loop(listener));
    tokio::spawn(node.clone().dial_loop());
    if have_names(&node.settings.seeds) {
        tokio::spawn(node.clone().resolve_loop());
    }

    let deadline = Instant::now() + node.settings.join_timeout;
    let mut epoch = node.epoch();
    loop {
        if node.joined() {
            break;
        }
        tokio::select! {
            _ = epoch.changed() => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    {
        let sh = node.lock();
        let up = sh.state.peers().filter(|(_, p)| p.synced()).count();
        if up == 0 && sh.seeds.all_self() {
            info!(
                node = %node.name,
                "no other member in view (every seed address is this node's own): running alone"
            );
        } else {
            info!(node = %node.name, members_up = up, "joined the cluster");
        }
    }
    node.become_ready();
    Ok(node)
}

/// The key of this node's MACs: the cookie, checked.
fn cluster_key(settings: &Settings, listen: SocketAddr) -> Result<Vec<u8>> {
    let (cookie, source) = match &settings.cookie {
        Some(cookie) => (Some(cookie.expose().to_string()), "Cluster::cookie"),
        None => (std::env::var("HIGHLANDER_COOKIE").ok(), "HIGHLANDER_COOKIE"),
    };
    let good = "Use a long random secret, the same on every node, e.g. \
                `head -c 32 /dev/urandom | base64`";
    match cookie {
        Some(c) if c.is_empty() => Err(Error::config(format!(
            "the cluster cookie ({source}) is empty: anyone could compute its proofs. {good}"
        ))),
        Some(c) if c.len() < MIN_PUBLIC_COOKIE && !listen.ip().is_loopback() => {
            Err(Error::config(format!(
                "the cluster cookie ({source}) is too short to listen on {listen}, which other \
                 hosts can reach: use at least {MIN_PUBLIC_COOKIE} bytes. {good}"
            )))
        }
        Some(c) => Ok(c.into_bytes()),
        None if !listen.ip().is_loopback() => Err(Error::config(format!(
            "refusing to listen on {listen} without a cluster cookie: anyone who can reach \
             that address could join the cluster and stop or start your singletons. Set \
             HIGHLANDER_COOKIE (or Cluster::cookie) to the same long random secret on every \
             node (e.g. `head -c 32 /dev/urandom | base64`), or listen on a loopback address \
             such as 127.0.0.1"
        ))),
        None => {
            info!(%listen, "no HIGHLANDER_COOKIE set: the cluster listens on loopback only, with a built-in key");
            Ok(b"highlander-loopback-default-cookie".to_vec())
        }
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host(addr).await.map_err(|e| {
        Error::config(format!(
            "cluster listen address `{addr}` cannot be resolved: {e}; use host:port"
        ))
    })?;
    addrs.next().ok_or_else(|| {
        Error::config(format!(
            "cluster listen address `{addr}` resolves to nothing"
        ))
    })
}

impl Node {
    /// Whether every seed and every member learned is connected and synced.
    fn joined(&self) -> bool {
        let sh = self.lock();
        sh.seeds.joined(&sh.state)
    }
}
