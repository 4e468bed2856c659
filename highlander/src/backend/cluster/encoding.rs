//! How frames become bytes and back: length-delimited frames (a 4-byte
//! big-endian length, then the payload), each payload a one-byte tag and its
//! fields in a fixed order. Written by hand: a dozen small messages do not
//! need a serialization framework, and the format stays under our control.
//!
//! Strings are a `u16` length and UTF-8 bytes; lists a `u32` count; integers
//! big-endian.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::wire::{Handshake, Hold, Malformed, MemberInfo, Msg, ProfileHead, RejectReason};

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

fn put_head(buf: &mut BytesMut, p: &ProfileHead) {
    buf.put_u32(p.weight);
    buf.put_u32(p.labels.len() as u32);
    for l in &p.labels {
        put_str(buf, l);
    }
    buf.put_u64(p.digest);
    buf.put_u32(p.len);
}

/// Bytes an id takes in a `CatalogPart`.
pub(super) fn catalog_id_len(id: &str) -> usize {
    2 + id.len().min(u16::MAX as usize)
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
    fn head(&mut self) -> Result<ProfileHead, Malformed> {
        let weight = self.u32()?;
        let n = self.count(2)?;
        let labels = (0..n).map(|_| self.string()).collect::<Result<_, _>>()?;
        Ok(ProfileHead {
            weight,
            labels,
            digest: self.u64()?,
            len: self.u32()?,
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
                profile,
            } => {
                buf.reserve(64 + members.len() * 48 + holdings.len() * 40);
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
                match profile {
                    Some(p) => {
                        buf.put_u8(1);
                        put_head(buf, p);
                    }
                    None => buf.put_u8(0),
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
            Msg::Ceded { token, winner, won } => {
                // On the wire: id, token, winner, winner's token, since.
                buf.put_u8(14);
                put_str(buf, &won.id);
                buf.put_u64(*token);
                put_str(buf, winner);
                buf.put_u64(won.token);
                buf.put_u64(won.since);
            }
            Msg::Announce(head) => {
                buf.put_u8(16);
                put_head(buf, head);
            }
            Msg::CatalogWant { digest } => {
                buf.put_u8(17);
                buf.put_u64(*digest);
            }
            Msg::CatalogPart {
                digest,
                part,
                last,
                ids,
            } => {
                buf.reserve(24 + ids.iter().map(|id| catalog_id_len(id)).sum::<usize>());
                buf.put_u8(18);
                buf.put_u64(*digest);
                buf.put_u32(*part);
                buf.put_u8(u8::from(*last));
                buf.put_u32(ids.len() as u32);
                for id in ids {
                    put_str(buf, id);
                }
            }
            Msg::Handoff { id, token, to } => {
                buf.put_u8(19);
                put_str(buf, id);
                buf.put_u64(*token);
                put_str(buf, to);
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
                let profile = match r.u8()? {
                    0 => None,
                    1 => Some(r.head()?),
                    _ => return Err(Malformed("bad option tag")),
                };
                Msg::Sync {
                    ready,
                    members,
                    holdings,
                    profile,
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
            14 => {
                let (id, token, winner) = (r.arc_str()?, r.u64()?, r.arc_str()?);
                let won = Hold {
                    id,
                    token: r.u64()?,
                    since: r.u64()?,
                };
                Msg::Ceded { token, winner, won }
            }
            16 => Msg::Announce(r.head()?),
            17 => Msg::CatalogWant { digest: r.u64()? },
            18 => {
                let digest = r.u64()?;
                let part = r.u32()?;
                let last = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(Malformed("bad flag")),
                };
                let n = r.count(2)?;
                let ids = (0..n).map(|_| r.arc_str()).collect::<Result<_, _>>()?;
                Msg::CatalogPart {
                    digest,
                    part,
                    last,
                    ids,
                }
            }
            19 => Msg::Handoff {
                id: r.arc_str()?,
                token: r.u64()?,
                to: r.arc_str()?,
            },
            _ => return Err(Malformed("unknown message tag")),
        };
        r.end()?;
        Ok(msg)
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
            profile: None,
        });
        let head = ProfileHead {
            weight: 3,
            labels: vec!["zone=eu".into(), "ssd".into()],
            digest: u64::MAX - 1,
            len: 2,
        };
        roundtrip(Msg::Sync {
            ready: false,
            members: vec![],
            holdings: vec![],
            profile: Some(head.clone()),
        });
        roundtrip(Msg::Announce(head));
        roundtrip(Msg::Announce(ProfileHead {
            weight: 0,
            labels: vec![],
            digest: 0,
            len: 0,
        }));
        roundtrip(Msg::CatalogWant { digest: 42 });
        roundtrip(Msg::CatalogPart {
            digest: 42,
            part: 3,
            last: true,
            ids: vec!["a".into(), "b/c".into()],
        });
        roundtrip(Msg::CatalogPart {
            digest: 1,
            part: 0,
            last: false,
            ids: vec![],
        });
        roundtrip(Msg::Handoff {
            id: "x".into(),
            token: 9,
            to: "c".into(),
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
            token: 3,
            winner: "a".into(),
            won: Hold {
                id: "x".into(),
                token: 2,
                since: 1,
            },
        });
    }

    #[test]
    fn garbage_is_refused_not_panicking() {
        assert!(Msg::decode(&[]).is_err());
        assert!(Msg::decode(&[2, 1, 255, 255, 255, 255]).is_err());
        assert!(Msg::decode(&[5, 0, 10, b'a']).is_err());
        assert!(Msg::decode(&[1, 0]).is_err());
        // A catalog part claiming more ids than its bytes can hold.
        assert!(Msg::decode(&[18, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0]).is_err());
        // A flag that is neither 0 nor 1.
        assert!(Msg::decode(&[18, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0]).is_err());
        assert!(Handshake::decode(&[9]).is_err());
    }
}
