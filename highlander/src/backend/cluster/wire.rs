//! The frames two nodes exchange, as values: the handshake's, the ones
//! after it, and what they carry (members, holds, refusals), with the limits
//! that bound them. How they become bytes is in `encoding.rs`.

use std::sync::Arc;

/// Bumped on any incompatible change of the frames below (5: profiles,
/// catalogs and hand-offs).
pub(super) const PROTOCOL_VERSION: u8 = 5;
/// Largest frame accepted (a full sync of a node holding many ids).
pub(super) const MAX_FRAME: usize = 64 << 20;
/// A `Sync` whose holdings take more than this is sent in parts
/// (`SyncPart` frames, then the `Sync` with the rest), and a catalog in
/// `CatalogPart`s of about this size, so that no frame comes near
/// [`MAX_FRAME`] however many ids a node holds or runs.
pub(super) const SYNC_CHUNK: usize = 4 << 20;
/// Largest frame accepted before the peer has authenticated.
pub(super) const MAX_HANDSHAKE_FRAME: usize = 4 << 10;
/// Nonce length for the challenge-response.
pub(super) const NONCE_LEN: usize = 32;
/// HMAC-SHA256 output length.
pub(super) const MAC_LEN: usize = 32;

/// A member as one node describes it to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MemberInfo {
    pub(super) name: Arc<str>,
    pub(super) incarnation: u64,
    pub(super) addr: Option<String>,
}

/// One held id: who holds it is the sender of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Hold {
    pub(super) id: Arc<str>,
    pub(super) token: u64,
    /// Start of the tenure, nanoseconds since the Unix epoch on the holder.
    pub(super) since: u64,
}

impl Hold {
    /// Bytes this hold takes in a frame.
    pub(super) fn encoded_len(&self) -> usize {
        2 + self.id.len().min(u16::MAX as usize) + 16
    }
}

/// What a member announced for placement, without its catalog: its weight,
/// its labels, and the digest and length of its catalog. Small (tens of
/// bytes), so it rides in every `Sync` and `Announce`; the catalog itself
/// is sent only to a member that has no catalog with that digest yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ProfileHead {
    pub(super) weight: u32,
    pub(super) labels: Vec<String>,
    pub(super) digest: u64,
    /// How many ids the catalog has.
    pub(super) len: u32,
}

/// Whether `name` is a node name as the runtime accepts them: 1 to 200
/// visible ASCII characters. Names from the wire are checked before they
/// are used or logged, so a stranger cannot forge log lines with them.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 200 && name.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `addr` can be an advertised `host:port` (visible ASCII, at most
/// 255 bytes).
pub(super) fn valid_addr(addr: &str) -> bool {
    !addr.is_empty() && addr.len() <= 255 && addr.bytes().all(|b| b.is_ascii_graphic())
}

/// Why a handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RejectReason {
    /// The MAC did not verify: the other side has another cookie.
    BadCookie,
    /// A better connection between the two nodes already exists.
    Duplicate,
    /// The dialer reached itself (a seed list naming this node).
    SelfDial,
    /// Another live process uses this node name.
    NameTaken,
    /// The protocol versions differ.
    Version,
}

/// Handshake frames, in the order they are sent:
/// dialer `Hello` → acceptor `Challenge` → dialer `Response` → acceptor
/// `Welcome` (or `Reject` at any acceptor step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Handshake {
    Hello {
        version: u8,
        me: MemberInfo,
        listen_port: u16,
        nonce: [u8; NONCE_LEN],
    },
    Challenge {
        me: MemberInfo,
        listen_port: u16,
        nonce: [u8; NONCE_LEN],
    },
    Response {
        mac: [u8; MAC_LEN],
    },
    Welcome {
        mac: [u8; MAC_LEN],
    },
    Reject {
        reason: RejectReason,
    },
}

/// Frames after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Msg {
    /// Heartbeat, sent when nothing else was for a heartbeat interval.
    Ping,
    /// First frame on a new connection: the sender's whole state, its
    /// profile's head included when it announced one.
    Sync {
        ready: bool,
        members: Vec<MemberInfo>,
        holdings: Vec<Hold>,
        profile: Option<ProfileHead>,
    },
    /// Part of the sender's holdings, ahead of the `Sync` that completes
    /// them (a node holding more ids than one frame carries).
    SyncPart { holdings: Vec<Hold> },
    /// The sender finished joining and may arbitrate claims.
    Ready,
    /// The sender is now connected to this member.
    MemberUp(MemberInfo),
    /// The sender now holds an id.
    Held(Hold),
    /// The sender gave up its tenure of an id.
    Released { id: Arc<str>, token: u64 },
    /// The sender's tenure (`token`) of the id `won.id` ended in a conflict
    /// that `winner` won with the tenure `won`: a `Released` that also says
    /// who holds the id, for receivers not yet connected to the winner.
    Ceded {
        token: u64,
        winner: Arc<str>,
        won: Hold,
    },
    /// Asks the receiver, as arbiter, for an id.
    ClaimReq { id: Arc<str> },
    /// The arbiter reserved the id for the receiver; `floor` is the highest
    /// token it has seen for the id.
    Grant { id: Arc<str>, floor: u64 },
    /// The arbiter saw a holder (or a reservation) for the id.
    Deny {
        id: Arc<str>,
        holder: Option<(Arc<str>, u64)>,
    },
    /// The receiver of a grant did not take it.
    Abandon { id: Arc<str> },
    /// The arbiter saw an id free that it had denied to the receiver.
    Free { id: Arc<str> },
    /// The sender is leaving the cluster for good (graceful shutdown).
    Leave,
    /// The sender closes this connection because a better one exists.
    Superseded,
    /// The sender announced a new profile.
    Announce(ProfileHead),
    /// Asks the sender of a profile for its catalog of this digest.
    CatalogWant { digest: u64 },
    /// Part `part` (from 0) of the sender's catalog of `digest`, its ids in
    /// order; `last` ends it.
    CatalogPart {
        digest: u64,
        part: u32,
        last: bool,
        ids: Vec<Arc<str>>,
    },
    /// The sender gave up its tenure of an id in favour of `to`: a
    /// `Released` that also reserves the id for `to` for a short while.
    Handoff {
        id: Arc<str>,
        token: u64,
        to: Arc<str>,
    },
}

/// A malformed frame.
#[derive(Debug)]
pub(super) struct Malformed(pub(super) &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed frame: {}", self.0)
    }
}
