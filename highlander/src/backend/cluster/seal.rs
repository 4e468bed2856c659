//! Every frame after the handshake is sealed: ChaCha20-Poly1305 with a key
//! per connection and direction, and the frame's sequence number as nonce.
//!
//! The keys come from the cookie and the handshake's transcript (both
//! identities and both fresh nonces) through HMAC-SHA256, so they differ on
//! every connection and never cross the wire. A frame injected, altered,
//! replayed, dropped or reordered by someone on the path fails to open and
//! closes the connection, as a dead link does; a frame cannot be read
//! without the cookie.

use bytes::{BufMut, Bytes, BytesMut};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use hmac::Mac;

use super::transcript::{Role, Transcript};

/// Bytes a sealed frame adds to its payload.
pub(super) const TAG_LEN: usize = 16;

/// Seals the frames one side sends.
pub(super) struct Sealer {
    cipher: ChaCha20Poly1305,
    sequence: u64,
}

/// Opens the frames one side receives, in order.
pub(super) struct Opener {
    cipher: ChaCha20Poly1305,
    sequence: u64,
}

/// A frame that did not open: forged, altered, replayed or out of order.
#[derive(Debug)]
pub(super) struct Forged;

impl std::fmt::Display for Forged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a frame failed its authentication check (altered, replayed or forged)")
    }
}

fn nonce(sequence: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&sequence.to_be_bytes());
    Nonce::from(n)
}

impl Sealer {
    /// Appends `frame` (a wire frame, length prefix included) to `out`,
    /// sealed and with a new length prefix.
    pub(super) fn seal_into(&mut self, frame: &[u8], out: &mut BytesMut) {
        let payload = &frame[4..];
        out.reserve(4 + payload.len() + TAG_LEN);
        out.put_u32((payload.len() + TAG_LEN) as u32);
        let start = out.len();
        out.put_slice(payload);
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce(self.sequence), b"", &mut out[start..])
            .expect("a frame is far below ChaCha20's length limit");
        out.put_slice(&tag);
        self.sequence += 1;
    }

    /// `frame` sealed, for a single write.
    pub(super) fn seal(&mut self, frame: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        self.seal_into(frame, &mut out);
        out.freeze()
    }
}

impl Opener {
    /// The payload of the next sealed frame (without its length prefix, as
    /// the codec hands it over).
    pub(super) fn open(&mut self, mut sealed: BytesMut) -> Result<BytesMut, Forged> {
        if sealed.len() < TAG_LEN {
            return Err(Forged);
        }
        let tag_at = sealed.len() - TAG_LEN;
        let tag = Tag::clone_from_slice(&sealed[tag_at..]);
        sealed.truncate(tag_at);
        self.cipher
            .decrypt_in_place_detached(&nonce(self.sequence), b"", &mut sealed, &tag)
            .map_err(|_| Forged)?;
        self.sequence += 1;
        Ok(sealed)
    }
}

/// The two directions' ciphers of the connection whose handshake was
/// `transcript`, as seen from `me`.
pub(super) fn channel(key: &[u8], me: Role, transcript: &Transcript<'_>) -> (Sealer, Opener) {
    let derive = |label: &[u8]| {
        let bytes: [u8; 32] = transcript.mac(key, label).finalize().into_bytes().into();
        ChaCha20Poly1305::new(&Key::from(bytes))
    };
    let to_acceptor = derive(b"highlander-cluster/3 key dialer->acceptor");
    let to_dialer = derive(b"highlander-cluster/3 key acceptor->dialer");
    let (send, recv) = match me {
        Role::Dialer => (to_acceptor, to_dialer),
        Role::Acceptor => (to_dialer, to_acceptor),
    };
    (
        Sealer {
            cipher: send,
            sequence: 0,
        },
        Opener {
            cipher: recv,
            sequence: 0,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cluster::wire::Msg;
    use std::sync::Arc;

    fn pair(key_a: &[u8], key_b: &[u8]) -> ((Sealer, Opener), (Sealer, Opener)) {
        crate::backend::cluster::transcript::tests::with_sample(|_, t| {
            (
                channel(key_a, Role::Dialer, t),
                channel(key_b, Role::Acceptor, t),
            )
        })
    }

    /// Splits sealed bytes into codec payloads (length prefixes removed).
    fn payloads(mut bytes: &[u8]) -> Vec<BytesMut> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
            out.push(BytesMut::from(&bytes[4..4 + len]));
            bytes = &bytes[4 + len..];
        }
        out
    }

    #[test]
    fn frames_round_trip_both_ways_and_hide_their_content() {
        let ((mut d_seal, mut d_open), (mut a_seal, mut a_open)) = pair(b"k", b"k");
        let frame = Msg::Released {
            id: Arc::from("billing/secret-job"),
            token: 7,
        }
        .encode();
        let mut out = BytesMut::new();
        d_seal.seal_into(&frame, &mut out);
        d_seal.seal_into(&Msg::Ping.encode(), &mut out);
        assert!(
            !out.windows(6).any(|w| w == b"secret"),
            "sealed frames are unreadable"
        );
        let got = payloads(&out);
        assert_eq!(&a_open.open(got[0].clone()).unwrap()[..], &frame[4..]);
        assert_eq!(
            &a_open.open(got[1].clone()).unwrap()[..],
            &Msg::Ping.encode()[4..]
        );
        let back = a_seal.seal(&Msg::Ping.encode());
        assert_eq!(
            &d_open.open(payloads(&back).remove(0)).unwrap()[..],
            &Msg::Ping.encode()[4..]
        );
    }

    #[test]
    fn altered_replayed_reordered_or_foreign_frames_fail() {
        let ((mut seal, _), (_, mut open)) = pair(b"k", b"k");
        let sealed: Vec<BytesMut> = (0..3)
            .map(|_| payloads(&seal.seal(&Msg::Ping.encode())).remove(0))
            .collect();
        // Out of order: the second frame first.
        assert!(open.open(sealed[1].clone()).is_err());
        // A flipped bit.
        let mut altered = sealed[0].clone();
        altered[0] ^= 1;
        assert!(open.open(altered).is_err());
        // In order it opens; the same frame again does not.
        assert!(open.open(sealed[0].clone()).is_ok());
        assert!(open.open(sealed[0].clone()).is_err());
        // Too short to carry a tag.
        assert!(open.open(BytesMut::from(&b"short"[..])).is_err());
        // Another cookie, another key.
        let ((mut seal, _), (_, mut open)) = pair(b"k", b"other");
        assert!(
            open.open(payloads(&seal.seal(&Msg::Ping.encode())).remove(0))
                .is_err()
        );
    }
}
