//! What strangers may cost a node: handshakes in progress are bounded per
//! source address and in all, warnings about them are rate limited, and a
//! node's own dials are told from others' by their nonces.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::node::Node;
use super::wire::NONCE_LEN;

/// Handshakes not yet authenticated, at most, per node and per source
/// address: beyond them a new connection is closed at once, so strangers
/// cannot use up the process's file descriptors or lock members out.
pub(super) const MAX_HANDSHAKES: usize = 128;
pub(super) const MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// A warning about a stranger is written at most this often per kind and
/// source address.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// At most this many (kind, source) pairs are remembered for rate limiting;
/// beyond them, one warning per kind per [`WARN_EVERY`] covers all others.
const WARN_KEYS: usize = 1024;

/// The node's bookkeeping about connections before they authenticate.
#[derive(Default)]
pub(super) struct Gate {
    /// When a warning of a kind about a source was last written.
    warned: HashMap<(&'static str, String), Instant>,
    /// Nonces of this node's dials in flight, with the address dialed: a
    /// `Hello` carrying one reached this node itself (known here, never
    /// taken from the wire).
    dial_nonces: HashMap<[u8; NONCE_LEN], SocketAddr>,
    /// Addresses found to reach this node itself.
    self_addrs: HashSet<SocketAddr>,
    /// Handshakes in progress, per source address and in all.
    handshakes: HashMap<IpAddr, usize>,
    handshakes_total: usize,
}

impl Gate {
    /// Whether a warning of `kind` about `source` may be written at `now`:
    /// at most one per kind and source per [`WARN_EVERY`]. Sources are
    /// addresses (never ports or names a peer chose), and the table is
    /// bounded: past [`WARN_KEYS`] live entries, one warning per kind per
    /// interval stands for every other source.
    pub(super) fn may_warn(&mut self, kind: &'static str, source: &str, now: Instant) -> bool {
        if self.warned.len() >= WARN_KEYS {
            self.warned
                .retain(|_, at| now.duration_since(*at) < WARN_EVERY);
        }
        let key = if self.warned.len() >= WARN_KEYS {
            (kind, String::from("*"))
        } else {
            (kind, source.to_string())
        };
        match self.warned.get(&key) {
            Some(at) if now.duration_since(*at) < WARN_EVERY => false,
            _ => {
                self.warned.insert(key, now);
                true
            }
        }
    }

    /// Takes a handshake slot for `ip`; false when this node or that source
    /// already has its fill of handshakes.
    fn take_slot(&mut self, ip: IpAddr) -> bool {
        let from_ip = self.handshakes.get(&ip).copied().unwrap_or(0);
        if self.handshakes_total >= MAX_HANDSHAKES || from_ip >= MAX_HANDSHAKES_PER_SOURCE {
            return false;
        }
        self.handshakes_total += 1;
        *self.handshakes.entry(ip).or_default() += 1;
        true
    }

    fn give_back(&mut self, ip: IpAddr) {
        self.handshakes_total = self.handshakes_total.saturating_sub(1);
        if let Some(n) = self.handshakes.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.handshakes.remove(&ip);
            }
        }
    }

    /// A `Hello` from this node itself carried `nonce`: when it is one of
    /// its own dials in flight, the address dialed is its own.
    pub(super) fn dialed_self(&mut self, nonce: &[u8; NONCE_LEN]) {
        if let Some(target) = self.dial_nonces.get(nonce).copied() {
            self.self_addrs.insert(target);
        }
    }

    /// Whether `addr` was found to reach this node itself.
    pub(super) fn is_self(&self, addr: &SocketAddr) -> bool {
        self.self_addrs.contains(addr)
    }
}

/// A handshake slot of [`Node::handshake_slot`], given back on drop.
pub(super) struct HandshakeSlot {
    node: Arc<Node>,
    ip: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.node.lock().gate.give_back(self.ip);
    }
}

/// The nonce of a dial in flight, registered so that this node's acceptor
/// can tell a dial of itself; unregistered on drop.
pub(super) struct DialNonce<'a> {
    node: &'a Node,
    nonce: [u8; NONCE_LEN],
}

impl<'a> DialNonce<'a> {
    pub(super) fn register(node: &'a Node, nonce: [u8; NONCE_LEN], target: SocketAddr) -> Self {
        node.lock().gate.dial_nonces.insert(nonce, target);
        DialNonce { node, nonce }
    }
}

impl Drop for DialNonce<'_> {
    fn drop(&mut self) {
        self.node.lock().gate.dial_nonces.remove(&self.nonce);
    }
}

impl Node {
    /// Whether a warning of `kind` about `source` may be written now (see
    /// [`Gate::may_warn`]).
    pub(super) fn may_warn(&self, kind: &'static str, source: &str) -> bool {
        self.lock().gate.may_warn(kind, source, Instant::now())
    }

    /// Takes a handshake slot for a connection from `ip`, or `None` when
    /// this node or that source already has its fill of handshakes.
    pub(super) fn handshake_slot(self: &Arc<Self>, ip: IpAddr) -> Option<HandshakeSlot> {
        self.lock().gate.take_slot(ip).then(|| HandshakeSlot {
            node: self.clone(),
            ip,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_rate_limited_per_kind_and_source() {
        let mut gate = Gate::default();
        let t0 = Instant::now();
        assert!(gate.may_warn("cookie", "10.0.0.1", t0));
        assert!(!gate.may_warn("cookie", "10.0.0.1", t0 + Duration::from_secs(59)));
        assert!(gate.may_warn("version", "10.0.0.1", t0), "another kind");
        assert!(gate.may_warn("cookie", "10.0.0.2", t0), "another source");
        assert!(gate.may_warn("cookie", "10.0.0.1", t0 + WARN_EVERY));
    }

    #[test]
    fn a_flood_of_sources_shares_one_warning_and_the_table_stays_bounded() {
        let mut gate = Gate::default();
        let t0 = Instant::now();
        for i in 0..WARN_KEYS {
            assert!(gate.may_warn("cookie", &format!("s{i}"), t0));
        }
        // Past the bound: one warning stands for every other source.
        assert!(gate.may_warn("cookie", "late-1", t0));
        assert!(!gate.may_warn("cookie", "late-2", t0));
        assert_eq!(gate.warned.len(), WARN_KEYS + 1);
        // Once the old entries lapse, sources count one by one again.
        let later = t0 + WARN_EVERY;
        assert!(gate.may_warn("cookie", "late-2", later));
        assert!(!gate.may_warn("cookie", "late-2", later));
        assert!(gate.warned.len() < 10, "{}", gate.warned.len());
    }

    #[test]
    fn handshakes_are_bounded_per_source_and_in_all() {
        let mut gate = Gate::default();
        let ip = |i: u8| IpAddr::from([10, 0, 0, i]);
        for _ in 0..MAX_HANDSHAKES_PER_SOURCE {
            assert!(gate.take_slot(ip(1)));
        }
        assert!(!gate.take_slot(ip(1)), "one source has its fill");
        gate.give_back(ip(1));
        assert!(gate.take_slot(ip(1)), "a slot given back is free again");
        let mut others = 0;
        for i in 2..=255 {
            while gate.take_slot(ip(i)) {
                others += 1;
            }
        }
        assert_eq!(others + MAX_HANDSHAKES_PER_SOURCE, MAX_HANDSHAKES);
        for _ in 0..MAX_HANDSHAKES_PER_SOURCE {
            gate.give_back(ip(1));
        }
        assert!(!gate.handshakes.contains_key(&ip(1)));
        assert!(gate.take_slot(ip(1)));
    }

    #[test]
    fn only_this_nodes_own_nonces_mark_an_address_as_its_own() {
        let mut gate = Gate::default();
        let addr: SocketAddr = "10.0.0.1:7400".parse().unwrap();
        gate.dial_nonces.insert([7; NONCE_LEN], addr);
        gate.dialed_self(&[8; NONCE_LEN]);
        assert!(!gate.is_self(&addr), "a nonce this node never sent");
        gate.dialed_self(&[7; NONCE_LEN]);
        assert!(gate.is_self(&addr));
    }
}
