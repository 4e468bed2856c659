//! The in-process backend: exact within one process, and a partition
//! simulator for tests.
//!
//! A [`MemoryCluster`] is a cluster object shared by every runtime that uses
//! it; each runtime connects as one node. With no partition it is a perfect
//! lock manager: one holder per id, tokens that only grow, and waiting nodes
//! woken at once when the holder releases the id or its runtime goes away.
//!
//! # Partitions, and who survives a heal
//!
//! [`MemoryCluster::partition`] splits the nodes into sides that cannot see
//! each other, the way a netsplit splits Erlang nodes under `:global`: each
//! side that cannot see the holder of an id lets one of its own nodes take the
//! id, so during the split each side runs one instance.
//!
//! When sides are joined again ([`MemoryCluster::heal`], or a new
//! `partition` that puts them together), every id held on more than one
//! joined node keeps exactly one holder, chosen by a rule anyone can predict:
//!
//! 1. the tenure that started **earliest** wins (it has held the id longest);
//! 2. on a tie, the **lower node name** (byte order) wins.
//!
//! Every other holder's lease ends with [`LeaseEnd::Conflict`], so its
//! instance is stopped with [`ShutdownReason::Conflict`](crate::ShutdownReason::Conflict)
//! and its `terminate` runs. The embedded cluster backend uses the same rule.
//!
//! # Placement
//!
//! [`Session::announce`] stores the node's [`Profile`] in the cluster;
//! [`Session::members`] shows it for the members on the asking node's side
//! (the reachable ones), and [`Session::members_changed`] completes on every
//! join, leave, change of sides and announcement. [`Session::release_to`]
//! releases the id and reserves it for the named node for
//! [`RESERVATION`]: another node's claim is `Busy` with the named node as
//! the holder-to-be, the named node's claim is granted at once. The
//! reservation ends early when the named node claims the id, leaves, or is
//! on another side than the claimer.
//!
//! [`Session::contested`] is true for a tenure while any node is on another
//! side, while another node holds the id, and, for a heal's winner, until
//! the losers' stop budget has passed: rebalancing then keeps the id, so an
//! overlap always ends by the rule above.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use super::kit::tenures::{Tenure, Tenures};
use super::kit::wake::Wakes;
use super::{
    Backend, Claim, ClaimRequest, HeldId, Holder, Lease, LeaseEnd, Member, Profile, Session,
};
use crate::service::BoxFuture;
use crate::{BackendErrorKind, Error, Result};
use split::Settling;

/// An in-process cluster: several runtimes in one process that use the same
/// `MemoryCluster` coordinate as if they were nodes of one cluster.
///
/// ```
/// use highlander::{MemoryCluster, Runtime};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> highlander::Result<()> {
/// let cluster = MemoryCluster::new();
/// let a = Runtime::builder().node("a").backend(cluster.clone()).start().await?;
/// let b = Runtime::builder().node("b").backend(cluster.clone()).start().await?;
/// cluster.partition(&[&["a"], &["b"]]);
/// cluster.heal();
/// a.shutdown().await;
/// b.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct MemoryCluster {
    inner: Arc<Mutex<State>>,
}

/// How long [`Session::release_to`] keeps an id for the node it names.
pub const RESERVATION: Duration = Duration::from_secs(2);

#[derive(Default)]
struct State {
    nodes: HashMap<String, NodeState>,
    /// The last fencing token handed out, per id ever claimed.
    tokens: HashMap<Arc<str>, u64>,
    /// Waiters for ids held elsewhere; bumped whenever a holder may have
    /// gone (a release, a node leaving, a change of sides).
    wakes: Wakes<Arc<str>>,
    /// Ids released to a named node ([`Session::release_to`]).
    reserved: HashMap<Arc<str>, Reservation>,
    /// Per id, the tenure that won a healed split and until when a loser's
    /// instance may still be stopping (its stop budget from the heal).
    settling: HashMap<Arc<str>, Settling>,
    /// Bumped on every join, leave, change of sides and announcement.
    members: Changes,
    partitioned: bool,
    next_group: u64,
    next_session: u64,
}

/// An id kept for `node` until `until`.
struct Reservation {
    node: String,
    until: Instant,
}

/// A counter that [`Session::members_changed`] futures wait on.
struct Changes(watch::Sender<u64>);

impl Default for Changes {
    fn default() -> Self {
        Changes(watch::Sender::new(0))
    }
}

impl Changes {
    fn bump(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }
}

struct NodeState {
    group: u64,
    session: u64,
    /// What the node announced last, if anything.
    profile: Option<Profile>,
    /// This node's tenures; the extra is when each began (the earliest
    /// wins a healed split).
    held: Tenures<Arc<str>, Instant>,
}

impl MemoryCluster {
    /// A new, empty cluster.
    pub fn new() -> Self {
        MemoryCluster::default()
    }

    /// The process-wide cluster that `HIGHLANDER_BACKEND=memory` (or no
    /// setting at all) uses.
    pub fn global() -> Self {
        static GLOBAL: OnceLock<MemoryCluster> = OnceLock::new();
        GLOBAL.get_or_init(MemoryCluster::new).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The nodes connected now, sorted by name.
    pub fn nodes(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().nodes.keys().cloned().collect();
        names.sort();
        names
    }

    /// Every node that holds `id` now, sorted by node name: one when the
    /// cluster is whole, up to one per side during a split.
    pub fn holders(&self, id: &str) -> Vec<Holder> {
        let state = self.lock();
        let mut holders: Vec<Holder> = state
            .nodes
            .iter()
            .filter_map(|(name, n)| {
                let tenure = n.held.get(id)?;
                Some(Holder::new(name.clone(), Some(tenure.token)))
            })
            .collect();
        holders.sort_by(|a, b| a.node.cmp(&b.node));
        holders
    }

    fn leave(&self, node: &str, session: u64) {
        let mut state = self.lock();
        if state.nodes.get(node).is_none_or(|n| n.session != session) {
            return;
        }
        let Some(mut gone) = state.nodes.remove(node) else {
            return;
        };
        let ids: Vec<Arc<str>> = gone.held.keys().cloned().collect();
        gone.held.end_all(LeaseEnd::Lost);
        for id in ids {
            state.wakes.bump(&id);
        }
        let kept: Vec<Arc<str>> = state
            .reserved
            .iter()
            .filter(|(_, r)| r.node == node)
            .map(|(id, _)| id.clone())
            .collect();
        for id in kept {
            state.reserved.remove(&id);
            state.wakes.bump(&id);
        }
        state.members.bump();
    }
}

impl State {
    /// A claim of `id` by `node` (on side `group`) that a reservation for
    /// another node refuses, as `Busy` with that node as the holder-to-be.
    /// Drops the reservation when it no longer applies to anyone: expired,
    /// its node gone, or claimed by its node (this claim).
    fn reservation_for(&mut self, id: &Arc<str>, node: &str, group: u64) -> Option<Claim> {
        let r = self.reserved.get(id)?;
        let now = Instant::now();
        let target = self.nodes.get(&r.node);
        if r.until <= now || target.is_none() || r.node == node {
            self.reserved.remove(id);
            return None;
        }
        if target.is_some_and(|t| t.group != group) {
            // The node it is kept for is out of sight: liveness first.
            return None;
        }
        let holder = Holder::new(r.node.clone(), None);
        let until = r.until;
        let wake = self.wakes.waiter(id);
        Some(Claim::Busy {
            holder: Some(holder),
            wake: Box::pin(async move {
                tokio::select! {
                    () = wake => {}
                    () = tokio::time::sleep_until(until) => {}
                }
            }),
        })
    }

    fn group_of(&self, node: &str) -> Option<u64> {
        self.nodes.get(node).map(|n| n.group)
    }

    /// The node of `session`, if it is still connected.
    fn node_of(&mut self, node: &str, session: u64) -> Option<&mut NodeState> {
        self.nodes.get_mut(node).filter(|n| n.session == session)
    }

    /// The holder of `id` that nodes in `group` see: at most one, as
    /// [`State::settle_all`] keeps it.
    fn visible_holder(&self, id: &str, group: u64) -> Option<(&String, &Tenure<Instant>)> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.group == group)
            .find_map(|(name, n)| Some((name, n.held.get(id)?)))
    }
}

impl fmt::Debug for MemoryCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryCluster")
            .field("nodes", &state.nodes.len())
            .field("ids", &state.tokens.len())
            .field("partitioned", &state.partitioned)
            .finish()
    }
}

impl Backend for MemoryCluster {
    fn connect(&self, node: &str) -> BoxFuture<'static, Result<Arc<dyn Session>>> {
        let cluster = self.clone();
        let node = node.to_string();
        Box::pin(async move {
            let session = {
                let mut state = cluster.lock();
                if state.nodes.contains_key(&node) {
                    return Err(Error::config(format!(
                        "node name `{node}` is already connected to this memory cluster: \
                         give each runtime its own name (HIGHLANDER_NODE or Builder::node)"
                    )));
                }
                state.next_session += 1;
                let session = state.next_session;
                let group = if state.partitioned {
                    state.next_group += 1;
                    state.next_group
                } else {
                    0
                };
                state.nodes.insert(
                    node.clone(),
                    NodeState {
                        group,
                        session,
                        profile: None,
                        held: Tenures::new(),
                    },
                );
                state.members.bump();
                session
            };
            Ok(Arc::new(MemorySession {
                cluster,
                node,
                session,
            }) as Arc<dyn Session>)
        })
    }

    fn describe(&self) -> String {
        "memory".to_string()
    }
}

/// One node's handle on a [`MemoryCluster`]. Dropping it (the runtime was
/// aborted) is a crash: the node's ids become free at once.
struct MemorySession {
    cluster: MemoryCluster,
    node: String,
    session: u64,
}

impl MemorySession {
    fn left(&self) -> Error {
        Error::backend(
            BackendErrorKind::Other,
            format!("node `{}` has left the memory cluster", self.node),
        )
    }

    /// Decides the claim in one step under the lock: nothing is awaited
    /// between the decision and the answer, so a `try_claim` future dropped
    /// before it ran claimed nothing, and one that ran has answered.
    fn claim(&self, request: &ClaimRequest) -> Result<Claim> {
        let mut guard = self.cluster.lock();
        let state = &mut *guard;
        let Some(group) = state
            .nodes
            .get(&self.node)
            .filter(|n| n.session == self.session)
            .map(|n| n.group)
        else {
            return Err(self.left());
        };
        if let Some((node, tenure)) = state.visible_holder(&request.id, group) {
            let holder = Holder::new(node.clone(), Some(tenure.token));
            // Under the lock that every bump takes: no release can slip
            // between this answer and the waiter.
            let wake = state.wakes.waiter(&request.id);
            return Ok(Claim::Busy {
                holder: Some(holder),
                wake: Box::pin(wake),
            });
        }
        if let Some(busy) = state.reservation_for(&request.id, &self.node, group) {
            return Ok(busy);
        }
        let token = {
            let last = state.tokens.entry(request.id.clone()).or_default();
            *last += 1;
            *last
        };
        let (lease, signal) = Lease::new(token);
        state.wakes.forget(&*request.id);
        let node = state
            .node_of(&self.node, self.session)
            .expect("checked above");
        node.held.insert(
            request.id.clone(),
            Tenure::with(token, request.stop_budget, signal, Instant::now()),
        );
        Ok(Claim::Granted(lease))
    }
}

impl Session for MemorySession {
    fn try_claim(&self, request: ClaimRequest) -> BoxFuture<'_, Result<Claim>> {
        // The claim is made when the future is first polled, and decided in
        // that poll: see `claim`.
        Box::pin(async move { self.claim(&request) })
    }

    fn release(&self, id: &str, token: u64) -> BoxFuture<'_, Result<()>> {
        // A release in favour of this node itself keeps nothing for anyone.
        self.release_to(id, token, &self.node)
    }

    fn holder(&self, id: &str) -> BoxFuture<'_, Result<Option<Holder>>> {
        let holder = {
            let state = self.cluster.lock();
            state.group_of(&self.node).and_then(|group| {
                let (node, tenure) = state.visible_holder(id, group)?;
                Some(Holder::new(node.clone(), Some(tenure.token)))
            })
        };
        Box::pin(async move { Ok(holder) })
    }

    fn members(&self) -> BoxFuture<'_, Result<Vec<Member>>> {
        let members = {
            let state = self.cluster.lock();
            let group = state.group_of(&self.node);
            let mut members: Vec<Member> = state
                .nodes
                .iter()
                .map(|(name, n)| {
                    let reachable = Some(n.group) == group;
                    Member {
                        node: name.clone(),
                        reachable,
                        address: None,
                        profile: n.profile.clone().filter(|_| reachable),
                    }
                })
                .collect();
            members.sort_by(|a, b| a.node.cmp(&b.node));
            members
        };
        Box::pin(async move { Ok(members) })
    }

    fn announce(&self, profile: Profile) -> BoxFuture<'_, Result<()>> {
        let answer = {
            let mut state = self.cluster.lock();
            match state.node_of(&self.node, self.session) {
                Some(n) => {
                    if n.profile.as_ref() != Some(&profile) {
                        n.profile = Some(profile);
                        state.members.bump();
                    }
                    Ok(())
                }
                None => Err(self.left()),
            }
        };
        Box::pin(async move { answer })
    }

    fn members_changed(&self) -> BoxFuture<'static, ()> {
        let mut rx = self.cluster.lock().members.0.subscribe();
        Box::pin(async move {
            // The sender lives as long as the cluster: an error means the
            // cluster is gone, which is a change too.
            let _ = rx.changed().await;
        })
    }

    fn release_to(&self, id: &str, token: u64, node: &str) -> BoxFuture<'_, Result<()>> {
        {
            let mut state = self.cluster.lock();
            let released = state
                .node_of(&self.node, self.session)
                .and_then(|n| n.held.remove_if(id, token))
                .is_some();
            if released {
                if node != self.node && state.nodes.contains_key(node) {
                    let now = Instant::now();
                    state.reserved.retain(|_, r| r.until > now);
                    state.reserved.insert(
                        Arc::from(id),
                        Reservation {
                            node: node.to_string(),
                            until: now + RESERVATION,
                        },
                    );
                }
                state.wakes.bump(id);
            }
        }
        Box::pin(async { Ok(()) })
    }

    /// Contested while the cluster is split with this node on one side
    /// (the other side may take the id any moment; this answers as a node
    /// of the embedded cluster would, and never counts on the other side
    /// not having claimed yet), while another node holds the id, and after
    /// a heal this tenure won, for the losers' stop budget (their instances
    /// may still be stopping).
    fn contested(&self, id: &str, token: u64) -> bool {
        self.cluster
            .lock()
            .contested(&self.node, self.session, id, token)
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.cluster.leave(&self.node, self.session);
        Box::pin(async {})
    }

    fn holders(&self) -> BoxFuture<'_, Result<Vec<HeldId>>> {
        let held = {
            let state = self.cluster.lock();
            let group = state.group_of(&self.node);
            let now = (Instant::now(), SystemTime::now());
            let mut held: Vec<HeldId> = state
                .nodes
                .iter()
                .filter(|(_, n)| Some(n.group) == group)
                .flat_map(|(name, n)| {
                    n.held.iter().map(move |(id, tenure)| {
                        let since = now.1.checked_sub(now.0.duration_since(tenure.extra));
                        HeldId::new(
                            id.to_string(),
                            Holder::new(name.clone(), Some(tenure.token)),
                            since,
                        )
                    })
                })
                .collect();
            held.sort_by(|a, b| a.id.cmp(&b.id));
            held
        };
        Box::pin(async move { Ok(held) })
    }
}

impl Drop for MemorySession {
    fn drop(&mut self) {
        self.cluster.leave(&self.node, self.session);
    }
}

#[path = "memory_split.rs"]
mod split;

#[cfg(test)]
#[path = "memory_tests.rs"]
mod tests;
