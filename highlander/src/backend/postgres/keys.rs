//! Keys derived from names: stable forever, because rows written today must
//! be found by the nodes of any later version.
//!
//! Both keys come from one 64-bit hash, `h(bytes)`:
//! FNV-1a 64 (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`)
//! over the bytes, followed by the MurmurHash3 `fmix64` finalizer (so that
//! names differing in one byte differ in about half the bits):
//!
//! ```text
//! k ^= k >> 33; k *= 0xff51afd7ed558ccd;
//! k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53;
//! k ^= k >> 33
//! ```
//!
//! - the lock key of an id is `h(namespace ‖ 0xFF ‖ id)` read as a signed
//!   64-bit integer (two's complement); `0xFF` never occurs in UTF-8, so no
//!   two (namespace, id) pairs produce the same input;
//! - the namespace key is the upper 32 bits of `h(namespace ‖ 0xFF)`, read
//!   as a signed 32-bit integer.
//!
//! The test vectors at the bottom of this file pin both functions: if one of
//! them fails, the change breaks every deployed database.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const SEPARATOR: u8 = 0xFF;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

fn hash(namespace: &str, id: &str) -> u64 {
    let h = fnv1a(FNV_OFFSET, namespace.as_bytes());
    let h = fnv1a(h, &[SEPARATOR]);
    fmix64(fnv1a(h, id.as_bytes()))
}

/// The lock key of `id` in `namespace`: the primary key of the id's row in
/// the `highlander_leases` table. Stable forever: FNV-1a 64 over
/// `namespace ‖ 0xFF ‖ id`, then the MurmurHash3 `fmix64` finalizer, read
/// as a signed 64-bit integer (`docs/postgres.md` has a reference
/// implementation and test vectors).
///
/// ```
/// use highlander::backend::postgres::lock_key;
/// assert_eq!(lock_key("highlander", "invoice-sweeper"), lock_key("highlander", "invoice-sweeper"));
/// assert_ne!(lock_key("highlander", "invoice-sweeper"), lock_key("billing", "invoice-sweeper"));
/// ```
pub fn lock_key(namespace: &str, id: &str) -> i64 {
    hash(namespace, id) as i64
}

/// The namespace key: the first half of every presence lock of a node in
/// `namespace` (`pg_advisory_lock(namespace_key, session)`), so
/// `pg_locks.classid` tells which namespace a session belongs to. The upper
/// 32 bits of the same hash over `namespace ‖ 0xFF`, read as a signed
/// 32-bit integer.
///
/// ```
/// use highlander::backend::postgres::namespace_key;
/// assert_ne!(namespace_key("highlander"), namespace_key("billing"));
/// ```
pub fn namespace_key(namespace: &str) -> i32 {
    (hash(namespace, "") >> 32) as u32 as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned forever: these values are in deployed databases. They were
    /// computed by an independent implementation (a few lines of Python
    /// in docs/postgres.md), not by this one.
    #[test]
    fn lock_key_vectors() {
        let vectors: &[(&str, &str, i64)] = &[
            ("highlander", "solo", -7187895776723545087),
            ("highlander", "invoice-sweeper", 1611032931895515301),
            ("highlander", "tenant-sync/acme", -8153646057564383615),
            ("highlander", "id-0", 829975095279043430),
            ("highlander", "id-99999", 8996365655848152647),
            ("billing", "invoice-sweeper", 2407934408797050013),
            ("", "x", -5524110823854424503),
        ];
        for (namespace, id, key) in vectors {
            assert_eq!(
                lock_key(namespace, id),
                *key,
                "lock_key({namespace:?}, {id:?})"
            );
        }
    }

    #[test]
    fn namespace_key_vectors() {
        let vectors: &[(&str, i32)] = &[
            ("highlander", 997171634),
            ("billing", 654007104),
            ("", 465394817),
        ];
        for (namespace, key) in vectors {
            assert_eq!(
                namespace_key(namespace),
                *key,
                "namespace_key({namespace:?})"
            );
        }
    }

    #[test]
    fn building_blocks_match_their_references() {
        // FNV-1a 64 reference values (from the FNV authors' test suite).
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fmix64(0), 0);
    }

    #[test]
    fn separator_keeps_pairs_apart() {
        assert_ne!(lock_key("ab", "c"), lock_key("a", "bc"));
    }
}
