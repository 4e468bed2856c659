//! A TCP proxy between one node and its backend server that can cut the
//! link the way a network does: while cut it forwards nothing (both sockets
//! stay open, bytes wait in the kernel buffers, new connections are accepted
//! and held), so each end sees silence, not a reset. On heal the streams
//! resume intact, as after TCP retransmission.
//!
//! With `server_detect = Some(x)` it also plays the server's dead-peer
//! detection: once the client side has been silent for `x` during a cut, it
//! closes the connection, as the server would end the session then (the
//! Postgres backend sets `tcp_user_timeout` / keepalives so that a real
//! server does that after `x`; behind a proxy the server cannot see the
//! silence itself). etcd expires a lease on its own clock, so it needs none.
//! It notes when it did so ([`BackendProxy::detected`]), for tests that
//! compare that moment with what the node did.
//!
//! It is the one byte pump of the tests that put a link between a node and
//! its server: the chaos runs, and the lease-inequality tests of
//! `tests/postgres_safety.rs`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One proxy; cut and heal it; stops when dropped.
pub struct BackendProxy {
    /// Where the node connects.
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    detected: Arc<Mutex<Vec<Instant>>>,
    task: JoinHandle<()>,
}

impl BackendProxy {
    /// A proxy on a free loopback port in front of `target`.
    pub async fn start(target: SocketAddr, server_detect: Option<Duration>) -> BackendProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy port on loopback");
        let addr = listener
            .local_addr()
            .expect("a bound socket has an address");
        let (cut, cut_rx) = watch::channel(false);
        let detected: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let noted = detected.clone();
        let task = tokio::spawn(async move {
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                conns.retain(|c| !c.is_finished());
                let mut cut_rx = cut_rx.clone();
                let noted = noted.clone();
                conns.push(tokio::spawn(async move {
                    // A connection made during a cut waits for the heal.
                    while *cut_rx.borrow_and_update() {
                        if cut_rx.changed().await.is_err() {
                            return;
                        }
                    }
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let detect = server_detect.map(|after| Detect { after, noted });
                    let up = pump(ri, wo, cut_rx.clone(), detect);
                    let down = pump(ro, wi, cut_rx, None);
                    // When either direction ends, the connection is over.
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                }));
            }
        });
        BackendProxy {
            addr,
            cut,
            detected,
            task,
        }
    }

    /// Cuts the link: silence both ways until [`BackendProxy::heal`].
    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }

    /// Heals the link.
    pub fn heal(&self) {
        let _ = self.cut.send(false);
    }

    /// When the proxy ended a server side as the server's dead-peer
    /// detection would (with `server_detect` only), in order: the moment
    /// it decided to, at or just before the server could see it.
    pub fn detected(&self) -> Vec<Instant> {
        self.detected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The server's dead-peer detection that a pump plays: after how long a
/// silent client it ends the server side, and where it notes when.
struct Detect {
    after: Duration,
    noted: Arc<Mutex<Vec<Instant>>>,
}

impl Drop for BackendProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards `from` to `to` while the link is up. While it is cut nothing
/// moves, and an end of stream is passed on only after the heal. With
/// `detect` (client-to-server direction only), a cut that has left the
/// client silent for that long ends the server side with a FIN, as the
/// server's own dead-peer detection would end the session then.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
    detect: Option<Detect>,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut last = Instant::now();
    loop {
        while *cut.borrow_and_update() {
            match &detect {
                Some(detect) => {
                    let at = last + detect.after;
                    tokio::select! {
                        changed = cut.changed() => if changed.is_err() { return },
                        _ = tokio::time::sleep_until(at) => {
                            detect
                                .noted
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(Instant::now());
                            let _ = to.shutdown().await;
                            wait_heal(&mut cut).await;
                            return;
                        }
                    }
                }
                None => {
                    if cut.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    wait_heal(&mut cut).await;
                    break;
                }
                Ok(n) => n,
            },
            _ = cut.changed() => continue,
        };
        last = Instant::now();
        if to.write_all(&buf[..n]).await.is_err() {
            wait_heal(&mut cut).await;
            break;
        }
    }
    let _ = to.shutdown().await;
}

async fn wait_heal(cut: &mut watch::Receiver<bool>) {
    while *cut.borrow_and_update() {
        if cut.changed().await.is_err() {
            return;
        }
    }
}
