//! Why an instance stopped.

use std::fmt;

/// Why a singleton instance was stopped; passed to
/// [`Service::terminate`](crate::Service::terminate) and readable through
/// [`Context::reason`](crate::Context::reason) once known.
///
/// ```
/// use highlander::ShutdownReason;
/// let r = ShutdownReason::Error("disk full".into());
/// assert!(r.is_error());
/// assert_eq!(r.to_string(), "error: disk full");
/// assert_eq!(ShutdownReason::Conflict.to_string(), "conflict");
/// assert!(!ShutdownReason::Moved.is_error());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ShutdownReason {
    /// A healed network split found this instance running beside another one,
    /// and this one lost the tie (the other had held the id longer, or as long
    /// with a lower node name). The original library's `:shutdown` after a
    /// `:global` name conflict.
    Conflict,
    /// The backend can no longer vouch that this node holds the id (lost
    /// connection, expired lease, lock taken away). The instance is stopped
    /// before any other node could be granted the id.
    LeaseLost,
    /// The node is shutting down (SIGTERM, Ctrl-C, or
    /// [`RuntimeHandle::shutdown`](crate::RuntimeHandle::shutdown)).
    NodeShutdown,
    /// `run` (or a child task, or `init`) returned an error or panicked; the
    /// text says which and why.
    Error(String),
    /// The service failed more often than its restart intensity allows, so
    /// this node released the id for another node to try.
    Stepdown,
    /// `run` returned `Ok(())` on its own, without being cancelled.
    Normal,
    /// The id is handed over to another node in good order: this node is
    /// draining ([`RuntimeHandle::drain`](crate::RuntimeHandle::drain)), or
    /// the id belongs elsewhere now. Once `terminate` has run, this node
    /// releases the id and another node starts it; nothing failed.
    Moved,
    /// The id was removed from this node
    /// ([`RuntimeHandle::remove`](crate::RuntimeHandle::remove)): once
    /// `terminate` has run, this node releases the id and no longer
    /// competes for it. Another node configured with the id may take it.
    Removed,
}

impl ShutdownReason {
    /// True for [`ShutdownReason::Error`].
    pub fn is_error(&self) -> bool {
        matches!(self, ShutdownReason::Error(_))
    }
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShutdownReason::Conflict => f.write_str("conflict"),
            ShutdownReason::LeaseLost => f.write_str("lease lost"),
            ShutdownReason::NodeShutdown => f.write_str("node shutdown"),
            ShutdownReason::Error(e) => write!(f, "error: {e}"),
            ShutdownReason::Stepdown => f.write_str("stepdown"),
            ShutdownReason::Normal => f.write_str("normal"),
            ShutdownReason::Moved => f.write_str("moved"),
            ShutdownReason::Removed => f.write_str("removed"),
        }
    }
}
