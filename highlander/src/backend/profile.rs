//! What a node tells the other members about itself, so that every node
//! computes the same answer to "where does this id belong?"
//! ([`crate::placement`]): its weight, its labels, and the ids it runs.
//!
//! The runtime announces its [`Profile`] through
//! [`Session::announce`](super::Session::announce) before its first claim and
//! again whenever [`RuntimeHandle::add`](crate::RuntimeHandle::add) or
//! [`remove`](crate::RuntimeHandle::remove) change its ids; each backend
//! carries it to the others its own way and hands it back in
//! [`Member::profile`](super::Member::profile).

use std::fmt;
use std::sync::Arc;

use crate::placement::{Candidate, DEFAULT_WEIGHT};

/// One node's part in placement.
///
/// ```
/// use highlander::backend::{Catalog, Profile};
///
/// let p = Profile::new(2, vec!["zone=eu".into()], Catalog::new(["b", "a", "a"]));
/// assert_eq!(p.catalog.ids().len(), 2);
/// assert!(p.catalog.contains("a"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Profile {
    /// Its share of ids relative to the others (0: only when no other
    /// member can run the id).
    pub weight: u32,
    /// Its labels (`zone=eu`, `ssd`), which services' `prefer` and `avoid`
    /// entries match.
    pub labels: Vec<String>,
    /// The ids it runs. Not in the serde form (it may hold 100,000 ids):
    /// status output shows the weight and labels only.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub catalog: Catalog,
}

impl Profile {
    /// A profile of `weight`, `labels` and `catalog`.
    pub fn new(weight: u32, labels: Vec<String>, catalog: Catalog) -> Self {
        Profile {
            weight,
            labels,
            catalog,
        }
    }

    /// This member as a placement candidate named `node`.
    pub(crate) fn candidate(&self, node: &str) -> Candidate {
        Candidate::new(node, self.weight).labels(self.labels.iter().cloned())
    }
}

impl Default for Profile {
    fn default() -> Self {
        Profile::new(DEFAULT_WEIGHT, Vec::new(), Catalog::default())
    }
}

/// The ids a node runs: sorted, without duplicates, shared cheaply
/// (`Arc`), with a stable digest so that backends can send a catalog once
/// and refer to it by digest afterwards.
///
/// ```
/// use highlander::backend::Catalog;
///
/// let a = Catalog::new(["x", "y"]);
/// let b = Catalog::new(["y", "x", "y"]);
/// assert_eq!(a, b);
/// assert_eq!(a.digest(), b.digest());
/// assert_ne!(a.digest(), Catalog::new(["x"]).digest());
/// ```
#[derive(Clone)]
pub struct Catalog {
    ids: Arc<[Arc<str>]>,
    digest: u64,
}

impl Catalog {
    /// The catalog of `ids`, in any order, duplicates dropped.
    pub fn new<I, S>(ids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<Arc<str>>,
    {
        let mut ids: Vec<Arc<str>> = ids.into_iter().map(Into::into).collect();
        ids.sort_unstable();
        ids.dedup();
        let digest = crate::placement::digest(ids.iter().map(|id| &**id));
        Catalog {
            ids: ids.into(),
            digest,
        }
    }

    /// The ids, sorted.
    pub fn ids(&self) -> &[Arc<str>] {
        &self.ids
    }

    /// Whether the node runs `id`.
    pub fn contains(&self, id: &str) -> bool {
        self.ids.binary_search_by(|x| (**x).cmp(id)).is_ok()
    }

    /// How many ids.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether it names no id.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The stable 64-bit digest of the sorted ids: the same in every process
    /// and version for the same ids.
    pub fn digest(&self) -> u64 {
        self.digest
    }
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog::new(std::iter::empty::<Arc<str>>())
    }
}

impl PartialEq for Catalog {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest && self.ids == other.ids
    }
}

impl Eq for Catalog {}

impl fmt::Debug for Catalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Catalog({} ids, {:016x})", self.ids.len(), self.digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_pinned_and_order_free() {
        let c = Catalog::new(["b", "a"]);
        assert_eq!(c.ids().len(), 2);
        assert_eq!(c.digest(), Catalog::new(["a", "b", "b"]).digest());
        // Pinned: nodes of different versions must agree.
        assert_eq!(Catalog::default().digest(), crate::placement::digest([]));
        assert_ne!(
            Catalog::new(["ab"]).digest(),
            Catalog::new(["a", "b"]).digest()
        );
    }

    #[test]
    fn contains_finds_exactly_the_ids() {
        let c = Catalog::new((0..1000).map(|i| format!("id/{i}")));
        assert!(c.contains("id/0") && c.contains("id/999"));
        assert!(!c.contains("id/1000") && !c.contains(""));
    }
}
