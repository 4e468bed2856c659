//! Membership as plain data: where a member's keys live beside the ids'
//! keys, what a member key says (its weight, labels and the digest of its
//! catalog), and how a catalog of up to 100,000 ids is cut into chunks that
//! each fit in one etcd request and put together again. The I/O is
//! `fleet`'s; these rules are tested here without etcd.
//!
//! # Key layout under `/{namespace}/`
//!
//! ```text
//! {id}                                   an id's key (bytes A-Z a-z 0-9 . _ : / -)
//! ~m/{node}                              a member (under its lease)
//! ~r/{id}                                a reservation made by `release_to`
//! ~~c/{node}/{digest:016x}/{chunk:05}    a member's catalog (under its lease)
//! ```
//!
//! `~` is in no id (`validate_id`) and sorts after every byte an id may
//! hold, so `[prefix, prefix + "~")` is exactly the ids, and the watch over
//! `[prefix, prefix + "~~")` sees the ids, the members and the reservations
//! but not the catalogs (which it would otherwise carry to every node again).
//! The node name is one segment: `%` and `/` in it are percent-encoded.

use std::sync::Arc;

use crate::backend::{Catalog, Profile};

/// What a key under the namespace prefix is.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum KeyKind<'a> {
    Id(&'a str),
    Member(String),
    Reservation(&'a str),
    /// A catalog chunk, or a key this version does not know.
    Other,
}

/// The largest chunk of a catalog: 1 MiB, under etcd's default request
/// limit of 1.5 MiB with room for the key and the request's framing.
pub(super) const CHUNK_BYTES: usize = 1 << 20;

/// The first line of a member key's value: the format, so a later version
/// can tell.
const HEADER: &str = "highlander-member 1";

/// `node` as one key segment: `%` and `/` percent-encoded.
pub(super) fn escape(node: &str) -> String {
    let mut out = String::with_capacity(node.len());
    for c in node.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out
}

/// The node name a key segment encodes (`escape` undone); `None` for a
/// segment `escape` does not write.
pub(super) fn unescape(segment: &str) -> Option<String> {
    let mut out = String::with_capacity(segment.len());
    let mut rest = segment;
    while let Some(at) = rest.find(['%', '/']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if tail.starts_with("%25") {
            out.push('%');
        } else if tail.starts_with("%2F") {
            out.push('/');
        } else {
            return None;
        }
        rest = &tail[3..];
    }
    out.push_str(rest);
    Some(out)
}

/// The key layout of one namespace.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// `/{namespace}/`.
    pub(super) prefix: String,
}

impl Layout {
    pub(super) fn new(prefix: impl Into<String>) -> Layout {
        Layout {
            prefix: prefix.into(),
        }
    }

    /// The key of `id`.
    pub(super) fn id(&self, id: &str) -> Vec<u8> {
        format!("{}{id}", self.prefix).into_bytes()
    }

    /// The end of the range of every id's key (and nothing else).
    pub(super) fn ids_end(&self) -> Vec<u8> {
        format!("{}~", self.prefix).into_bytes()
    }

    /// The end of the watched range: ids, members and reservations.
    pub(super) fn watch_end(&self) -> Vec<u8> {
        format!("{}~~", self.prefix).into_bytes()
    }

    /// The prefix of every member key.
    pub(super) fn members(&self) -> Vec<u8> {
        format!("{}~m/", self.prefix).into_bytes()
    }

    /// The member key of `node`.
    pub(super) fn member(&self, node: &str) -> Vec<u8> {
        format!("{}~m/{}", self.prefix, escape(node)).into_bytes()
    }

    /// The reservation key of `id`.
    pub(super) fn reservation(&self, id: &str) -> Vec<u8> {
        format!("{}~r/{id}", self.prefix).into_bytes()
    }

    /// The prefix of every chunk of `node`'s catalog of `digest`.
    pub(super) fn catalog(&self, node: &str, digest: u64) -> Vec<u8> {
        format!("{}~~c/{}/{digest:016x}/", self.prefix, escape(node)).into_bytes()
    }

    /// The key of chunk `n` of `node`'s catalog of `digest` (chunks sort in
    /// order: five digits hold 10 GiB of catalog).
    pub(super) fn chunk(&self, node: &str, digest: u64, n: usize) -> Vec<u8> {
        let mut key = self.catalog(node, digest);
        key.extend_from_slice(format!("{n:05}").as_bytes());
        key
    }

    /// What `key` is; `None` for a key outside the namespace.
    pub(super) fn kind<'a>(&self, key: &'a [u8]) -> Option<KeyKind<'a>> {
        let rest = std::str::from_utf8(key.strip_prefix(self.prefix.as_bytes())?).ok()?;
        Some(if let Some(node) = rest.strip_prefix("~m/") {
            unescape(node).map_or(KeyKind::Other, KeyKind::Member)
        } else if let Some(id) = rest.strip_prefix("~r/") {
            KeyKind::Reservation(id)
        } else if rest.starts_with('~') {
            KeyKind::Other
        } else {
            KeyKind::Id(rest)
        })
    }
}

/// What a member key says: its profile without the ids, and where the ids
/// are (the digest, how many ids and chunks). `None` as a whole for a
/// member that announced nothing yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Card {
    pub(super) weight: u32,
    pub(super) labels: Vec<String>,
    pub(super) digest: u64,
    pub(super) ids: usize,
    pub(super) chunks: usize,
}

impl Card {
    /// The card of `profile` whose catalog is cut into `chunks` chunks.
    pub(super) fn of(profile: &Profile, chunks: usize) -> Card {
        Card {
            weight: profile.weight,
            labels: profile.labels.clone(),
            digest: profile.catalog.digest(),
            ids: profile.catalog.len(),
            chunks,
        }
    }

    /// The profile this card describes, with `catalog`.
    pub(super) fn profile(&self, catalog: Catalog) -> Profile {
        Profile::new(self.weight, self.labels.clone(), catalog)
    }
}

/// A label on one line: `%`, `\n` and `\r` percent-encoded.
fn escape_label(label: &str) -> String {
    label
        .replace('%', "%25")
        .replace('\n', "%0A")
        .replace('\r', "%0D")
}

fn unescape_label(line: &str) -> String {
    line.replace("%0D", "\r")
        .replace("%0A", "\n")
        .replace("%25", "%")
}

/// The value of a member key: a header line, then (after `announce`) the
/// weight, the catalog and one line per label.
pub(super) fn encode_card(card: Option<&Card>) -> Vec<u8> {
    let mut out = String::from(HEADER);
    out.push('\n');
    if let Some(card) = card {
        out.push_str(&format!(
            "weight {}\ncatalog {:016x} {} {}\n",
            card.weight, card.digest, card.ids, card.chunks
        ));
        for label in &card.labels {
            out.push_str("label ");
            out.push_str(&escape_label(label));
            out.push('\n');
        }
    }
    out.into_bytes()
}

/// A member key's value read back: `Ok(None)` for a member that announced
/// nothing, `Err` for a value this version cannot read (another format).
pub(super) fn decode_card(value: &[u8]) -> std::result::Result<Option<Card>, String> {
    let text = std::str::from_utf8(value).map_err(|_| "not UTF-8".to_string())?;
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(format!("not `{HEADER}`"));
    }
    let (mut weight, mut catalog, mut labels) = (None, None, Vec::new());
    for line in lines {
        let (field, value) = line.split_once(' ').unwrap_or((line, ""));
        match field {
            "weight" => weight = value.parse::<u32>().ok(),
            "catalog" => {
                let mut parts = value.split(' ');
                let digest = parts.next().and_then(|d| u64::from_str_radix(d, 16).ok());
                let ids = parts.next().and_then(|n| n.parse::<usize>().ok());
                let chunks = parts.next().and_then(|n| n.parse::<usize>().ok());
                catalog = Some((digest, ids, chunks));
            }
            "label" => labels.push(unescape_label(value)),
            _ => {} // a field of a later version
        }
    }
    match (weight, catalog) {
        (None, None) if labels.is_empty() => Ok(None),
        (Some(weight), Some((Some(digest), Some(ids), Some(chunks)))) => Ok(Some(Card {
            weight,
            labels,
            digest,
            ids,
            chunks,
        })),
        _ => Err("an incomplete profile".to_string()),
    }
}

/// `catalog`'s ids, `\n`-separated, cut at id boundaries into chunks of at
/// most `max` bytes (an id is at most 200 bytes, far less than `max`).
pub(super) fn chunks(catalog: &Catalog, max: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut chunk: Vec<u8> = Vec::new();
    for id in catalog.ids() {
        let need = id.len() + usize::from(!chunk.is_empty());
        if !chunk.is_empty() && chunk.len() + need > max {
            out.push(std::mem::take(&mut chunk));
        }
        if !chunk.is_empty() {
            chunk.push(b'\n');
        }
        chunk.extend_from_slice(id.as_bytes());
    }
    if !chunk.is_empty() {
        out.push(chunk);
    }
    out
}

/// The catalog `card` describes, from its chunks in key order; `Err` when
/// they do not add up to it (a chunk missing, or another catalog's).
pub(super) fn assemble(card: &Card, chunks: &[&[u8]]) -> std::result::Result<Catalog, String> {
    if chunks.len() != card.chunks {
        return Err(format!(
            "{} of its {} catalog chunks found",
            chunks.len(),
            card.chunks
        ));
    }
    let mut ids: Vec<Arc<str>> = Vec::with_capacity(card.ids);
    for chunk in chunks {
        let text = std::str::from_utf8(chunk).map_err(|_| "a catalog chunk is not UTF-8")?;
        ids.extend(text.split('\n').filter(|s| !s.is_empty()).map(Arc::from));
    }
    let catalog = Catalog::new(ids);
    if catalog.len() != card.ids || catalog.digest() != card.digest {
        return Err(format!(
            "its catalog chunks hold {} ids with digest {:016x}, not {} with {:016x}",
            catalog.len(),
            catalog.digest(),
            card.ids,
            card.digest
        ));
    }
    Ok(catalog)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new("/ns/")
    }

    #[test]
    fn ids_members_reservations_and_catalogs_never_share_a_key() {
        let l = layout();
        assert_eq!(l.kind(&l.id("a/b")), Some(KeyKind::Id("a/b")));
        assert_eq!(
            l.kind(&l.member("n/1%")),
            Some(KeyKind::Member("n/1%".into()))
        );
        assert_eq!(
            l.kind(&l.reservation("a/b")),
            Some(KeyKind::Reservation("a/b"))
        );
        assert_eq!(l.kind(&l.chunk("n", 7, 0)), Some(KeyKind::Other));
        assert_eq!(l.kind(b"/other/a"), None);
        // Every id byte sorts before `~`: the ids' range holds every id
        // and no member, reservation or catalog key.
        let id_bytes = (0u8..=255)
            .filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'));
        for b in id_bytes {
            let key = l.id(&(b as char).to_string().repeat(3));
            assert!(key < l.ids_end(), "{key:?}");
        }
        for key in [l.member("a"), l.reservation("a"), l.chunk("a", 1, 2)] {
            assert!(key >= l.ids_end(), "{key:?}");
        }
        // The watch sees members and reservations, not catalogs.
        assert!(l.member("~~~") < l.watch_end());
        assert!(l.reservation("zzz") < l.watch_end());
        assert!(l.chunk("", 0, 0) >= l.watch_end());
    }

    #[test]
    fn a_node_name_is_one_segment_both_ways() {
        for node in ["a", "a/b", "100%", "%2F", "x%25/y", ""] {
            assert_eq!(unescape(&escape(node)).as_deref(), Some(node));
            assert!(!escape(node).contains('/'));
        }
        assert_ne!(escape("a/b"), escape("a%2Fb"));
        assert_eq!(unescape("a%zz"), None);
        assert_eq!(unescape("a/b"), None);
        // One node's catalog prefix is never a prefix of another's.
        let l = layout();
        assert!(
            !l.catalog("a/0000000000000001", 1)
                .starts_with(&l.catalog("a", 1))
        );
    }

    #[test]
    fn a_card_round_trips_and_a_silent_member_has_none() {
        let profile = Profile::new(
            3,
            vec!["zone=eu".into(), "odd\nlabel %".into()],
            Catalog::new(["b", "a"]),
        );
        let card = Card::of(&profile, 1);
        let back = decode_card(&encode_card(Some(&card))).unwrap().unwrap();
        assert_eq!(back, card);
        assert_eq!(back.profile(profile.catalog.clone()), profile);
        assert_eq!(decode_card(&encode_card(None)), Ok(None));
        assert!(decode_card(b"node-1").is_err(), "another format");
        assert!(decode_card(b"highlander-member 1\nweight 2\n").is_err());
        // A later version's fields are skipped.
        let mut later = encode_card(Some(&card));
        later.extend_from_slice(b"colour blue\n");
        assert_eq!(decode_card(&later).unwrap(), Some(card));
    }

    #[test]
    fn a_catalog_is_cut_at_id_boundaries_and_put_together_again() {
        let catalog = Catalog::new((0..1000).map(|i| format!("svc/{i:04}")));
        let cut = chunks(&catalog, 100);
        assert!(cut.len() > 1);
        assert!(cut.iter().all(|c| c.len() <= 100));
        let card = Card::of(&Profile::new(1, vec![], catalog.clone()), cut.len());
        let parts: Vec<&[u8]> = cut.iter().map(Vec::as_slice).collect();
        assert_eq!(assemble(&card, &parts), Ok(catalog.clone()));
        // A chunk missing, or another catalog's chunks, are caught.
        assert!(assemble(&card, &parts[1..]).is_err());
        let mut swapped = parts.clone();
        swapped[0] = b"svc/9999";
        assert!(assemble(&card, &swapped).is_err());
        // An empty catalog has no chunk.
        let empty = Card::of(&Profile::default(), 0);
        assert_eq!(chunks(&Catalog::default(), 100).len(), 0);
        assert_eq!(assemble(&empty, &[]), Ok(Catalog::default()));
    }

    #[test]
    fn a_hundred_thousand_ids_take_two_chunks_of_at_most_one_mib() {
        let catalog = Catalog::new((0..100_000).map(|i| format!("tenant/{i:06}")));
        let cut = chunks(&catalog, CHUNK_BYTES);
        let bytes: usize = cut.iter().map(Vec::len).sum();
        assert_eq!(bytes, 100_000 * 14 - 1 - (cut.len() - 1));
        assert_eq!(cut.len(), 2);
        assert!(cut.iter().all(|c| c.len() <= CHUNK_BYTES));
    }
}
