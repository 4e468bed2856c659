//! The downstream register of the chaos runs: a tiny TCP server that keeps,
//! per id, the highest fencing token it has seen and accepts a write only
//! when the writer's token is at least that high, as a database guarded by
//! `WHERE fence <= $token` would. It logs every decision.
//!
//! Protocol, one line each way: `W <id> <token> <node>` → `OK` or `NO`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::history::FenceWrite;
use crate::unix_nanos;

#[derive(Default)]
struct Register {
    highest: HashMap<String, u64>,
    log: Vec<FenceWrite>,
}

/// The register, shared by the TCP server and in-process writers.
#[derive(Clone, Default)]
pub struct Fence {
    inner: Arc<Mutex<Register>>,
}

impl Fence {
    /// An empty register.
    pub fn new() -> Fence {
        Fence::default()
    }

    /// Decides one write and logs it: accepted when `token` is at least
    /// the highest token seen for `id`.
    pub fn write(&self, id: &str, token: u64, node: &str) -> bool {
        let mut reg = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let highest = reg.highest.entry(id.to_string()).or_insert(0);
        let accepted = token >= *highest;
        if accepted {
            *highest = token;
        }
        reg.log.push(FenceWrite {
            at: unix_nanos(),
            id: id.to_string(),
            token,
            node: node.to_string(),
            accepted,
        });
        accepted
    }

    /// Every decision so far.
    pub fn log(&self) -> Vec<FenceWrite> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log
            .clone()
    }

    /// Serves the register on a free loopback port until the returned
    /// server is dropped.
    pub async fn serve(&self) -> FenceServer {
        self.serve_on(std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    /// As [`serve`](Self::serve), on a free port of `ip` (for nodes in
    /// network namespaces: the host's address on their bridge).
    pub async fn serve_on(&self, ip: std::net::IpAddr) -> FenceServer {
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("bind the fence register");
        let addr = listener
            .local_addr()
            .expect("a bound socket has an address");
        let fence = self.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let fence = fence.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let parts: Vec<&str> = line.split_whitespace().collect();
                        let answer = match parts.as_slice() {
                            ["W", id, token, node] => match token.parse() {
                                Ok(token) if fence.write(id, token, node) => "OK\n",
                                Ok(_) => "NO\n",
                                Err(_) => "ERR\n",
                            },
                            _ => "ERR\n",
                        };
                        if write.write_all(answer.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        FenceServer { addr, task }
    }
}

/// The register's TCP server; stops when dropped.
pub struct FenceServer {
    /// Where it listens (`HL_FENCE_ADDR` for the nodes).
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for FenceServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
