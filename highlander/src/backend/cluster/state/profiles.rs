//! Profiles: what each member announced for placement
//! ([`Session::announce`](crate::backend::Session::announce)). A profile's
//! head (weight, labels, the digest and length of its catalog) rides in
//! every `Sync` and `Announce`; the catalog itself (up to 100,000 ids and
//! more) is asked for with `CatalogWant` only by a member that has no
//! catalog of that digest yet (neither its own nor another member's), and
//! comes in `CatalogPart`s of about one `SYNC_CHUNK` each. A member's
//! profile is shown once its catalog is complete (until then, its previous
//! one), and dropped when the member goes down or leaves.

use std::sync::Arc;

use tracing::{debug, warn};

use super::{ConnId, Effect, Effects, State};
use crate::backend::cluster::encoding::catalog_id_len;
use crate::backend::cluster::wire::{Msg, ProfileHead, SYNC_CHUNK};
use crate::backend::{Catalog, Profile};

/// What one member announced, as far as this node has it.
#[derive(Default)]
pub(super) struct Announced {
    /// The latest head it sent.
    head: Option<ProfileHead>,
    /// Its latest profile whose catalog this node has in full: what
    /// `members` shows.
    shown: Option<Profile>,
    /// The catalog of the latest head, while it arrives.
    incoming: Option<Incoming>,
}

/// A catalog on its way, asked for on connection `conn`.
struct Incoming {
    digest: u64,
    conn: ConnId,
    /// The part expected next.
    next: u32,
    ids: Vec<Arc<str>>,
}

impl Announced {
    /// The profile to show, when this node has one in full.
    pub(super) fn shown(&self) -> Option<&Profile> {
        self.shown.as_ref()
    }
}

/// The head of `profile`: all of it but the ids.
fn head_of(profile: &Profile) -> ProfileHead {
    ProfileHead {
        weight: profile.weight,
        labels: profile.labels.clone(),
        digest: profile.catalog.digest(),
        len: u32::try_from(profile.catalog.len()).unwrap_or(u32::MAX),
    }
}

/// Whether `profile` is what `head` describes (its catalog by digest).
fn matches(profile: &Profile, head: &ProfileHead) -> bool {
    profile.weight == head.weight
        && profile.labels == head.labels
        && profile.catalog.digest() == head.digest
        && profile.catalog.len() == head.len as usize
}

/// `catalog` as the `CatalogPart` frames that carry it, each of about
/// `chunk` bytes of ids at most (one id more than fits, when one is larger
/// than `chunk`), the last one marked; an empty catalog is one empty part.
pub(in crate::backend::cluster) fn catalog_parts(catalog: &Catalog, chunk: usize) -> Vec<Msg> {
    let digest = catalog.digest();
    let mut parts = Vec::new();
    let mut ids = Vec::new();
    let mut size = 0;
    for id in catalog.ids() {
        let len = catalog_id_len(id);
        if !ids.is_empty() && size + len > chunk {
            parts.push(Msg::CatalogPart {
                digest,
                part: parts.len() as u32,
                last: false,
                ids: std::mem::take(&mut ids),
            });
            size = 0;
        }
        size += len;
        ids.push(id.clone());
    }
    parts.push(Msg::CatalogPart {
        digest,
        part: parts.len() as u32,
        last: true,
        ids,
    });
    parts
}

impl State {
    /// This node announces `profile`: kept for every later connection's
    /// `Sync`, and its head sent to every member now (nothing is sent
    /// when only the ids' order or duplicates changed, which a catalog
    /// does not keep).
    pub(in crate::backend::cluster) fn announce(&mut self, profile: Profile) -> Effects {
        let mut fx = Effects::default();
        if self.closed {
            return fx;
        }
        let head = head_of(&profile);
        let same = self.profile.as_ref().is_some_and(|p| matches(p, &head));
        self.profile = Some(profile);
        if !same {
            fx.send(self.every_conn(), Msg::Announce(head));
            fx.push(Effect::Members);
        }
        fx
    }

    /// The head of this node's profile, for its `Sync`.
    pub(super) fn own_head(&self) -> Option<ProfileHead> {
        self.profile.as_ref().map(head_of)
    }

    /// A catalog of `digest` with `len` ids this node has already: its
    /// own, or one another member announced.
    fn known_catalog(&self, digest: u64, len: u32) -> Option<Catalog> {
        let fits = |c: &Catalog| c.digest() == digest && c.len() == len as usize;
        self.profile
            .iter()
            .chain(self.members.values().filter_map(|p| p.profile.shown()))
            .map(|p| &p.catalog)
            .find(|c| fits(c))
            .cloned()
    }

    /// `peer` announced `head` (in `Announce`, or its `Sync` on `conn`):
    /// shown at once when this node has the catalog, else asked for
    /// (once per connection and digest).
    pub(super) fn on_announce(
        &mut self,
        peer: &Arc<str>,
        conn: ConnId,
        head: ProfileHead,
        fx: &mut Effects,
    ) {
        let known = self.known_catalog(head.digest, head.len);
        let Some(p) = self.members.get_mut(peer) else {
            return;
        };
        let a = &mut p.profile;
        match known {
            Some(catalog) => {
                a.incoming = None;
                if !a.shown.as_ref().is_some_and(|s| matches(s, &head)) {
                    a.shown = Some(Profile::new(head.weight, head.labels.clone(), catalog));
                    fx.push(Effect::Members);
                }
            }
            None => {
                let asked = a
                    .incoming
                    .as_ref()
                    .is_some_and(|i| i.digest == head.digest && i.conn == conn);
                if !asked {
                    a.incoming = Some(Incoming {
                        digest: head.digest,
                        conn,
                        next: 0,
                        ids: Vec::new(),
                    });
                    debug!(node = %self.name, %peer, ids = head.len, "asking a member for its catalog");
                    let want = Msg::CatalogWant {
                        digest: head.digest,
                    };
                    fx.send(vec![(peer.clone(), conn)], want);
                }
            }
        }
        a.head = Some(head);
    }

    /// `peer` asks for this node's catalog of `digest`: sent in parts on
    /// `conn` when it is the one this node announced last (an older one
    /// is not kept; the peer has the newer head by then and asks for it).
    pub(super) fn on_catalog_want(
        &mut self,
        peer: &Arc<str>,
        conn: ConnId,
        digest: u64,
        fx: &mut Effects,
    ) {
        let Some(profile) = self
            .profile
            .as_ref()
            .filter(|p| p.catalog.digest() == digest)
        else {
            return;
        };
        let parts = catalog_parts(&profile.catalog, SYNC_CHUNK);
        debug!(node = %self.name, %peer, ids = profile.catalog.len(), parts = parts.len(), "sending this node's catalog");
        for part in parts {
            fx.send(vec![(peer.clone(), conn)], part);
        }
    }

    /// Part `part` of `peer`'s catalog of `digest`. The last part makes
    /// the profile shown, once its ids match the digest announced; every
    /// other member waiting for a catalog of that digest gets it too.
    pub(super) fn on_catalog_part(
        &mut self,
        peer: &Arc<str>,
        digest: u64,
        part: u32,
        last: bool,
        ids: Vec<Arc<str>>,
        fx: &mut Effects,
    ) {
        let Some(p) = self.members.get_mut(peer) else {
            return;
        };
        let a = &mut p.profile;
        let Some(incoming) = a.incoming.as_mut().filter(|i| i.digest == digest) else {
            return;
        };
        if part == 0 {
            incoming.ids.clear();
            incoming.next = 0;
        }
        if part != incoming.next {
            // Frames on one connection arrive in order: a gap is a bug.
            warn!(node = %self.name, %peer, part, "a catalog part out of order: ignoring that catalog");
            a.incoming = None;
            return;
        }
        incoming.ids.extend(ids);
        incoming.next += 1;
        if !last {
            return;
        }
        let ids = a.incoming.take().map(|i| i.ids).unwrap_or_default();
        let Some(head) = a.head.clone().filter(|h| h.digest == digest) else {
            return;
        };
        let catalog = Catalog::new(ids);
        if catalog.digest() != digest || catalog.len() != head.len as usize {
            warn!(
                node = %self.name, %peer,
                "the catalog a member sent does not match the digest it announced: ignored until it announces again"
            );
            return;
        }
        for (name, p) in self.members.iter_mut() {
            let a = &mut p.profile;
            let waits = a.incoming.as_ref().is_some_and(|i| i.digest == digest);
            if let Some(head) = a.head.as_ref().filter(|_| name == peer || waits) {
                a.incoming = None;
                a.shown = Some(Profile::new(
                    head.weight,
                    head.labels.clone(),
                    catalog.clone(),
                ));
            }
        }
        debug!(node = %self.name, %peer, ids = head.len, "received a member's catalog");
        fx.push(Effect::Members);
    }

    /// `peer` went down or left: its profile goes with it.
    pub(super) fn drop_profile(&mut self, peer: &Arc<str>) {
        if let Some(p) = self.members.get_mut(peer) {
            p.profile = Announced::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::tests::{at, connect, has, info, name, ready, sent};
    use super::super::{ConnId, Effect, Effects, State};
    use super::catalog_parts;
    use crate::backend::cluster::wire::{Msg, SYNC_CHUNK};
    use crate::backend::{Catalog, Member, Profile};

    fn profile(weight: u32, labels: &[&str], ids: impl IntoIterator<Item = String>) -> Profile {
        Profile::new(
            weight,
            labels.iter().map(|l| l.to_string()).collect(),
            Catalog::new(ids),
        )
    }

    fn ids(prefix: &str, n: usize) -> impl Iterator<Item = String> {
        let prefix = prefix.to_string();
        (0..n).map(move |i| format!("{prefix}/{i:05}"))
    }

    fn member<'a>(members: &'a [Member], node: &str) -> &'a Member {
        members.iter().find(|m| m.node == node).expect("a member")
    }

    /// Hands every frame `fx` queues for `to` to `to`'s state, as sent by
    /// `from` on `conn`; returns what `to` answered.
    fn deliver(fx: &Effects, from: &str, to: &mut State, to_name: &str, conn: ConnId) -> Effects {
        let mut answers = Effects::default();
        for (peer, msg) in sent(fx) {
            if peer == to_name {
                for e in to.on_frame(&name(from), conn, msg.clone(), at(1)).0 {
                    answers.push(e);
                }
            }
        }
        answers
    }

    /// Two nodes `a` and `b` connected both ways: (a, b, a's conn to b, b's
    /// conn to a).
    fn pair() -> (State, State, ConnId, ConnId) {
        let mut a = ready("a");
        let mut b = ready("b");
        let (ab, _) = connect(&mut a, "b", vec![]);
        let (ba, _) = connect(&mut b, "a", vec![]);
        (a, b, ab, ba)
    }

    #[test]
    fn a_catalog_is_asked_for_once_and_arrives_in_parts() {
        let (mut a, mut b, ab, ba) = pair();
        let mine = profile(3, &["zone=eu", "ssd"], ids("job", 1000));
        let fx = a.announce(mine.clone());
        assert!(has(&fx, |e| matches!(e, Effect::Members)));
        assert!(matches!(sent(&fx)[..], [("b", Msg::Announce(_))]));
        assert_eq!(member(&a.members(None), "a").profile.as_ref(), Some(&mine));
        // b has no catalog of that digest: it asks a for it, once.
        let want = deliver(&fx, "a", &mut b, "b", ba);
        assert!(matches!(sent(&want)[..], [("a", Msg::CatalogWant { .. })]));
        assert!(
            member(&b.members(None), "a").profile.is_none(),
            "not in full yet"
        );
        let again = deliver(&fx, "a", &mut b, "b", ba);
        assert!(sent(&again).is_empty(), "asked once per connection");
        // a answers on that connection, in parts when it is large.
        let parts = deliver(&want, "b", &mut a, "a", ab);
        assert_eq!(sent(&parts).len(), 1);
        let shown = deliver(&parts, "a", &mut b, "b", ba);
        assert!(has(&shown, |e| matches!(e, Effect::Members)));
        let seen = member(&b.members(None), "a")
            .profile
            .clone()
            .expect("shown");
        assert_eq!(seen, mine);
        assert_eq!(seen.catalog.digest(), mine.catalog.digest());
    }

    #[test]
    fn parts_are_bounded_by_the_chunk_and_add_up_to_the_catalog() {
        let catalog = Catalog::new(ids("a-rather-long-prefix-of-an-id", 500));
        let chunk = 1000;
        let parts = catalog_parts(&catalog, chunk);
        assert!(parts.len() > 10, "{}", parts.len());
        let mut all = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let Msg::CatalogPart {
                digest,
                part,
                last,
                ids,
            } = part
            else {
                panic!("{part:?}")
            };
            assert_eq!(*digest, catalog.digest());
            assert_eq!(*part as usize, i);
            assert_eq!(*last, i == parts.len() - 1);
            assert!(ids.iter().map(|id| 2 + id.len()).sum::<usize>() <= chunk);
            all.extend(ids.iter().cloned());
        }
        assert_eq!(Catalog::new(all), catalog);
        // Empty: one empty last part. The real chunk: 100,000 ids in one part.
        assert!(matches!(
            &catalog_parts(&Catalog::default(), SYNC_CHUNK)[..],
            [Msg::CatalogPart { part: 0, last: true, ids, .. }] if ids.is_empty()
        ));
        let big = Catalog::new(ids("fleet", 100_000));
        assert_eq!(catalog_parts(&big, SYNC_CHUNK).len(), 1);
    }

    #[test]
    fn a_catalog_this_node_has_is_never_sent_again() {
        let (mut a, mut b, _, ba) = pair();
        // The same ids on both nodes: b already has the catalog (its own).
        let _ = b.announce(profile(1, &[], ids("job", 10)));
        let fx = a.announce(profile(2, &["x"], ids("job", 10)));
        let answer = deliver(&fx, "a", &mut b, "b", ba);
        assert!(sent(&answer).is_empty(), "nothing asked for");
        let seen = member(&b.members(None), "a")
            .profile
            .clone()
            .expect("shown");
        assert_eq!((seen.weight, &seen.labels[..]), (2, &["x".to_string()][..]));
        // A weight change alone: no catalog asked for either.
        let fx = a.announce(profile(5, &["x"], ids("job", 10)));
        assert!(sent(&deliver(&fx, "a", &mut b, "b", ba)).is_empty());
        assert_eq!(
            member(&b.members(None), "a")
                .profile
                .as_ref()
                .unwrap()
                .weight,
            5
        );
        // The same profile again sends nothing at all.
        let fx = a.announce(profile(5, &["x"], ids("job", 10)));
        assert!(fx.list().is_empty(), "{:?}", fx.list());
    }

    #[test]
    fn a_new_catalog_replaces_the_old_one_once_complete() {
        let (mut a, mut b, ab, ba) = pair();
        let old = profile(1, &[], ids("job", 3));
        let fx = a.announce(old.clone());
        let want = deliver(&fx, "a", &mut b, "b", ba);
        let _ = deliver(&deliver(&want, "b", &mut a, "a", ab), "a", &mut b, "b", ba);
        let new = profile(1, &[], ids("job", 4));
        let fx = a.announce(new.clone());
        let want = deliver(&fx, "a", &mut b, "b", ba);
        let shown = |b: &State| member(&b.members(None), "a").profile.clone();
        assert_eq!(shown(&b), Some(old), "the old one until the new one is in");
        let _ = deliver(&deliver(&want, "b", &mut a, "a", ab), "a", &mut b, "b", ba);
        assert_eq!(shown(&b), Some(new));
    }

    #[test]
    fn only_the_latest_catalog_is_served() {
        let (mut a, mut b, ab, ba) = pair();
        let first = a.announce(profile(1, &[], ids("one", 3)));
        let want_first = deliver(&first, "a", &mut b, "b", ba);
        // a changes its ids before the request arrives.
        let second = a.announce(profile(1, &[], ids("two", 3)));
        let nothing = deliver(&want_first, "b", &mut a, "a", ab);
        assert!(sent(&nothing).is_empty(), "an old catalog is not kept");
        let want_second = deliver(&second, "a", &mut b, "b", ba);
        let _ = deliver(
            &deliver(&want_second, "b", &mut a, "a", ab),
            "a",
            &mut b,
            "b",
            ba,
        );
        let seen = member(&b.members(None), "a").profile.clone().unwrap();
        assert!(seen.catalog.contains("two/00000"));
    }

    #[test]
    fn a_catalog_that_does_not_match_its_digest_is_not_shown() {
        let (mut a, mut b, _, ba) = pair();
        let fx = a.announce(profile(1, &[], ids("job", 3)));
        let _ = deliver(&fx, "a", &mut b, "b", ba);
        let Some(Msg::Announce(head)) = sent(&fx).first().map(|(_, m)| (*m).clone()) else {
            panic!()
        };
        let forged = Msg::CatalogPart {
            digest: head.digest,
            part: 0,
            last: true,
            ids: vec![Arc::from("other")],
        };
        let _ = b.on_frame(&name("a"), ba, forged, at(2));
        assert!(member(&b.members(None), "a").profile.is_none());
    }

    #[test]
    fn the_sync_carries_the_head_and_a_member_down_drops_its_profile() {
        let mut a = ready("a");
        let mine = profile(2, &["gpu"], ids("job", 5));
        let _ = a.announce(mine.clone());
        // A new connection opens with a's head in its Sync.
        let (ab, fx) = a.adopt(&info("b", 1), false, SYNC_CHUNK).unwrap();
        let head = sent(&fx).into_iter().find_map(|(_, m)| match m {
            Msg::Sync { profile, .. } => profile.clone(),
            _ => None,
        });
        assert_eq!(head.map(|h| h.weight), Some(2));
        // b learns a's profile from that Sync, then sees it crash.
        let mut b = ready("b");
        let (ba, _) = b.adopt(&info("a", 1), true, SYNC_CHUNK).unwrap();
        let want = deliver(&fx, "a", &mut b, "b", ba);
        let parts = deliver(&want, "b", &mut a, "a", ab);
        let _ = deliver(&parts, "a", &mut b, "b", ba);
        assert_eq!(member(&b.members(None), "a").profile.as_ref(), Some(&mine));
        let fx = b.conn_closed(&name("a"), ba);
        assert!(has(&fx, |e| matches!(e, Effect::Epoch)));
        let m = b.members(None);
        assert!(!member(&m, "a").reachable);
        assert!(member(&m, "a").profile.is_none(), "dropped with the member");
    }
}
