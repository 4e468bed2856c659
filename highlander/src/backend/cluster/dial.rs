//! The dialer's side: connecting to a member's address (never to this node
//! itself), the handshake, and what a refusal means for the next dial.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::gate::DialNonce;
use super::node::Node;
use super::seal;
use super::transcript::{Role, Transcript, random_nonce};
use super::transport::{Wire, codec, read_handshake};
use super::wire::{
    Handshake, MAX_HANDSHAKE_FRAME, MemberInfo, Msg, PROTOCOL_VERSION, RejectReason, valid_addr,
    valid_name,
};
use crate::{BackendErrorKind, Error};

/// The outcome of one dial.
pub(super) enum Dialed {
    Connected(Arc<str>),
    Rejected(RejectReason),
    /// Every address the target resolves to reaches this node itself.
    OnlySelf,
    /// Nothing answered the handshake: why, in one line (an address, never
    /// a secret), with the I/O error when there is one.
    Failed(Error),
}

/// The connection to `addr` broke while the handshake was under way.
fn broke(addr: &str, e: std::io::Error) -> Dialed {
    Dialed::Failed(Error::backend_with(
        BackendErrorKind::Unreachable,
        format!("the connection to {addr} broke during the handshake: {e}"),
        e,
    ))
}

/// What answered at `addr` closed the connection or sent no handshake.
fn unanswered(addr: &str) -> Dialed {
    Dialed::Failed(Error::backend(
        BackendErrorKind::Unreachable,
        format!("{addr} closed the connection without answering the handshake"),
    ))
}

impl Node {
    /// Connects to the first address `addr` resolves to that is not this
    /// node itself; `Ok(None)` when every one is.
    async fn connect_to(&self, addr: &str) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
        let targets: Vec<SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
        if targets.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "address resolves to nothing",
            ));
        }
        let targets: Vec<SocketAddr> = {
            let sh = self.lock();
            targets
                .into_iter()
                .filter(|t| !sh.gate.is_self(t))
                .collect()
        };
        let mut last = None;
        for target in targets {
            match self.connect_one(target).await {
                Ok(stream) => return Ok(Some((stream, target))),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    async fn connect_one(&self, target: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = self.local_ip.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
            // Connections leave from the listen address, so that peers and
            // firewalls see one address per node.
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(target).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    pub(super) async fn dial(self: Arc<Self>, addr: String) -> Dialed {
        let (stream, target) = match self.connect_to(&addr).await {
            Ok(Some(connected)) => connected,
            Ok(None) => return Dialed::OnlySelf,
            Err(e) => {
                return Dialed::Failed(Error::backend_with(
                    BackendErrorKind::Unreachable,
                    format!("cannot connect to {addr}: {e}"),
                    e,
                ));
            }
        };
        let (rd, mut wr) = stream.into_split();
        let mut rd = FramedRead::new(rd, codec(MAX_HANDSHAKE_FRAME));
        let nonce = random_nonce();
        // Lets this node's acceptor recognise the dial as its own.
        let _nonce = DialNonce::register(&self, nonce, target);
        let hello = Handshake::Hello {
            version: PROTOCOL_VERSION,
            me: self.me.clone(),
            listen_port: self.listen_port,
            nonce,
        };
        if let Err(e) = wr.write_all(&hello.encode()).await {
            return broke(&addr, e);
        }
        let (acceptor, acceptor_port, acceptor_nonce) = match read_handshake(&mut rd).await {
            Some(Handshake::Challenge {
                me,
                listen_port,
                nonce,
            }) => (me, listen_port, nonce),
            Some(Handshake::Reject { reason }) => {
                if reason == RejectReason::SelfDial && self.lock().gate.is_self(&target) {
                    return Dialed::Rejected(reason);
                }
                // Nothing proves who sent it: a hint, redialed later.
                return self.rejected(&addr, None, reason);
            }
            _ => return unanswered(&addr),
        };
        if !valid_name(&acceptor.name) || acceptor.addr.as_deref().is_some_and(|a| !valid_addr(a)) {
            if self.may_warn("invalid-dial", &addr) {
                warn!(node = %self.name, %addr, "the node at this address sent a name or address that is not visible ASCII (logged at most once a minute per address)");
            }
            return self.rejected(&addr, None, RejectReason::Version);
        }
        if self.cut(&acceptor.name) {
            return Dialed::Failed(Error::backend(
                BackendErrorKind::Unreachable,
                format!("the link to `{}` is cut (fault injection)", acceptor.name),
            ));
        }
        let transcript = Transcript {
            version: PROTOCOL_VERSION,
            dialer: &self.me,
            dialer_port: self.listen_port,
            dialer_nonce: &nonce,
            acceptor: &acceptor,
            acceptor_port,
            acceptor_nonce: &acceptor_nonce,
        };
        let mac = transcript.proof(&self.key, Role::Dialer);
        if let Err(e) = wr.write_all(&Handshake::Response { mac }.encode()).await {
            return broke(&addr, e);
        }
        match read_handshake(&mut rd).await {
            Some(Handshake::Welcome { mac }) => {
                if !transcript.verify(&self.key, Role::Acceptor, &mac) {
                    return self.rejected(&addr, Some(&acceptor.name), RejectReason::BadCookie);
                }
            }
            Some(Handshake::Reject { reason }) => {
                let reason = match reason {
                    // After our proof, a self-dial claim is nonsense.
                    RejectReason::SelfDial => RejectReason::Version,
                    other => other,
                };
                return self.rejected(&addr, Some(&acceptor.name), reason);
            }
            _ => return unanswered(&addr),
        }
        let mut sealed = seal::channel(&self.key, Role::Dialer, &transcript);
        let info = MemberInfo {
            addr: acceptor.addr.clone().or(Some(addr)),
            ..acceptor
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        match self.adopt(&info, true, tx, stop.clone()) {
            Ok(conn) => {
                let name = info.name.clone();
                let wire = Wire { rd, wr, sealed };
                self.spawn_conn(info.name, conn, wire, rx, stop);
                Dialed::Connected(name)
            }
            Err(_) => {
                // The acceptor took this connection; tell it a better one
                // exists so it does not count the close as a failure.
                let _ = wr
                    .write_all(&sealed.0.seal(&Msg::Superseded.encode()))
                    .await;
                Dialed::Rejected(RejectReason::Duplicate)
            }
        }
    }

    /// A refusal, before or after the peer proved itself: logged (at most
    /// once a minute per address) and answered with a redial later, never
    /// with giving the address up.
    fn rejected(&self, addr: &str, peer: Option<&str>, reason: RejectReason) -> Dialed {
        let peer = peer.unwrap_or("?");
        match reason {
            RejectReason::BadCookie => {
                if self.may_warn("cookie-dial", addr) {
                    warn!(node = %self.name, %addr, %peer, "refused by a peer: its cluster cookie differs from ours (logged at most once a minute per address)");
                }
            }
            RejectReason::NameTaken => {
                if self.may_warn("name-dial", addr) {
                    warn!(node = %self.name, %addr, "refused by a peer: another live node uses this node's name (logged at most once a minute per address)");
                }
            }
            RejectReason::Version => {
                if self.may_warn("version-dial", addr) {
                    warn!(
                        node = %self.name, %addr,
                        "refused by a peer speaking another cluster protocol version than this \
                         node's {PROTOCOL_VERSION} (its own log names its version); run the same \
                         highlander version on every node (logged at most once a minute per address)"
                    );
                }
            }
            RejectReason::SelfDial => {
                if self.may_warn("self-dial", addr) {
                    info!(node = %self.name, %addr, "the node at this address says it is this node, without proof; dialing it again later");
                }
                // Unproven: handled as any refusal, a redial after
                // REFUSED_REDIAL (only this node's own acceptor can show a
                // dial reached itself).
                return Dialed::Rejected(RejectReason::Version);
            }
            RejectReason::Duplicate => {}
        }
        Dialed::Rejected(reason)
    }
}
