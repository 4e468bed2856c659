//! The rules every backend shares, written once: durations in URL options,
//! percent-decoding and redaction, secrets that never print, the CP safety
//! bound, the bookkeeping of this node's tenures, per-id wake-ups for
//! waiters, and the start-up policy.
//!
//! Crate-private: the backends build on it, users never see it. It is
//! compiled whatever features are on, so the memory backend and the runtime
//! use the same pieces as Postgres, etcd and the embedded cluster.

// With every backend on (`--all-features`, what clippy checks), each piece
// of the kit must have a user; a build with fewer backends leaves the pieces
// only the missing ones use.
#![cfg_attr(
    not(all(feature = "postgres", feature = "etcd", feature = "cluster")),
    allow(dead_code)
)]

pub(crate) mod duration;
pub(crate) mod secret;
pub(crate) mod startup;
pub(crate) mod tenures;
pub(crate) mod url;
pub(crate) mod vouch;
pub(crate) mod wake;
