//! What a node sees of the others: who holds an id ([`Holder`], [`HeldId`])
//! and who the members are ([`Member`]).

use std::time::SystemTime;

use super::Profile;

/// Who holds an id.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Holder {
    /// The holder's node name.
    pub node: String,
    /// Its fencing token, when the backend knows it.
    pub token: Option<u64>,
}

impl Holder {
    /// The holder `node`, with its fencing token when the backend knows it.
    pub fn new(node: impl Into<String>, token: Option<u64>) -> Self {
        Holder {
            node: node.into(),
            token,
        }
    }
}

/// One held id, as [`Session::holders`](super::Session::holders) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldId {
    /// The singleton id.
    pub id: String,
    /// Its holder and the fencing token of the tenure.
    pub holder: Holder,
    /// When the tenure began, on the wall clock, when the backend records
    /// it.
    pub since: Option<SystemTime>,
}

impl HeldId {
    /// `id`, held by `holder` since `since` when known.
    pub fn new(id: impl Into<String>, holder: Holder, since: Option<SystemTime>) -> Self {
        HeldId {
            id: id.into(),
            holder,
            since,
        }
    }
}

/// A member of the cluster, as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Member {
    /// The member's node name.
    pub node: String,
    /// Whether this node can reach it now.
    pub reachable: bool,
    /// Its address, when it has one.
    pub address: Option<String>,
    /// What it announced for placement ([`Session::announce`](super::Session::announce)): `None` for
    /// a member that announced nothing yet (it is no placement candidate)
    /// and on backends without placement.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub profile: Option<Profile>,
}

impl Member {
    /// The member `node`, reachable or not, at `address` when it has one.
    pub fn new(node: impl Into<String>, reachable: bool, address: Option<String>) -> Self {
        Member {
            node: node.into(),
            reachable,
            address,
            profile: None,
        }
    }

    /// The same member with the profile it announced.
    ///
    /// ```
    /// use highlander::backend::{Member, Profile};
    /// let m = Member::new("a", true, None).with_profile(Profile::default());
    /// assert_eq!(m.profile.unwrap().weight, 1);
    /// ```
    pub fn with_profile(mut self, profile: Profile) -> Self {
        self.profile = Some(profile);
        self
    }
}
