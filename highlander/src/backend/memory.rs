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

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    Backend, Claim, ClaimRequest, HeldId, Holder, Lease, LeaseEnd, LeaseSignal, Member, Session,
};
use crate::service::BoxFuture;
use crate::{BackendErrorKind, Error, Result};

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

#[derive(Default)]
struct State {
    nodes: HashMap<String, NodeState>,
    ids: HashMap<Arc<str>, IdState>,
    partitioned: bool,
    next_group: u64,
    next_session: u64,
}

struct NodeState {
    group: u64,
    session: u64,
}

struct IdState {
    last_token: u64,
    claims: Vec<ClaimRecord>,
    wake: watch::Sender<u64>,
}

impl Default for IdState {
    fn default() -> Self {
        IdState {
            last_token: 0,
            claims: Vec::new(),
            wake: watch::Sender::new(0),
        }
    }
}

impl IdState {
    fn wake_waiters(&self) {
        self.wake.send_modify(|v| *v = v.wrapping_add(1));
    }
}

struct ClaimRecord {
    node: String,
    session: u64,
    token: u64,
    since: Instant,
    signal: LeaseSignal,
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

    /// Splits the cluster into sides that cannot see each other. Each inner
    /// slice is one side; a connected node named in no side is cut off from
    /// every other node, and so is a node that connects during the split.
    /// Sides joined by this call settle conflicts as [`MemoryCluster::heal`]
    /// does.
    ///
    /// ```
    /// # let cluster = highlander::MemoryCluster::new();
    /// cluster.partition(&[&["a"], &["b", "c"]]);
    /// cluster.heal();
    /// ```
    pub fn partition(&self, sides: &[&[&str]]) {
        let mut state = self.lock();
        state.partitioned = true;
        let mut assigned: HashMap<&str, u64> = HashMap::new();
        for side in sides {
            state.next_group += 1;
            for node in *side {
                assigned.insert(node, state.next_group);
            }
        }
        let names: Vec<String> = state.nodes.keys().cloned().collect();
        for name in names {
            let group = match assigned.get(name.as_str()) {
                Some(g) => *g,
                None => {
                    state.next_group += 1;
                    state.next_group
                }
            };
            if let Some(node) = state.nodes.get_mut(&name) {
                node.group = group;
            }
        }
        state.settle_all();
    }

    /// Joins every node into one side again. Where a split left an id held
    /// on several nodes, the earliest tenure keeps it (ties: lower node
    /// name) and every other holder's lease ends with
    /// [`LeaseEnd::Conflict`].
    pub fn heal(&self) {
        let mut state = self.lock();
        state.partitioned = false;
        for node in state.nodes.values_mut() {
            node.group = 0;
        }
        state.settle_all();
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
            .ids
            .get(id)
            .map(|s| {
                s.claims
                    .iter()
                    .map(|c| Holder {
                        node: c.node.clone(),
                        token: Some(c.token),
                    })
                    .collect()
            })
            .unwrap_or_default();
        holders.sort_by(|a, b| a.node.cmp(&b.node));
        holders
    }

    fn leave(&self, node: &str, session: u64) {
        let mut state = self.lock();
        if state.nodes.get(node).is_none_or(|n| n.session != session) {
            return;
        }
        state.nodes.remove(node);
        for id_state in state.ids.values_mut() {
            let before = id_state.claims.len();
            id_state.claims.retain(|c| {
                let mine = c.session == session;
                if mine {
                    c.signal.end(LeaseEnd::Lost);
                }
                !mine
            });
            if id_state.claims.len() != before {
                id_state.wake_waiters();
            }
        }
    }
}

impl State {
    fn group_of(&self, node: &str) -> Option<u64> {
        self.nodes.get(node).map(|n| n.group)
    }

    /// After a change of sides: wake every waiter (a holder may have become
    /// unreachable), and settle ids held more than once within one side.
    fn settle_all(&mut self) {
        let groups: HashMap<String, u64> = self
            .nodes
            .iter()
            .map(|(name, n)| (name.clone(), n.group))
            .collect();
        for id_state in self.ids.values_mut() {
            let mut by_group: HashMap<u64, Vec<usize>> = HashMap::new();
            for (i, c) in id_state.claims.iter().enumerate() {
                if let Some(g) = groups.get(&c.node) {
                    by_group.entry(*g).or_default().push(i);
                }
            }
            let mut losers: Vec<usize> = Vec::new();
            for members in by_group.values().filter(|m| m.len() > 1) {
                let claims = &id_state.claims;
                let winner = *members
                    .iter()
                    .min_by(|&&a, &&b| {
                        (claims[a].since, &claims[a].node).cmp(&(claims[b].since, &claims[b].node))
                    })
                    .expect("a group with claims has a winner");
                let winner_node = claims[winner].node.clone();
                for &i in members.iter().filter(|&&i| i != winner) {
                    claims[i].signal.end(LeaseEnd::Conflict {
                        winner: Some(winner_node.clone()),
                    });
                    losers.push(i);
                }
            }
            losers.sort_unstable_by(|a, b| b.cmp(a));
            for i in losers {
                id_state.claims.remove(i);
            }
            id_state.wake_waiters();
        }
    }
}

impl fmt::Debug for MemoryCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryCluster")
            .field("nodes", &state.nodes.len())
            .field("ids", &state.ids.len())
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
                state
                    .nodes
                    .insert(node.clone(), NodeState { group, session });
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
    fn claim(&self, request: &ClaimRequest) -> Result<Claim> {
        let mut state = self.cluster.lock();
        let Some(group) = state.group_of(&self.node) else {
            return Err(Error::backend(
                BackendErrorKind::Other,
                format!("node `{}` has left the memory cluster", self.node),
            ));
        };
        let groups: HashMap<String, u64> = state
            .nodes
            .iter()
            .map(|(name, n)| (name.clone(), n.group))
            .collect();
        let id_state = state.ids.entry(request.id.clone()).or_default();
        let visible = id_state
            .claims
            .iter()
            .find(|c| groups.get(&c.node) == Some(&group));
        if let Some(c) = visible {
            let holder = Holder {
                node: c.node.clone(),
                token: Some(c.token),
            };
            let mut rx = id_state.wake.subscribe();
            let wake = Box::pin(async move {
                let _ = rx.changed().await;
            });
            return Ok(Claim::Busy {
                holder: Some(holder),
                wake,
            });
        }
        id_state.last_token += 1;
        let (lease, signal) = Lease::new(id_state.last_token);
        id_state.claims.push(ClaimRecord {
            node: self.node.clone(),
            session: self.session,
            token: id_state.last_token,
            since: Instant::now(),
            signal,
        });
        Ok(Claim::Granted(lease))
    }
}

impl Session for MemorySession {
    fn try_claim(&self, request: ClaimRequest) -> BoxFuture<'_, Result<Claim>> {
        let claim = self.claim(&request);
        Box::pin(async move { claim })
    }

    fn release(&self, id: &str, token: u64) -> BoxFuture<'_, Result<()>> {
        {
            let mut state = self.cluster.lock();
            if let Some(id_state) = state.ids.get_mut(id) {
                let before = id_state.claims.len();
                id_state
                    .claims
                    .retain(|c| !(c.session == self.session && c.token == token));
                if id_state.claims.len() != before {
                    id_state.wake_waiters();
                }
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn holder(&self, id: &str) -> BoxFuture<'_, Result<Option<Holder>>> {
        let holder = {
            let state = self.cluster.lock();
            let group = state.group_of(&self.node);
            state.ids.get(id).and_then(|s| {
                s.claims
                    .iter()
                    .find(|c| state.group_of(&c.node) == group)
                    .map(|c| Holder {
                        node: c.node.clone(),
                        token: Some(c.token),
                    })
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
                .map(|(name, n)| Member {
                    node: name.clone(),
                    reachable: Some(n.group) == group,
                    address: None,
                })
                .collect();
            members.sort_by(|a, b| a.node.cmp(&b.node));
            members
        };
        Box::pin(async move { Ok(members) })
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
                .ids
                .iter()
                .filter_map(|(id, s)| {
                    let c = s.claims.iter().find(|c| state.group_of(&c.node) == group)?;
                    let since = now.1.checked_sub(now.0.duration_since(c.since));
                    Some(HeldId::new(
                        id.to_string(),
                        Holder::new(c.node.clone(), Some(c.token)),
                        since,
                    ))
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
