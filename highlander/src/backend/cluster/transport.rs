//! The transport: frames over TCP. A reader task per connection opens and
//! decodes frames and hands them to the node, declaring the peer
//! unreachable after the failure timeout of silence; a writer task drains
//! the connection's queue in batches (so 10,000 claims become a few large
//! writes), seals them, and sends a heartbeat when it has been idle.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout_at};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::node::Node;
use super::seal;
use super::state::ConnId;
use super::wire::{Handshake, MAX_FRAME, Msg};

/// Writes are batched up to about this many bytes.
const BATCH_BYTES: usize = 256 << 10;

/// The frame codec: a 4-byte length, frames of at most `max` bytes.
pub(super) fn codec(max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(max)
        .new_codec()
}

pub(super) type Reader = FramedRead<OwnedReadHalf, LengthDelimitedCodec>;

/// An authenticated connection: its two halves and its frame seals.
pub(super) struct Wire {
    pub(super) rd: Reader,
    pub(super) wr: OwnedWriteHalf,
    pub(super) sealed: (seal::Sealer, seal::Opener),
}

/// The next handshake frame, `None` when it is malformed or the
/// connection ended.
pub(super) async fn read_handshake(rd: &mut Reader) -> Option<Handshake> {
    match rd.next().await {
        Some(Ok(frame)) => Handshake::decode(&frame).ok(),
        _ => None,
    }
}

impl Node {
    /// Serves an adopted connection `conn` to `peer` until it closes or is
    /// stopped: `rx` is its queue, `stop` its stop switch.
    pub(super) fn spawn_conn(
        self: &Arc<Self>,
        peer: Arc<str>,
        conn: ConnId,
        wire: Wire,
        mut rx: mpsc::UnboundedReceiver<Bytes>,
        stop: CancellationToken,
    ) {
        let Wire {
            mut rd,
            mut wr,
            sealed: (mut sealer, mut opener),
        } = wire;
        // Authenticated: full-size frames from now on.
        rd.decoder_mut()
            .set_max_frame_length(MAX_FRAME + seal::TAG_LEN);
        // Writer: batches queued frames, sends a heartbeat when idle, and
        // on a closed channel flushes and closes its half.
        let node = self.clone();
        let writer_peer = peer.clone();
        let writer_stop = stop.clone();
        self.writers.spawn(async move {
            let heartbeat = node.settings.heartbeat;
            let mut buf = BytesMut::new();
            loop {
                tokio::select! {
                    biased;
                    _ = writer_stop.cancelled() => break,
                    _ = node.cancel.cancelled() => break,
                    frame = rx.recv() => match frame {
                        None => {
                            let _ = wr.shutdown().await;
                            break;
                        }
                        Some(frame) => {
                            // A cut link (fault injection) drops frames before
                            // they are sealed, so the sequence stays whole.
                            let cut = node.cut(&writer_peer);
                            if !cut {
                                sealer.seal_into(&frame, &mut buf);
                            }
                            while buf.len() < BATCH_BYTES {
                                match rx.try_recv() {
                                    Ok(frame) if !cut => sealer.seal_into(&frame, &mut buf),
                                    Ok(_) => {}
                                    Err(_) => break,
                                }
                            }
                            if !buf.is_empty() && wr.write_all(&buf).await.is_err() {
                                break;
                            }
                            buf.clear();
                        }
                    },
                    _ = sleep(heartbeat) => {
                        if !node.cut(&writer_peer)
                            && wr.write_all(&sealer.seal(&Msg::Ping.encode())).await.is_err()
                        {
                            break;
                        }
                    }
                }
            }
            writer_stop.cancel();
        });
        // Reader: applies frames; silence for the failure timeout, EOF or a
        // reset mark the peer unreachable.
        let node = self.clone();
        tokio::spawn(async move {
            let limit = node.settings.failure_timeout;
            let mut last = Instant::now();
            loop {
                let next = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    _ = node.cancel.cancelled() => break,
                    next = timeout_at(last + limit, rd.next()) => next,
                };
                match next {
                    Err(_) => {
                        info!(node = %node.name, peer = %peer, timeout = ?limit, "no heartbeat from member: unreachable");
                        break;
                    }
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        debug!(node = %node.name, peer = %peer, error = %e, "connection lost");
                        break;
                    }
                    Ok(Some(Ok(sealed))) => {
                        let frame = match opener.open(sealed) {
                            Ok(frame) => frame,
                            Err(e) => {
                                warn!(node = %node.name, peer = %peer, error = %e, "closing the connection");
                                break;
                            }
                        };
                        if node.cut(&peer) {
                            continue;
                        }
                        match Msg::decode(&frame) {
                            Ok(msg) => {
                                node.on_frame(&peer, conn, msg);
                                // Time spent applying a frame (a large
                                // `Sync`) is not the peer's silence.
                                last = Instant::now();
                            }
                            Err(e) => {
                                warn!(node = %node.name, peer = %peer, error = %e, "closing the connection");
                                break;
                            }
                        }
                    }
                }
            }
            stop.cancel();
            node.conn_closed(&peer, conn);
        });
    }
}
