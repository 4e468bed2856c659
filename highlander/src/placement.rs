//! Where an id belongs: weighted rendezvous hashing with node weights and
//! per-service affinity. Pure functions, no I/O: every node computes the same
//! answer from the same members, with no coordination.
//!
//! # The rule
//!
//! Each candidate node gets a score for the id, and the candidates are ranked
//! by it, best first ([`rank`]). The score is weighted rendezvous hashing
//! (highest random weight) in its logarithmic form:
//!
//! ```text
//! u     = hash(id, node) mapped into the open interval (0, 1)
//! score = weight / -ln(u)
//! ```
//!
//! so a node of weight 2 is the best one for twice as many ids as a node of
//! weight 1, and a change of membership moves only the ids it must: a node
//! that joins takes from every other node its share and nothing else; a node
//! that leaves gives away exactly the ids it was best for.
//!
//! Before the score come three coarser tiers, in this order:
//!
//! 1. **weight 0 last**: a node of weight 0 ranks after every node of
//!    positive weight, so it hosts an id only when no other candidate can;
//! 2. **`prefer` first**: candidates that match an entry of the service's
//!    [`Affinity::prefer`] list rank before those that match none;
//! 3. **`avoid` last**: candidates that match an entry of
//!    [`Affinity::avoid`] rank after every other candidate of positive weight
//!    (`avoid` wins over `prefer` for a node that matches both).
//!
//! No candidate is ever excluded (liveness first): an avoided node or a node
//! of weight 0 still runs the id when it is the only one left. Ties (equal
//! scores) go to the lower node name, so the order is total.
//!
//! An affinity entry matches a node when it equals the node's name or one
//! of its labels as written: `"node-a"` matches the node named `node-a`,
//! `"zone=eu"` the nodes labelled `zone=eu`, `"ssd"` the nodes labelled
//! `ssd`.
//!
//! # Stable across processes, versions and platforms
//!
//! The hash is FNV-1a (64 bit) over the id's bytes, one `0xff` byte (which
//! no id or node name contains) and the node's bytes, finished with the
//! SplitMix64 mixer; the logarithm is computed with basic floating-point
//! operations only, in a fixed order, so every process on every platform
//! ranks the candidates identically. Test vectors pin both.
//!
//! ```
//! use highlander::placement::{rank, Affinity, Candidate};
//!
//! let nodes = [
//!     Candidate::new("node-a", 1).labels(["zone=eu"]),
//!     Candidate::new("node-b", 1).labels(["zone=us"]),
//!     Candidate::new("node-c", 0),
//! ];
//! let order = rank("tenant/42", &Affinity::default(), &nodes);
//! assert_eq!(order.len(), 3);
//! assert_eq!(order[2].name(), "node-c"); // weight 0: only when no other can
//!
//! let eu = Affinity::default().prefer(["zone=eu"]);
//! assert_eq!(rank("tenant/42", &eu, &nodes)[0].name(), "node-a");
//! ```

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

/// The weight of a node unless set (`Builder::weight`,
/// `HIGHLANDER_NODE_WEIGHT`).
pub const DEFAULT_WEIGHT: u32 = 1;

/// Longest node name, label or affinity entry in bytes.
pub(crate) const MAX_NAME_LEN: usize = 200;

/// A node that may run an id: its name, weight and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    name: Arc<str>,
    weight: u32,
    labels: Vec<Arc<str>>,
}

impl Candidate {
    /// The node `name` with `weight` and no labels.
    pub fn new(name: impl Into<Arc<str>>, weight: u32) -> Self {
        Candidate {
            name: name.into(),
            weight,
            labels: Vec::new(),
        }
    }

    /// Sets the node's labels (`"zone=eu"`, `"ssd"`).
    #[must_use]
    pub fn labels<I, S>(mut self, labels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<Arc<str>>,
    {
        self.labels = labels.into_iter().map(Into::into).collect();
        self
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's weight.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// True when `entry` (a node name or a label) names this node.
    pub fn matches(&self, entry: &str) -> bool {
        *self.name == *entry || self.labels.iter().any(|l| **l == *entry)
    }
}

/// Where a service would rather run: node names or labels it prefers and
/// ones it avoids (see the [module](self) for how they rank). Set on a
/// [`ChildSpec`](crate::ChildSpec) with `prefer` / `avoid`, or in the
/// attribute with `prefer = [..]` / `avoid = [..]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Affinity {
    prefer: Vec<String>,
    avoid: Vec<String>,
}

impl Affinity {
    /// Sets the node names or labels to prefer.
    #[must_use]
    pub fn prefer<I, S>(mut self, entries: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.prefer = entries.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the node names or labels to avoid.
    #[must_use]
    pub fn avoid<I, S>(mut self, entries: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.avoid = entries.into_iter().map(Into::into).collect();
        self
    }

    /// The preferred node names or labels.
    pub fn preferred(&self) -> &[String] {
        &self.prefer
    }

    /// The avoided node names or labels.
    pub fn avoided(&self) -> &[String] {
        &self.avoid
    }

    /// True when neither list has an entry.
    pub fn is_empty(&self) -> bool {
        self.prefer.is_empty() && self.avoid.is_empty()
    }

    /// 0 preferred, 1 neither, 2 avoided.
    fn tier(&self, candidate: &Candidate) -> u8 {
        if self.avoid.iter().any(|e| candidate.matches(e)) {
            2
        } else if self.prefer.iter().any(|e| candidate.matches(e)) {
            0
        } else {
            1
        }
    }

    /// Checks every entry: each must be something a node name or a label can
    /// be, and none may appear twice (also not in both lists).
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut seen: Vec<&str> = Vec::new();
        for (list, entries) in [("prefer", &self.prefer), ("avoid", &self.avoid)] {
            for entry in entries {
                if let Err(why) = check_name(entry) {
                    return Err(format!(
                        "`{list}` entry `{}` cannot name a node: {why}",
                        printable(entry)
                    ));
                }
                if seen.contains(&entry.as_str()) {
                    return Err(format!(
                        "`{list}` entry `{entry}` is given twice: name each node or label once, in `prefer` or in `avoid`"
                    ));
                }
                seen.push(entry);
            }
        }
        Ok(())
    }
}

/// The candidates for `id`, best first: see the [module](self) for the
/// rule. The first one is where the id belongs; the position of a node in
/// the list is how far it is from being that node.
pub fn rank<'a>(id: &str, affinity: &Affinity, candidates: &'a [Candidate]) -> Vec<&'a Candidate> {
    let prefix = id_prefix(id);
    let mut keyed: Vec<(Key, &Candidate)> = candidates
        .iter()
        .map(|c| (Key::new(prefix, affinity, c), c))
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0, a.1, b.1));
    keyed.into_iter().map(|(_, c)| c).collect()
}

/// The best candidate for `id` (the first of [`rank`]), without sorting the
/// rest; `None` when there is no candidate.
pub fn place<'a>(
    id: &str,
    affinity: &Affinity,
    candidates: &'a [Candidate],
) -> Option<&'a Candidate> {
    let prefix = id_prefix(id);
    candidates
        .iter()
        .map(|c| (Key::new(prefix, affinity, c), c))
        .min_by(|a, b| a.0.cmp(&b.0, a.1, b.1))
        .map(|(_, c)| c)
}

/// Where the node named `node` stands for `id` among `candidates`: 0 for
/// the best one, `None` when it is not a candidate.
pub fn position(
    id: &str,
    affinity: &Affinity,
    candidates: &[Candidate],
    node: &str,
) -> Option<usize> {
    rank(id, affinity, candidates)
        .iter()
        .position(|c| c.name() == node)
}

/// Where `me` stands for `id` among `me` and `others` (who must not include
/// `me`), without sorting or allocating: how many of `others` rank ahead of
/// `me`, and the best of `others` (the one `me` would hand the id to). What
/// the runtime computes for every id at each change of members.
pub(crate) fn standing<'a>(
    id: &str,
    affinity: &Affinity,
    me: &Candidate,
    others: impl IntoIterator<Item = &'a Candidate>,
) -> (usize, Option<&'a Candidate>) {
    let prefix = id_prefix(id);
    let mine = Key::new(prefix, affinity, me);
    let mut ahead = 0;
    let mut best: Option<(Key, &Candidate)> = None;
    for c in others {
        let key = Key::new(prefix, affinity, c);
        if key.cmp(&mine, c, me) == Ordering::Less {
            ahead += 1;
        }
        if best
            .as_ref()
            .is_none_or(|(k, b)| key.cmp(k, c, b) == Ordering::Less)
        {
            best = Some((key, c));
        }
    }
    (ahead, best.map(|(_, c)| c))
}

/// The sort key of one candidate for one id: lower sorts first.
struct Key {
    zero_weight: bool,
    tier: u8,
    score: f64,
}

impl Key {
    fn new(prefix: u64, affinity: &Affinity, c: &Candidate) -> Key {
        let u = unit(finish(fnv1a(prefix, c.name.as_bytes())));
        // Weight 0 ranks after every positive weight; among themselves such
        // nodes rank as if of weight 1.
        let weight = f64::from(c.weight.max(1));
        Key {
            zero_weight: c.weight == 0,
            tier: affinity.tier(c),
            score: weight / -ln(u),
        }
    }

    fn cmp(&self, other: &Key, a: &Candidate, b: &Candidate) -> Ordering {
        (self.zero_weight, self.tier)
            .cmp(&(other.zero_weight, other.tier))
            .then_with(|| other.score.total_cmp(&self.score))
            .then_with(|| a.name.cmp(&b.name))
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Between the id and the node name: a byte neither can contain.
const SEPARATOR: u8 = 0xff;

fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// FNV-1a over the id and the separator: the part of the hash every
/// candidate of one id shares.
fn id_prefix(id: &str) -> u64 {
    fnv1a(fnv1a(FNV_OFFSET, id.as_bytes()), &[SEPARATOR])
}

/// The stable digest of a list of ids (each followed by the separator):
/// equal on two nodes exactly when, with overwhelming probability, they
/// name the same ids in the same order. What
/// [`Catalog::digest`](crate::backend::Catalog::digest) is.
pub(crate) fn digest<'a>(ids: impl IntoIterator<Item = &'a str>) -> u64 {
    let state = ids.into_iter().fold(FNV_OFFSET, |state, id| {
        fnv1a(fnv1a(state, id.as_bytes()), &[SEPARATOR])
    });
    finish(state)
}

/// SplitMix64's finaliser: every input bit reaches every output bit.
fn finish(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The stable 64-bit hash of `(id, node)`, as [`Key::new`] computes it.
#[cfg(test)]
fn hash(id: &str, node: &str) -> u64 {
    finish(fnv1a(id_prefix(id), node.as_bytes()))
}

/// The top 52 bits of a hash as a number in the open interval (0, 1):
/// `(k + 0.5) / 2^52`, exact in an `f64` (53 bits of precision), so never
/// 0 and never 1.
fn unit(h: u64) -> f64 {
    ((h >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64)
}

/// The natural logarithm of `x` in (0, 1], from basic operations only (each
/// correctly rounded by IEEE 754), so that it is the same bits on every
/// platform, unlike `f64::ln`, which calls the platform's maths library.
/// Accurate to a few units in the last place.
fn ln(x: f64) -> f64 {
    const LN_2: f64 = std::f64::consts::LN_2;
    const SQRT_2: f64 = std::f64::consts::SQRT_2;
    debug_assert!(x > 0.0 && x.is_finite());
    // x = m * 2^e with m in [1, 2): read off the bits (x is normal here:
    // the smallest input is 2^-53).
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    // Bring m into [sqrt(1/2), sqrt(2)) so the series below converges fast.
    if m >= SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut term = s;
    let mut sum = 0.0;
    let mut k = 1.0;
    // s^(2n+1) / (2n+1) < 2^-60 well before n = 12.
    for _ in 0..12 {
        sum += term / k;
        term *= s2;
        k += 2.0;
    }
    e as f64 * LN_2 + 2.0 * sum
}

/// Checks a node name, label or affinity entry: 1 to 200 visible ASCII
/// characters.
pub(crate) fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Err("it is longer than 200 bytes")
    } else if !name.bytes().all(|b| b.is_ascii_graphic()) {
        Err("use only visible ASCII characters (no spaces)")
    } else {
        Ok(())
    }
}

/// Checks a node label: a name (see [`check_name`]) without a comma (the
/// separator of `HIGHLANDER_NODE_LABELS`); `key=value` needs both sides.
pub(crate) fn check_label(label: &str) -> Result<(), String> {
    let why = match check_name(label) {
        Err(why) => Some(why),
        Ok(()) if label.contains(',') => Some("a label cannot contain a comma"),
        Ok(()) => match label.split_once('=') {
            Some(("", _)) => Some("`=value` needs a key: write `key=value`"),
            Some((_, "")) => Some("`key=` needs a value: write `key=value`, or the key alone"),
            _ => None,
        },
    };
    match why {
        None => Ok(()),
        Some(why) => Err(format!("invalid node label `{}`: {why}", printable(label))),
    }
}

/// At most 60 characters of `text`, for messages.
fn printable(text: &str) -> String {
    text.chars().take(60).collect()
}

/// The weight of this node as `HIGHLANDER_NODE_WEIGHT` gives it.
pub(crate) fn parse_weight(text: &str) -> Result<u32, String> {
    text.trim().parse::<u32>().map_err(|_| {
        format!(
            "HIGHLANDER_NODE_WEIGHT: `{}` is not a weight: use a whole number from 0 to 4294967295 \
             (1 is the default; 0 hosts an id only when no other node can)",
            printable(text)
        )
    })
}

/// The labels of this node as `HIGHLANDER_NODE_LABELS` gives them:
/// comma-separated, spaces around each ignored (`zone=eu, ssd`).
pub(crate) fn parse_labels(text: &str) -> Result<Vec<String>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let labels: Vec<String> = text.split(',').map(|l| l.trim().to_string()).collect();
    check_labels(&labels).map_err(|why| format!("HIGHLANDER_NODE_LABELS: {why}"))?;
    Ok(labels)
}

/// Checks each label and that none is given twice.
pub(crate) fn check_labels(labels: &[String]) -> Result<(), String> {
    for (i, label) in labels.iter().enumerate() {
        if label.is_empty() {
            return Err(
                "an empty label (two commas in a row, or one at an end): write labels like `zone=eu,ssd`"
                    .to_string(),
            );
        }
        check_label(label)?;
        if labels[..i].contains(label) {
            return Err(format!("node label `{label}` is given twice"));
        }
    }
    Ok(())
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (weight {}", self.name, self.weight)?;
        for label in &self.labels {
            write!(f, ", {label}")?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests;
