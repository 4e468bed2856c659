//! Start-up: the listen address and the cookie checked, the listener
//! bound, the accept, dial and resolve loops started, the wait until the
//! node has joined its seeds (or the join window has passed), and the rule
//! that a node which is not one of its own seeds must hear from one.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::info;

use super::accept::handshake_timeout;
use super::discovery::{Seeds, have_names, seed_addresses};
use super::node::Node;
use super::tokens::unix_nanos;
use super::wire::MemberInfo;
use super::{MIN_PUBLIC_COOKIE, Settings};
use crate::{BackendErrorKind, Error, Result};

/// Starts a node, one attempt of the runtime's start-up policy: binds the
/// listener (which must succeed), dials the seeds, and returns once it has
/// joined (every seed and every member learned from them connected and
/// synced) or the join window has passed.
///
/// A node that has no seeds, or is one of its own (its bound or advertised
/// address among the seed addresses, or a dial of a seed that reached
/// itself), may found the cluster alone. Any other node must hear from a
/// seed (join it, or be refused by it): when none answers within the join
/// window or the first round of dials, the attempt fails with the last
/// dial's error, and the runtime tries again until its start timeout.
pub(super) async fn start(settings: Arc<Settings>, name: &str) -> Result<Arc<Node>> {
    let listen = resolve(&settings.listen).await?;
    let key = cluster_key(&settings, listen)?;
    let listener = TcpListener::bind(listen).await.map_err(|e| {
        Error::config_with(format!("cluster backend cannot listen on {listen}: {e}"), e)
    })?;
    let bound = listener.local_addr().map_err(|e| {
        Error::backend_with(BackendErrorKind::Other, format!("cluster listener: {e}"), e)
    })?;
    *settings.bound.lock().unwrap_or_else(|e| e.into_inner()) = Some(bound);
    let advertise = match &settings.advertise {
        Some(a) => Some(a.clone()),
        None if !bound.ip().is_unspecified() => Some(bound.to_string()),
        None => None,
    };
    let local_ip = (!bound.ip().is_unspecified()).then(|| bound.ip());
    let seed_addrs = seed_addresses(&settings.seeds).await;
    let founder = seed_addrs.is_empty()
        || among(
            &seed_addrs,
            &own_addresses(bound, advertise.as_deref()).await,
        );
    let me = MemberInfo {
        name: Arc::from(name),
        incarnation: unix_nanos(),
        addr: advertise,
    };
    let node = Node::new(
        settings,
        me,
        key,
        bound.port(),
        local_ip,
        Seeds::new(seed_addrs),
    );
    info!(node = %node.name, %bound, advertise = node.me.addr.as_deref().unwrap_or("(peer-seen address)"), "cluster node listening");
    // Until the node is handed over, dropping this (the runtime gave up on
    // the attempt, or it failed) stops every task of the node.
    let stop = node.cancel.clone().drop_guard();
    let accepting = tokio::spawn(node.clone().accept_loop(listener));
    tokio::spawn(node.clone().dial_loop());
    if have_names(&node.settings.seeds) {
        tokio::spawn(node.clone().resolve_loop());
    }

    let started = Instant::now();
    node.wait(started + node.settings.join_timeout, Node::joined)
        .await;
    if !founder {
        // By then every seed was dialed at least once.
        let first_round = node.settings.redial + handshake_timeout(&node.settings);
        let until = started + node.settings.join_timeout.max(first_round);
        node.wait(until, Node::may_start).await;
        if !node.may_start() {
            let refused = node.unheard();
            drop(stop);
            // The listener is closed before the next attempt binds again.
            let _ = accepting.await;
            return Err(refused);
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
    stop.disarm();
    Ok(node)
}

/// The addresses this node is reached at: where it is bound, and what its
/// advertised address resolves to.
async fn own_addresses(bound: SocketAddr, advertise: Option<&str>) -> Vec<SocketAddr> {
    let mut own = vec![bound];
    if let Some(a) = advertise {
        match a.parse::<SocketAddr>() {
            Ok(addr) => own.push(addr),
            Err(_) => {
                if let Ok(addrs) = tokio::net::lookup_host(a).await {
                    own.extend(addrs);
                }
            }
        }
    }
    own
}

/// Whether one of the `seeds` (addresses as dialed) is one of `own`.
fn among(seeds: &[String], own: &[SocketAddr]) -> bool {
    seeds
        .iter()
        .filter_map(|s| s.parse::<SocketAddr>().ok())
        .any(|s| own.contains(&s))
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
        Error::config_with(
            format!("cluster listen address `{addr}` cannot be resolved: {e}; use host:port"),
            e,
        )
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

    /// Whether a node that is not a seed by its addresses may start: a seed
    /// answered it (it joined one, or one refused it), or one of its seed
    /// addresses turned out to reach itself.
    fn may_start(&self) -> bool {
        let sh = self.lock();
        sh.seeds.heard() || sh.seeds.has_self() || sh.state.peers().any(|(_, p)| p.synced())
    }

    /// Waits until `done` or `until`, looking again whenever membership
    /// changes or a dial ends.
    async fn wait(&self, until: Instant, done: fn(&Node) -> bool) {
        let (mut epoch, mut dials) = (self.epoch(), self.dials());
        while !done(self) {
            tokio::select! {
                _ = epoch.changed() => {}
                _ = dials.changed() => {}
                _ = tokio::time::sleep_until(until) => break,
            }
        }
    }

    /// The error of an attempt that heard from no seed: the last dial's,
    /// kept as the source.
    fn unheard(&self) -> Error {
        let mut sh = self.lock();
        let mut seeds: Vec<&str> = sh.seeds.addrs().take(4).collect();
        if seeds.len() == 4 {
            seeds[3] = "...";
        }
        let message = format!(
            "cluster node `{}` heard from none of its seeds ({})",
            self.name,
            seeds.join(", ")
        );
        let advice = "start a seed first, or list this node among its own seeds to let it \
                      found the cluster alone";
        match sh.seeds.take_failure() {
            Some(last) => Error::backend_with(
                BackendErrorKind::Unreachable,
                format!("{message}: {last}; {advice}"),
                last,
            ),
            None => Error::backend(
                BackendErrorKind::Unreachable,
                format!("{message}; {advice}"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_node_is_a_seed_by_its_bound_or_advertised_address() {
        let bound: SocketAddr = "10.0.0.1:7400".parse().unwrap();
        let seeds = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let own = own_addresses(bound, None).await;
        assert!(among(&seeds(&["10.0.0.2:7400", "10.0.0.1:7400"]), &own));
        assert!(!among(&seeds(&["10.0.0.2:7400", "10.0.0.1:7401"]), &own));
        // Behind a proxy: the advertised address is the one in the seeds.
        let own = own_addresses(bound, Some("192.168.1.5:9000")).await;
        assert!(among(&seeds(&["192.168.1.5:9000"]), &own));
        // A name is resolved (seeds arrive resolved already).
        let own = own_addresses("0.0.0.0:7400".parse().unwrap(), Some("localhost:7400")).await;
        assert!(among(&seeds(&["127.0.0.1:7400"]), &own), "{own:?}");
        // A wildcard listen address is nobody's seed by itself: a dial of
        // the seed that reaches this node tells.
        let own = own_addresses("0.0.0.0:7400".parse().unwrap(), None).await;
        assert!(!among(&seeds(&["127.0.0.1:7400"]), &own));
    }
}
