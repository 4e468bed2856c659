//! The wire format: length-delimited frames (a 4-byte big-endian length,
//! then the payload), each payload a one-byte tag and its fields in a fixed
//! order. Written by hand: a dozen small messages do not need a
//! serialization framework, and the format stays under our control.
//!
//! Strings are a `u16` length and UTF-8 bytes; lists a `u32` count; integers
//! big-endian.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bumped on any incompatible change of the frames below.
pub(super) const PROTOCOL_VERSION: u8 = 4;
/// Largest frame accepted (a full sync of a node holding many ids).
pub(super) const MAX_FRAME: usize = 64 << 20;
/// A `Sync` whose holdings take more than this is sent in parts
/// (`SyncPart` frames, then the `Sync` with the rest), so that no frame
/// comes near [`MAX_FRAME`] however many ids a node holds.
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

impl RejectReason {
    fn code(self) -> u8 {
        match self {
            RejectReason::BadCookie => 1,
            RejectReason::Duplicate => 2,
            RejectReason::SelfDial => 3,
            RejectReason::NameTaken => 4,
            RejectReason::Version => 5,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => RejectReason::BadCookie,
            2 => RejectReason::Duplicate,
            3 => RejectReason::SelfDial,
            4 => RejectReason::NameTaken,
            5 => RejectReason::Version,
            _ => return None,
        })
    }
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
    /// First frame on a new connection: the sender's whole state.
    Sync {
        ready: bool,
        members: Vec<MemberInfo>,
        holdings: Vec<Hold>,
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
    /// The sender's tenure of an id ended in a conflict that `winner`
    /// (node, token, since) won: a `Released` that also says who holds the
    /// id, for receivers not yet connected to the winner.
    Ceded {
        id: Arc<str>,
        token: u64,
        winner: Arc<str>,
        winner_token: u64,
        winner_since: u64,
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
}

/// A malformed frame.
#[derive(Debug)]
pub(super) struct Malformed(pub(super) &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed frame: {}", self.0)
    }
}

fn frame(body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_u32(0);
    body(&mut buf);
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

fn put_str(buf: &mut BytesMut, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    buf.put_u16(bytes.len() as u16);
    buf.put_slice(bytes);
}

fn put_opt_str(buf: &mut BytesMut, s: Option<&str>) {
    match s {
        Some(s) => {
            buf.put_u8(1);
            put_str(buf, s);
        }
        None => buf.put_u8(0),
    }
}

fn put_member(buf: &mut BytesMut, m: &MemberInfo) {
    put_str(buf, &m.name);
    buf.put_u64(m.incarnation);
    put_opt_str(buf, m.addr.as_deref());
}

fn put_hold(buf: &mut BytesMut, h: &Hold) {
    put_str(buf, &h.id);
    buf.put_u64(h.token);
    buf.put_u64(h.since);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn need(&self, n: usize) -> Result<(), Malformed> {
        if self.0.remaining() < n {
            Err(Malformed("truncated"))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, Malformed> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, Malformed> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self) -> Result<u64, Malformed> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        self.need(N)?;
        let mut out = [0u8; N];
        self.0.copy_to_slice(&mut out);
        Ok(out)
    }
    fn string(&mut self) -> Result<String, Malformed> {
        let len = self.u16()? as usize;
        self.need(len)?;
        let s = std::str::from_utf8(&self.0[..len])
            .map_err(|_| Malformed("invalid UTF-8"))?
            .to_string();
        self.0.advance(len);
        Ok(s)
    }
    fn arc_str(&mut self) -> Result<Arc<str>, Malformed> {
        self.string().map(Arc::from)
    }
    fn opt_string(&mut self) -> Result<Option<String>, Malformed> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.string().map(Some),
            _ => Err(Malformed("bad option tag")),
        }
    }
    fn member(&mut self) -> Result<MemberInfo, Malformed> {
        Ok(MemberInfo {
            name: self.arc_str()?,
            incarnation: self.u64()?,
            addr: self.opt_string()?,
        })
    }
    fn hold(&mut self) -> Result<Hold, Malformed> {
        Ok(Hold {
            id: self.arc_str()?,
            token: self.u64()?,
            since: self.u64()?,
        })
    }
    fn count(&mut self, min_item: usize) -> Result<usize, Malformed> {
        let n = self.u32()? as usize;
        // Every item takes at least `min_item` bytes: refuse counts the
        // frame cannot hold before allocating for them.
        if n.saturating_mul(min_item) > self.0.remaining() {
            return Err(Malformed("count larger than the frame"));
        }
        Ok(n)
    }
    fn end(&self) -> Result<(), Malformed> {
        if self.0.has_remaining() {
            Err(Malformed("trailing bytes"))
        } else {
            Ok(())
        }
    }
}

impl Handshake {
    /// The frame, length prefix included.
    pub(super) fn encode(&self) -> Bytes {
        frame(|buf| match self {
            Handshake::Hello {
                version,
                me,
                listen_port,
                nonce,
            } => {
                buf.put_u8(1);
                buf.put_u8(*version);
                put_member(buf, me);
                buf.put_u16(*listen_port);
                buf.put_slice(nonce);
            }
            Handshake::Challenge {
                me,
                listen_port,
                nonce,
            } => {
                buf.put_u8(2);
                put_member(buf, me);
                buf.put_u16(*listen_port);
                buf.put_slice(nonce);
            }
            Handshake::Response { mac } => {
                buf.put_u8(3);
                buf.put_slice(mac);
            }
            Handshake::Welcome { mac } => {
                buf.put_u8(4);
                buf.put_slice(mac);
            }
            Handshake::Reject { reason } => {
                buf.put_u8(5);
                buf.put_u8(reason.code());
            }
        })
    }

    /// Parses one payload (without its length prefix).
    pub(super) fn decode(payload: &[u8]) -> Result<Handshake, Malformed> {
        let mut r = Reader(payload);
        let msg = match r.u8()? {
            1 => Handshake::Hello {
                version: r.u8()?,
                me: r.member()?,
                listen_port: r.u16()?,
                nonce: r.array()?,
            },
            2 => Handshake::Challenge {
                me: r.member()?,
                listen_port: r.u16()?,
                nonce: r.array()?,
            },
            3 => Handshake::Response { mac: r.array()? },
            4 => Handshake::Welcome { mac: r.array()? },
            5 => Handshake::Reject {
                reason: RejectReason::from_code(r.u8()?)
                    .ok_or(Malformed("unknown reject reason"))?,
            },
            _ => return Err(Malformed("unknown handshake tag")),
        };
        r.end()?;
        Ok(msg)
    }
}

impl Msg {
    /// The frame, length prefix included.
    pub(super) fn encode(&self) -> Bytes {
        frame(|buf| match self {
            Msg::Ping => buf.put_u8(1),
            Msg::Sync {
                ready,
                members,
                holdings,
            } => {
                buf.reserve(16 + members.len() * 48 + holdings.len() * 40);
                buf.put_u8(2);
                buf.put_u8(u8::from(*ready));
                buf.put_u32(members.len() as u32);
                for m in members {
                    put_member(buf, m);
                }
                buf.put_u32(holdings.len() as u32);
                for h in holdings {
                    put_hold(buf, h);
                }
            }
            Msg::SyncPart { holdings } => {
                buf.reserve(8 + holdings.iter().map(Hold::encoded_len).sum::<usize>());
                buf.put_u8(15);
                buf.put_u32(holdings.len() as u32);
                for h in holdings {
                    put_hold(buf, h);
                }
            }
            Msg::Ready => buf.put_u8(3),
            Msg::MemberUp(m) => {
                buf.put_u8(4);
                put_member(buf, m);
            }
            Msg::Held(h) => {
                buf.put_u8(5);
                put_hold(buf, h);
            }
            Msg::Released { id, token } => {
                buf.put_u8(6);
                put_str(buf, id);
                buf.put_u64(*token);
            }
            Msg::ClaimReq { id } => {
                buf.put_u8(7);
                put_str(buf, id);
            }
            Msg::Grant { id, floor } => {
                buf.put_u8(8);
                put_str(buf, id);
                buf.put_u64(*floor);
            }
            Msg::Deny { id, holder } => {
                buf.put_u8(9);
                put_str(buf, id);
                match holder {
                    Some((node, token)) => {
                        buf.put_u8(1);
                        put_str(buf, node);
                        buf.put_u64(*token);
                    }
                    None => buf.put_u8(0),
                }
            }
            Msg::Abandon { id } => {
                buf.put_u8(10);
                put_str(buf, id);
            }
            Msg::Free { id } => {
                buf.put_u8(11);
                put_str(buf, id);
            }
            Msg::Leave => buf.put_u8(12),
            Msg::Superseded => buf.put_u8(13),
            Msg::Ceded {
                id,
                token,
                winner,
                winner_token,
                winner_since,
            } => {
                buf.put_u8(14);
                put_str(buf, id);
                buf.put_u64(*token);
                put_str(buf, winner);
                buf.put_u64(*winner_token);
                buf.put_u64(*winner_since);
            }
        })
    }

    /// Parses one payload (without its length prefix).
    pub(super) fn decode(payload: &[u8]) -> Result<Msg, Malformed> {
        let mut r = Reader(payload);
        let msg = match r.u8()? {
            1 => Msg::Ping,
            2 => {
                let ready = r.u8()? != 0;
                let n = r.count(11)?;
                let members = (0..n).map(|_| r.member()).collect::<Result<_, _>>()?;
                let n = r.count(18)?;
                let holdings = (0..n).map(|_| r.hold()).collect::<Result<_, _>>()?;
                Msg::Sync {
                    ready,
                    members,
                    holdings,
                }
            }
            15 => {
                let n = r.count(18)?;
                let holdings = (0..n).map(|_| r.hold()).collect::<Result<_, _>>()?;
                Msg::SyncPart { holdings }
            }
            3 => Msg::Ready,
            4 => Msg::MemberUp(r.member()?),
            5 => Msg::Held(r.hold()?),
            6 => Msg::Released {
                id: r.arc_str()?,
                token: r.u64()?,
            },
            7 => Msg::ClaimReq { id: r.arc_str()? },
            8 => Msg::Grant {
                id: r.arc_str()?,
                floor: r.u64()?,
            },
            9 => {
                let id = r.arc_str()?;
                let holder = match r.u8()? {
                    0 => None,
                    1 => Some((r.arc_str()?, r.u64()?)),
                    _ => return Err(Malformed("bad option tag")),
                };
                Msg::Deny { id, holder }
            }
            10 => Msg::Abandon { id: r.arc_str()? },
            11 => Msg::Free { id: r.arc_str()? },
            12 => Msg::Leave,
            13 => Msg::Superseded,
            14 => Msg::Ceded {
                id: r.arc_str()?,
                token: r.u64()?,
                winner: r.arc_str()?,
                winner_token: r.u64()?,
                winner_since: r.u64()?,
            },
            _ => return Err(Malformed("unknown message tag")),
        };
        r.end()?;
        Ok(msg)
    }
}

/// Which side of the handshake a MAC proves.
#[derive(Clone, Copy)]
pub(super) enum Role {
    Dialer,
    Acceptor,
}

/// One handshake as both sides saw it: the protocol version, both
/// identities (name, incarnation, advertised address, listen port) and both
/// fresh nonces, exactly as they crossed the wire. Every MAC and key of the
/// connection is computed over it, so a field altered on the way makes the
/// proofs differ and the handshake fail.
#[derive(Clone, Copy)]
pub(super) struct Transcript<'a> {
    pub(super) version: u8,
    pub(super) dialer: &'a MemberInfo,
    pub(super) dialer_port: u16,
    pub(super) dialer_nonce: &'a [u8; NONCE_LEN],
    pub(super) acceptor: &'a MemberInfo,
    pub(super) acceptor_port: u16,
    pub(super) acceptor_nonce: &'a [u8; NONCE_LEN],
}

impl Transcript<'_> {
    /// HMAC-SHA256 keyed with the cookie over `label` and the transcript.
    pub(super) fn mac(&self, key: &[u8], label: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(label);
        mac.update(&[self.version]);
        for (m, port, nonce) in [
            (self.dialer, self.dialer_port, self.dialer_nonce),
            (self.acceptor, self.acceptor_port, self.acceptor_nonce),
        ] {
            mac.update(&(m.name.len() as u64).to_be_bytes());
            mac.update(m.name.as_bytes());
            mac.update(&m.incarnation.to_be_bytes());
            match &m.addr {
                Some(addr) => {
                    mac.update(&[1]);
                    mac.update(&(addr.len() as u64).to_be_bytes());
                    mac.update(addr.as_bytes());
                }
                None => mac.update(&[0]),
            }
            mac.update(&port.to_be_bytes());
            mac.update(nonce);
        }
        mac
    }

    /// The proof that `role` knows the cookie, with the role in the MAC so
    /// that one side's proof cannot be replayed as the other's.
    pub(super) fn proof(&self, key: &[u8], role: Role) -> [u8; MAC_LEN] {
        self.mac(key, role.label()).finalize().into_bytes().into()
    }

    /// Whether `mac` is `role`'s proof (compared in constant time).
    pub(super) fn verify(&self, key: &[u8], role: Role, mac: &[u8]) -> bool {
        self.mac(key, role.label()).verify_slice(mac).is_ok()
    }
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Dialer => b"highlander-cluster/1 dialer\0",
            Role::Acceptor => b"highlander-cluster/1 acceptor",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(msg: Msg) {
        let bytes = msg.encode();
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(Msg::decode(&bytes[4..]).unwrap(), msg);
    }

    #[test]
    fn messages_roundtrip() {
        let m = MemberInfo {
            name: "a".into(),
            incarnation: 7,
            addr: Some("127.0.0.1:1".into()),
        };
        let h = Hold {
            id: "x".into(),
            token: 1 << 40,
            since: 99,
        };
        roundtrip(Msg::Ping);
        roundtrip(Msg::Sync {
            ready: true,
            members: vec![m.clone()],
            holdings: vec![h.clone()],
        });
        roundtrip(Msg::MemberUp(MemberInfo { addr: None, ..m }));
        roundtrip(Msg::Held(h));
        roundtrip(Msg::Released {
            id: "x".into(),
            token: 3,
        });
        roundtrip(Msg::Deny {
            id: "x".into(),
            holder: Some(("b".into(), 5)),
        });
        roundtrip(Msg::Deny {
            id: "x".into(),
            holder: None,
        });
        roundtrip(Msg::Grant {
            id: "x".into(),
            floor: 4,
        });
        roundtrip(Msg::Superseded);
        roundtrip(Msg::SyncPart {
            holdings: vec![Hold {
                id: "y".into(),
                token: 2,
                since: 3,
            }],
        });
        roundtrip(Msg::Ceded {
            id: "x".into(),
            token: 3,
            winner: "a".into(),
            winner_token: 2,
            winner_since: 1,
        });
    }

    #[test]
    fn garbage_is_refused_not_panicking() {
        assert!(Msg::decode(&[]).is_err());
        assert!(Msg::decode(&[2, 1, 255, 255, 255, 255]).is_err());
        assert!(Msg::decode(&[5, 0, 10, b'a']).is_err());
        assert!(Msg::decode(&[1, 0]).is_err());
        assert!(Handshake::decode(&[9]).is_err());
    }

    #[test]
    fn proofs_differ_by_role_and_key() {
        let a = MemberInfo {
            name: "a".into(),
            incarnation: 1,
            addr: None,
        };
        let b = MemberInfo {
            name: "b".into(),
            incarnation: 2,
            addr: None,
        };
        let (na, nb) = ([1u8; 32], [2u8; 32]);
        let t = Transcript {
            version: PROTOCOL_VERSION,
            dialer: &a,
            dialer_port: 1,
            dialer_nonce: &na,
            acceptor: &b,
            acceptor_port: 2,
            acceptor_nonce: &nb,
        };
        let d = t.proof(b"k", Role::Dialer);
        assert_ne!(d, t.proof(b"k", Role::Acceptor));
        assert_ne!(d, t.proof(b"j", Role::Dialer));
        assert!(t.verify(b"k", Role::Dialer, &d));
        assert!(!t.verify(b"k", Role::Acceptor, &d));
        assert!(!t.verify(b"j", Role::Dialer, &d));
        // Every field of the handshake is in the proof.
        let moved = MemberInfo {
            addr: Some("evil:1".into()),
            ..a.clone()
        };
        let altered = [
            Transcript { version: 3, ..t },
            Transcript {
                dialer_port: 9,
                ..t
            },
            Transcript {
                acceptor_port: 9,
                ..t
            },
            Transcript {
                dialer: &moved,
                ..t
            },
        ];
        for other in altered {
            assert!(!other.verify(b"k", Role::Dialer, &d));
        }
    }
}
