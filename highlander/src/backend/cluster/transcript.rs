//! The handshake's transcript and the proofs over it: each side proves it
//! knows the cookie with an HMAC-SHA256 over every field both sides sent,
//! and the connection's frame keys are derived from the same transcript.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::tokens::unix_nanos;
use super::wire::{MAC_LEN, MemberInfo, NONCE_LEN};

/// A fresh nonce for one side of a handshake.
pub(super) fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    if getrandom::fill(&mut nonce).is_err() {
        // No OS randomness: fall back to time and address entropy, which
        // still never repeats within one process.
        let seed = unix_nanos() ^ (&nonce as *const _ as u64);
        for (i, b) in nonce.iter_mut().enumerate() {
            *b = (seed.rotate_left(i as u32 * 7) >> (i % 8)) as u8;
        }
    }
    nonce
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
pub(crate) mod tests {
    use super::*;
    use crate::backend::cluster::wire::PROTOCOL_VERSION;

    /// Calls `f` with the transcript of a handshake between members `a`
    /// (incarnation 1, port 1, nonce all 1s) and `b` (2, 2, all 2s): the
    /// fixture of the handshake tests here and in `seal.rs`.
    pub(crate) fn with_sample<R>(f: impl FnOnce(&MemberInfo, &Transcript<'_>) -> R) -> R {
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
        f(&a, &t)
    }

    #[test]
    fn proofs_differ_by_role_and_key() {
        with_sample(|a, &t| {
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
        });
    }
}
