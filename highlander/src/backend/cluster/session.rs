//! The [`Session`] of a cluster node: the runtime's calls, each a short
//! step on the node.

use std::sync::Arc;

use super::node::Node;
use crate::Result;
use crate::backend::{Claim, ClaimRequest, HeldId, Holder, Member, Session};
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
