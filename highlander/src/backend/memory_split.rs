//! Splits and heals of the memory cluster: [`MemoryCluster::partition`]
//! and [`MemoryCluster::heal`], the heal rule that leaves one holder per id
//! and side, and which tenures may overlap another
//! ([`Session::contested`](crate::backend::Session::contested)).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::time::Instant;

use super::{MemoryCluster, State};
use crate::backend::LeaseEnd;

/// The winner's tenure (its token) of a conflict whose losers may still be
/// stopping until `until`.
pub(super) struct Settling {
    token: u64,
    until: Instant,
}

impl MemoryCluster {
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
}

/// Per side and id, every holder with when its tenure began.
type Contenders = HashMap<(u64, Arc<str>), Vec<(Instant, String)>>;

impl State {
    /// Whether `node`'s tenure of `id` with `token` may overlap another:
    /// some node is on another side, another node holds `id`, or the
    /// tenure won a healed split less than a loser's stop budget ago (the
    /// loser's instance may still be stopping). False once that tenure is
    /// over.
    pub(super) fn contested(&self, node: &str, session: u64, id: &str, token: u64) -> bool {
        let Some(group) = self
            .nodes
            .get(node)
            .filter(|n| n.session == session && n.held.holds(id, token))
            .map(|n| n.group)
        else {
            return false;
        };
        let settling = self
            .settling
            .get(id)
            .is_some_and(|s| s.token == token && s.until > Instant::now());
        settling
            || self
                .nodes
                .iter()
                .filter(|(name, _)| name.as_str() != node)
                .any(|(_, n)| n.group != group || n.held.get(id).is_some())
    }

    /// After a change of sides: settle ids held more than once within one
    /// side, and wake every waiter (a holder may have become unreachable).
    fn settle_all(&mut self) {
        let mut holders: Contenders = HashMap::new();
        for (name, n) in &self.nodes {
            for (id, tenure) in n.held.iter() {
                holders
                    .entry((n.group, id.clone()))
                    .or_default()
                    .push((tenure.extra, name.clone()));
            }
        }
        let now = Instant::now();
        self.settling.retain(|_, s| s.until > now);
        for ((_, id), mut contenders) in holders.into_iter().filter(|(_, c)| c.len() > 1) {
            // The earliest tenure wins; ties go to the lower node name.
            contenders.sort();
            let (_, winner) = contenders.remove(0);
            let mut until = now;
            for (_, loser) in contenders {
                let node = self.nodes.get_mut(&loser).expect("a holder is a node");
                let tenure = node.held.get(&id).expect("it holds the id");
                let token = tenure.token;
                until = until.max(now + tenure.budget);
                node.held.end(
                    &id,
                    token,
                    LeaseEnd::Conflict {
                        winner: Some(winner.clone()),
                    },
                );
            }
            let token = self.nodes[&winner]
                .held
                .get(&id)
                .expect("it holds the id")
                .token;
            self.settling.insert(id, Settling { token, until });
        }
        self.wakes.bump_all();
        self.members.bump();
    }
}
