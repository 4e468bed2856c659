//! Fencing tokens and the wall clock they lean on: `counter << 10 | slot`,
//! the slot a hash of the node name, the counter one above the highest
//! seen for the id and at least the wall clock in milliseconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// Bits of a token that come from the node name: two sides of a split never
/// hand out equal tokens (barring a hash collision of names).
const SLOT_BITS: u32 = 10;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;

/// Nanoseconds since the Unix epoch on this host's wall clock (0 before it).
pub(super) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The low bits of every token `name` hands out: FNV-1a of the name, a hash
/// that stays the same across restarts and builds.
pub(super) fn slot(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h & SLOT_MASK
}

/// The token of a new tenure by the node of `slot`: its counter one more
/// than that of `seen` (the highest token seen for the id) and at least
/// `now_ms`, the wall clock in milliseconds.
pub(super) fn next(seen: u64, now_ms: u64, slot: u64) -> u64 {
    let counter = ((seen >> SLOT_BITS) + 1).max(now_ms);
    (counter << SLOT_BITS) | (slot & SLOT_MASK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_grow_across_tenures_of_any_node() {
        let (a, b) = (slot("a"), slot("b"));
        assert_ne!(a, b, "the two names take different slots");
        // A clock standing still: each tenure still gets a larger token,
        // whichever node takes the id next.
        let first = next(0, 1_000, a);
        let second = next(first, 1_000, b);
        let third = next(second, 1_000, a);
        assert!(first < second && second < third, "{first} {second} {third}");
        assert_eq!(first & SLOT_MASK, a);
        assert_eq!(second & SLOT_MASK, b);
        // The clock carries tokens on when nothing was seen (a full restart).
        assert_eq!(next(0, 5_000, a) >> SLOT_BITS, 5_000);
        assert!(next(0, 5_000, a) > third);
        // A clock far behind the tokens seen does not pull them back.
        assert_eq!(next(third, 1, b) >> SLOT_BITS, (third >> SLOT_BITS) + 1);
    }

    #[test]
    fn two_sides_of_a_split_never_issue_one_token() {
        // Both sides saw the same last token and read the same clock.
        let seen = next(0, 7_000, slot("a"));
        let left = next(seen, 7_000, slot("b"));
        let right = next(seen, 7_000, slot("c"));
        assert_ne!(left, right);
        assert_eq!(left >> SLOT_BITS, right >> SLOT_BITS);
    }

    #[test]
    fn the_slot_is_stable() {
        // FNV-1a of "a" is 0xaf63dc4c8601ec8c: its low ten bits.
        assert_eq!(slot("a"), 0x08c);
        assert_eq!(slot(""), 0xcbf2_9ce4_8422_2325 & SLOT_MASK);
    }
}
