//! The rules every backend shares, written once: durations in URL options,
//! percent-decoding and redaction, secrets that never print, the CP safety
//! bound, the bookkeeping of this node's tenures, per-id wake-ups for
//! waiters, and the start-up policy.
//!
//! Crate-private: the backends build on it, users never see it. It is
//! compiled whatever features are on, so the memory backend and the runtime
//! use the same pieces as Postgres, etcd and the embedded cluster.

// Parts of the kit have no user yet in some builds: the feature-gated
// backends move onto it one by one. Each `allow` below becomes
// `cfg_attr(not(any(feature = "postgres", feature = "etcd", feature = "cluster")), allow(dead_code))`
// once those backends use its module, and goes when memory does too.
#[allow(dead_code)]
pub(crate) mod duration;
#[allow(dead_code)]
pub(crate) mod secret;
pub(crate) mod startup;
#[allow(dead_code)]
pub(crate) mod tenures;
#[allow(dead_code)]
pub(crate) mod url;
#[allow(dead_code)]
pub(crate) mod vouch;
#[allow(dead_code)]
pub(crate) mod wake;
