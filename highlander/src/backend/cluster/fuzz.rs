//! Entry points for the fuzz targets in `fuzz/`, compiled only with
//! `--cfg fuzzing` (as `cargo fuzz` builds). Not API. Each one panics when
//! a property breaks; none may panic otherwise, whatever the bytes.

use bytes::BytesMut;

use super::seal;
use super::transcript::{Role, Transcript};
use super::wire::{Handshake, MemberInfo, Msg, NONCE_LEN, PROTOCOL_VERSION};

/// Decodes `payload` as a frame after the handshake (a peer controls every
/// byte of it); a frame that decodes encodes back to the same message.
pub fn msg(payload: &[u8]) {
    if let Ok(msg) = Msg::decode(payload) {
        let again = Msg::decode(&msg.encode()[4..]).expect("a re-encoded frame decodes");
        assert_eq!(again, msg);
    }
}

/// Decodes `payload` as a handshake frame (sent before the peer has
/// authenticated); a frame that decodes encodes back to the same message.
pub fn handshake(payload: &[u8]) {
    if let Ok(msg) = Handshake::decode(payload) {
        let again = Handshake::decode(&msg.encode()[4..]).expect("a re-encoded handshake decodes");
        assert_eq!(again, msg);
    }
}

/// Opens `sealed` as the next frame of a connection: bytes not sealed with
/// the connection's key never open. Then seals `sealed` as a payload: it
/// opens to itself, and with any byte altered it does not open.
pub fn open(sealed: &[u8]) {
    let dialer = MemberInfo {
        name: "a".into(),
        incarnation: 1,
        addr: None,
    };
    let acceptor = MemberInfo {
        name: "b".into(),
        incarnation: 2,
        addr: Some("127.0.0.1:7400".into()),
    };
    let (dialer_nonce, acceptor_nonce) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
    let transcript = Transcript {
        version: PROTOCOL_VERSION,
        dialer: &dialer,
        dialer_port: 7401,
        dialer_nonce: &dialer_nonce,
        acceptor: &acceptor,
        acceptor_port: 7400,
        acceptor_nonce: &acceptor_nonce,
    };
    let (mut sealer, _) = seal::channel(b"cookie", Role::Dialer, &transcript);
    let (_, mut opener) = seal::channel(b"cookie", Role::Acceptor, &transcript);
    assert!(
        opener.open(BytesMut::from(sealed)).is_err(),
        "a forged frame opened"
    );

    let mut frame = vec![0u8; 4];
    frame.extend_from_slice(sealed);
    let out = sealer.seal(&frame);
    let opened = opener
        .open(BytesMut::from(&out[4..]))
        .expect("a sealed frame opens");
    assert_eq!(&opened[..], sealed);

    let mut altered = BytesMut::from(&sealer.seal(&frame)[4..]);
    let at = sealed.first().map_or(0, |b| *b as usize) % altered.len();
    altered[at] ^= 0x01;
    assert!(opener.open(altered).is_err(), "an altered frame opened");
}
