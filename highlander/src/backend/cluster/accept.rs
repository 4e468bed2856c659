//! The acceptor's side: the listener's loop, the handshake of each incoming
//! connection (bounded in number and time, refusals logged at most once a
//! minute per source), and handing an authenticated one to the node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Settings;
use super::gate::{HandshakeSlot, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE};
use super::node::Node;
use super::seal;
use super::transcript::{Role, Transcript, random_nonce};
use super::transport::{Reader, Wire, codec, read_handshake};
use super::wire::{
    Handshake, MAX_HANDSHAKE_FRAME, MemberInfo, NONCE_LEN, PROTOCOL_VERSION, RejectReason,
    valid_addr, valid_name,
};

/// How long a handshake may take, on either side.
pub(super) fn handshake_timeout(settings: &Settings) -> Duration {
    settings
        .failure_timeout
        .clamp(Duration::from_millis(500), Duration::from_secs(5))
}

/// A handshake the acceptor has verified.
struct Accepted {
    rd: Reader,
    wr: OwnedWriteHalf,
    version: u8,
    dialer: MemberInfo,
    dialer_port: u16,
    dialer_nonce: [u8; NONCE_LEN],
    nonce: [u8; NONCE_LEN],
}

impl Node {
    /// Accepts connections until the node stops; each one beyond the
    /// handshake bounds is closed at once.
    pub(super) async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, remote)) => {
                    let Some(slot) = self.handshake_slot(remote.ip()) else {
                        // Closed at once: its file descriptor is free again.
                        drop(stream);
                        if self.may_warn("handshakes", &remote.ip().to_string()) {
                            warn!(
                                node = %self.name, remote = %remote.ip(),
                                "too many connections still in their handshake (at most \
                                 {MAX_HANDSHAKES_PER_SOURCE} per address, {MAX_HANDSHAKES} in all): \
                                 closing new ones (logged at most once a minute per address)"
                            );
                        }
                        continue;
                    };
                    tokio::spawn(self.clone().accept(stream, remote, slot));
                }
                Err(e) => {
                    if self.may_warn("accept", "") {
                        warn!(node = %self.name, error = %e, "cannot accept connections (logged at most once a minute)");
                    }
                    sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Serves one incoming connection: the handshake within the handshake
    /// timeout and `slot`, then (authenticated) the connection itself.
    async fn accept(self: Arc<Self>, stream: TcpStream, remote: SocketAddr, slot: HandshakeSlot) {
        let limit = handshake_timeout(&self.settings);
        let Ok(Some(hs)) = timeout(limit, self.handshake(stream, remote)).await else {
            return;
        };
        drop(slot);
        let Accepted {
            rd,
            mut wr,
            version,
            dialer,
            dialer_port,
            dialer_nonce,
            nonce,
        } = hs;
        let transcript = Transcript {
            version,
            dialer: &dialer,
            dialer_port,
            dialer_nonce: &dialer_nonce,
            acceptor: &self.me,
            acceptor_port: self.listen_port,
            acceptor_nonce: &nonce,
        };
        let addr = dialer
            .addr
            .clone()
            .or_else(|| Some(SocketAddr::new(remote.ip(), dialer_port).to_string()));
        let info = MemberInfo {
            addr,
            ..dialer.clone()
        };
        let sealed = seal::channel(&self.key, Role::Acceptor, &transcript);
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        // Not under the handshake timeout: a node holding many ids takes a
        // while to queue its first `Sync`, and cutting that short would
        // leave the connection adopted but never served.
        let conn = match self.adopt(&info, false, tx, stop.clone()) {
            Ok(conn) => conn,
            Err(reason) => {
                let reject = Handshake::Reject { reason }.encode();
                let _ = timeout(limit, wr.write_all(&reject)).await;
                return;
            }
        };
        let mac = transcript.proof(&self.key, Role::Acceptor);
        let welcome = Handshake::Welcome { mac }.encode();
        if !matches!(timeout(limit, wr.write_all(&welcome)).await, Ok(Ok(()))) {
            self.conn_closed(&info.name, conn);
            return;
        }
        let wire = Wire { rd, wr, sealed };
        self.spawn_conn(info.name, conn, wire, rx, stop);
    }

    /// The acceptor's side of a handshake, up to the dialer's verified
    /// proof; `None` when it was refused or broke off.
    async fn handshake(&self, stream: TcpStream, remote: SocketAddr) -> Option<Accepted> {
        let _ = stream.set_nodelay(true);
        let (rd, mut wr) = stream.into_split();
        let mut rd = FramedRead::new(rd, codec(MAX_HANDSHAKE_FRAME));
        let Some(Handshake::Hello {
            version,
            me: dialer,
            listen_port,
            nonce: dialer_nonce,
        }) = read_handshake(&mut rd).await
        else {
            return None;
        };
        let source = remote.ip().to_string();
        let reject = |reason| Handshake::Reject { reason }.encode();
        if version != PROTOCOL_VERSION {
            if self.may_warn("version", &source) {
                warn!(
                    node = %self.name, remote = %remote.ip(),
                    "refused a peer speaking cluster protocol version {version}: this node speaks \
                     version {PROTOCOL_VERSION}; run the same highlander version on every node \
                     (logged at most once a minute per address)"
                );
            }
            let _ = wr.write_all(&reject(RejectReason::Version)).await;
            return None;
        }
        if !valid_name(&dialer.name) || dialer.addr.as_deref().is_some_and(|a| !valid_addr(a)) {
            // Its name is not shown: it could forge log lines.
            if self.may_warn("invalid", &source) {
                warn!(node = %self.name, remote = %remote.ip(), "refused a connection whose node name or address is not visible ASCII (logged at most once a minute per address)");
            }
            return None;
        }
        if dialer.name == self.name {
            let reason = if dialer.incarnation == self.me.incarnation {
                // A dial of this very node: when the nonce is one of its own
                // dials, the address it dialed is its own (known here, not
                // taken from the wire).
                self.lock().gate.dialed_self(&dialer_nonce);
                RejectReason::SelfDial
            } else {
                if self.may_warn("name", &source) {
                    warn!(node = %self.name, remote = %remote.ip(), "refused a peer that uses this node's own name: give every node its own name (logged at most once a minute per address)");
                }
                RejectReason::NameTaken
            };
            let _ = wr.write_all(&reject(reason)).await;
            return None;
        }
        if self.cut(&dialer.name) {
            return None;
        }
        let nonce = random_nonce();
        let challenge = Handshake::Challenge {
            me: self.me.clone(),
            listen_port: self.listen_port,
            nonce,
        };
        if wr.write_all(&challenge.encode()).await.is_err() {
            return None;
        }
        let Some(Handshake::Response { mac }) = read_handshake(&mut rd).await else {
            return None;
        };
        let transcript = Transcript {
            version,
            dialer: &dialer,
            dialer_port: listen_port,
            dialer_nonce: &dialer_nonce,
            acceptor: &self.me,
            acceptor_port: self.listen_port,
            acceptor_nonce: &nonce,
        };
        if !transcript.verify(&self.key, Role::Dialer, &mac) {
            if self.may_warn("cookie", &source) {
                warn!(
                    node = %self.name, peer = %dialer.name, remote = %remote.ip(),
                    "refused a connection: the peer's cluster cookie differs from ours, or the handshake \
                     was altered on the way (logged at most once a minute per address)"
                );
            }
            let _ = wr.write_all(&reject(RejectReason::BadCookie)).await;
            return None;
        }
        Some(Accepted {
            rd,
            wr,
            version,
            dialer,
            dialer_port: listen_port,
            dialer_nonce,
            nonce,
        })
    }
}
