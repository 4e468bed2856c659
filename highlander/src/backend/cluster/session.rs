//! The [`Session`] of a cluster node: the runtime's calls, each a short
//! step on the node.

use std::sync::Arc;

use super::node::Node;
use crate::Result;
use crate::backend::{Claim, ClaimRequest, HeldId, Holder, Member, Profile, Session};
use crate::service::BoxFuture;

/// The [`Session`] of one cluster node. Dropping it without `close` is a
/// crash: connections are reset, peers see the node gone at once.
pub(super) struct ClusterSession {
    pub(super) node: Arc<Node>,
}

impl Session for ClusterSession {
    fn try_claim(&self, request: ClaimRequest) -> BoxFuture<'_, Result<Claim>> {
        Box::pin(self.node.clone().claim(request.id, request.stop_budget))
    }

    fn release(&self, id: &str, token: u64) -> BoxFuture<'_, Result<()>> {
        self.node.release(id, token);
        Box::pin(async { Ok(()) })
    }

    fn holder(&self, id: &str) -> BoxFuture<'_, Result<Option<Holder>>> {
        let holder = self.node.holder(id);
        Box::pin(async move { Ok(holder) })
    }

    fn members(&self) -> BoxFuture<'_, Result<Vec<Member>>> {
        let members = self.node.members();
        Box::pin(async move { Ok(members) })
    }

    /// Kept for every later connection (a reconnect announces it again),
    /// its head sent to every member at once; a member without that
    /// catalog asks for it.
    fn announce(&self, profile: Profile) -> BoxFuture<'_, Result<()>> {
        self.node.announce(profile);
        Box::pin(async { Ok(()) })
    }

    /// A watch on the member table: joins, leaves, deaths and profiles.
    fn members_changed(&self) -> BoxFuture<'static, ()> {
        self.node.members_changed()
    }

    /// Released at once (as `release`), with a reservation of the id for
    /// `node` that every member honours for 2 s (see `docs/cluster.md`).
    fn release_to(&self, id: &str, token: u64, node: &str) -> BoxFuture<'_, Result<()>> {
        self.node.release_to(id, token, node);
        Box::pin(async { Ok(()) })
    }

    /// Contested while another holder is in view (a conflict the heal rule
    /// has not settled), or a member is unreachable or silent for the
    /// failure timeout: across a split, the other side may hold the id.
    fn contested(&self, id: &str, token: u64) -> bool {
        self.node.contested(id, token)
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.node.leave())
    }

    fn holders(&self) -> BoxFuture<'_, Result<Vec<HeldId>>> {
        let held = self.node.holders();
        Box::pin(async move { Ok(held) })
    }
}

impl Drop for ClusterSession {
    fn drop(&mut self) {
        self.node.cancel.cancel();
    }
}
