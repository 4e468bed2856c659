//! [`Status`]: a snapshot of one node.

use std::time::SystemTime;

use crate::backend::{Holder, Member};
use crate::guardian::SingletonState;
#[cfg(feature = "serde")]
use crate::placement::DEFAULT_WEIGHT;

/// A snapshot of one node: its singletons, the members it sees, and
/// whether its backend session is up.
///
/// With the `serde` feature (which `http` turns on) it is `Serialize` and
/// `Deserialize`; `GET /status` serves it as JSON. Times are milliseconds
/// since the Unix epoch (`at_unix_ms`, `since_unix_ms`), the state is an
/// object tagged by `"state"`:
///
/// ```json
/// { "node": "a", "backend": "memory", "at_unix_ms": 1764498000000, "session_up": true,
///   "members": [ { "node": "a", "reachable": true, "address": null } ],
///   "weight": 1, "labels": ["zone=eu"], "draining": false,
///   "singletons": [
///     { "id": "mailer", "state": { "state": "running", "token": 7, "restarts": 0 },
///       "since_unix_ms": 1764497990000, "restarts": 0 },
///     { "id": "sweeper", "state": { "state": "waiting", "holder": { "node": "b", "token": 3 } },
///       "since_unix_ms": 1764497991000, "restarts": 0, "prefer": ["zone=eu"] } ] }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Status {
    /// This node's name.
    pub node: String,
    /// The backend, with any credential hidden.
    pub backend: String,
    /// When this snapshot was taken (wall clock).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "at_unix_ms", with = "crate::ops::unix_ms")
    )]
    pub at: SystemTime,
    /// Whether the backend session is up: the last probe (once a second)
    /// reached the backend, no singleton is retrying because the backend
    /// could not be asked, and the backend's lease deadline, when it reports
    /// one, is ahead. What `GET /readyz` answers. False once the runtime
    /// has stopped.
    pub session_up: bool,
    /// The cluster members as this node saw them at the last probe (for
    /// backends that have members; empty otherwise), with their liveness.
    pub members: Vec<Member>,
    /// This node's weight for placement ([`Builder::weight`](crate::Builder::weight)).
    #[cfg_attr(feature = "serde", serde(default = "default_weight"))]
    pub weight: u32,
    /// This node's labels ([`Builder::labels`](crate::Builder::labels)).
    #[cfg_attr(feature = "serde", serde(default))]
    pub labels: Vec<String>,
    /// True while the node drains ([`RuntimeHandle::drain`](crate::RuntimeHandle::drain)).
    #[cfg_attr(feature = "serde", serde(default))]
    pub draining: bool,
    /// One entry per singleton configured on this node, in the order they
    /// were added (those given at start-up first); a removed id is gone.
    pub singletons: Vec<SingletonStatus>,
}

#[cfg(feature = "serde")]
fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

impl Status {
    /// The singletons running here, with their fencing tokens.
    pub fn running(&self) -> impl Iterator<Item = (&str, u64)> {
        self.singletons.iter().filter_map(|s| match s.state {
            SingletonState::Running { token, .. } => Some((s.id.as_str(), token)),
            _ => None,
        })
    }

    /// The state of one singleton.
    pub fn get(&self, id: &str) -> Option<&SingletonState> {
        self.singletons
            .iter()
            .find(|s| s.id == id)
            .map(|s| &s.state)
    }

    /// True when `id` runs on this node.
    pub fn is_running(&self, id: &str) -> bool {
        matches!(self.get(id), Some(SingletonState::Running { .. }))
    }
}

/// One singleton's state on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct SingletonStatus {
    /// The singleton id.
    pub id: String,
    /// What this node is doing with it: the holder while waiting, the
    /// fencing token while running.
    pub state: SingletonState,
    /// When the current state began (wall clock): for a running id, when
    /// this tenure began; restarts within a tenure do not move it.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "since_unix_ms", with = "crate::ops::unix_ms")
    )]
    pub since: SystemTime,
    /// Restarts of this id's instance on this node since the runtime
    /// started, over all tenures.
    pub restarts: u32,
    /// The node names or labels this service prefers
    /// ([`ChildSpec::prefer`](crate::ChildSpec::prefer)); left out of the JSON when empty.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Vec::is_empty")
    )]
    pub prefer: Vec<String>,
    /// The node names or labels this service avoids ([`ChildSpec::avoid`](crate::ChildSpec::avoid));
    /// left out of the JSON when empty.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Vec::is_empty")
    )]
    pub avoid: Vec<String>,
}

impl SingletonStatus {
    /// The fencing token of this node's tenure, while it holds the id.
    pub fn token(&self) -> Option<u64> {
        match self.state {
            SingletonState::Running { token, .. } | SingletonState::Finished { token, .. } => {
                Some(token)
            }
            _ => None,
        }
    }

    /// Who holds the id, as far as this node knows: this node while it
    /// holds it, the holder the backend named while waiting.
    pub fn holder(&self, node: &str) -> Option<Holder> {
        match &self.state {
            SingletonState::Running { token, .. } | SingletonState::Finished { token, .. } => {
                Some(Holder::new(node, Some(*token)))
            }
            SingletonState::Waiting { holder } => holder.clone(),
            _ => None,
        }
    }
}
