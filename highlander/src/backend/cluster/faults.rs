//! Fault injection for in-process cluster tests (feature `test-util`).

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

/// Fault injection for in-process cluster tests: links between named nodes
/// can be cut (both directions go silent, as in a netsplit: frames are
/// dropped and new connections between the two fail) and healed. Public with
/// the `test-util` feature.
///
/// ```
/// use highlander::backend::cluster::{Cluster, Faults};
///
/// let faults = Faults::new();
/// let a = Cluster::new("127.0.0.1:0").faults(&faults);
/// faults.partition(&[&["a", "b"], &["c"]]);
/// assert!(faults.is_cut("a", "c") && !faults.is_cut("a", "b"));
/// faults.heal();
/// assert!(!faults.is_cut("a", "c"));
/// # drop(a);
/// ```
#[derive(Clone, Default)]
#[cfg_attr(not(feature = "test-util"), allow(unreachable_pub))]
pub struct Faults {
    cut: Arc<Mutex<HashSet<(String, String)>>>,
}

// Without `test-util` only the node's checks use it, with no link ever cut.
#[cfg_attr(not(feature = "test-util"), allow(dead_code, unreachable_pub))]
impl Faults {
    /// No link cut.
    pub fn new() -> Self {
        Faults::default()
    }

    fn key(a: &str, b: &str) -> (String, String) {
        if a <= b {
            (a.to_string(), b.to_string())
        } else {
            (b.to_string(), a.to_string())
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashSet<(String, String)>> {
        self.cut.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the link between `a` and `b`, both ways.
    pub fn cut(&self, a: &str, b: &str) {
        self.lock().insert(Faults::key(a, b));
    }

    /// Heals the link between `a` and `b`.
    pub fn heal_link(&self, a: &str, b: &str) {
        self.lock().remove(&Faults::key(a, b));
    }

    /// Cuts every link between nodes of different sides (links within a
    /// side, and of nodes named in no side, are left as they are).
    pub fn partition(&self, sides: &[&[&str]]) {
        let mut cut = self.lock();
        for (i, side) in sides.iter().enumerate() {
            for other in &sides[i + 1..] {
                for a in *side {
                    for b in *other {
                        cut.insert(Faults::key(a, b));
                    }
                }
            }
        }
    }

    /// Heals every link (as [`MemoryCluster::heal`](crate::MemoryCluster::heal)).
    pub fn heal(&self) {
        self.lock().clear();
    }

    /// Whether the link between `a` and `b` is cut.
    pub fn is_cut(&self, a: &str, b: &str) -> bool {
        let cut = self.lock();
        !cut.is_empty() && cut.contains(&Faults::key(a, b))
    }
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faults")
            .field("cut", &*self.lock())
            .finish()
    }
}
