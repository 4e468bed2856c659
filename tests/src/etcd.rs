//! Real `etcd` servers for the etcd backend's tests: a single member or a
//! 3-member cluster, started from the machine's `etcd` binary (Debian
//! `etcd-server`) in a temp dir on free loopback ports, and stopped when the
//! [`EtcdCluster`] is dropped.
//!
//! Nothing here skips: when `etcd` is missing or does not become healthy, the
//! harness panics with the reason and the tail of the server's log.
//!
//! ```no_run
//! # #[tokio::main] async fn main() {
//! let mut etcd = highlander_tests::etcd::EtcdCluster::start(3).await;
//! let url = etcd.url(); // etcd://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3
//! etcd.kill_member(0);
//! # let _ = url; }
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One etcd member.
struct Member {
    name: String,
    client_port: u16,
    child: Option<Child>,
    log: PathBuf,
    args: Vec<String>,
}

/// A running etcd cluster of one or more members.
pub struct EtcdCluster {
    dir: PathBuf,
    members: Vec<Member>,
    tls: Option<TlsPaths>,
    /// The address every member listens on (`127.0.0.1`, or its network
    /// namespace's).
    host: String,
    /// Runs each member inside a network namespace (`ip netns exec NS`),
    /// or nothing.
    prefix: Vec<String>,
}

/// The PEM files of a TLS etcd, copied into its dir.
#[derive(Debug, Clone)]
struct TlsPaths {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

use crate::free_port;

/// The `etcd` binary: `$ETCD_BIN`, else `etcd` on the `PATH`.
fn etcd_bin() -> String {
    std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into())
}

/// The `etcdctl` binary: `$ETCDCTL_BIN`, else `etcdctl` on the `PATH`.
fn etcdctl_bin() -> String {
    std::env::var("ETCDCTL_BIN").unwrap_or_else(|_| "etcdctl".into())
}

/// Where data dirs go: tmpfs when the machine has it (fsync is what makes
/// etcd slow on a disk), else the system temp dir.
fn base_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

impl EtcdCluster {
    /// Starts a single-member etcd.
    pub async fn single() -> EtcdCluster {
        EtcdCluster::start(1).await
    }

    /// Starts `size` members forming one cluster and waits until every one
    /// answers. Panics with the reason when that fails.
    pub async fn start(size: usize) -> EtcdCluster {
        EtcdCluster::start_with(size, None, Vec::new(), "127.0.0.1").await
    }

    /// Starts a single member inside a network namespace: `prefix` runs a
    /// program there (`ip netns exec NS`), and the member listens on
    /// `host`, that namespace's address, which this process must reach.
    pub async fn single_in(prefix: Vec<String>, host: std::net::Ipv4Addr) -> EtcdCluster {
        EtcdCluster::start_with(1, None, prefix, &host.to_string()).await
    }

    /// Starts a single member that serves clients over TLS only, with the
    /// server certificate of `tls`, and accepts only clients with a
    /// certificate its CA signed (`etcdctl` here uses the client
    /// certificate of `tls`).
    pub async fn single_tls(tls: &crate::pki::TlsFiles) -> EtcdCluster {
        EtcdCluster::start_with(1, Some(tls), Vec::new(), "127.0.0.1").await
    }

    async fn start_with(
        size: usize,
        tls: Option<&crate::pki::TlsFiles>,
        prefix: Vec<String>,
        host: &str,
    ) -> EtcdCluster {
        assert!(size >= 1, "an etcd cluster has at least one member");
        let unique = format!(
            "hl-etcd-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            crate::unix_nanos() % 1_000_000_000
        );
        let dir = base_dir().join(&unique);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create etcd dir {}: {e}", dir.display()));
        let copy = |from: &Path, name: &str| {
            let to = dir.join(name);
            std::fs::copy(from, &to).unwrap_or_else(|e| {
                panic!("cannot copy {} to {}: {e}", from.display(), to.display())
            });
            to
        };
        let tls = tls.map(|t| TlsPaths {
            ca: copy(&t.ca, "ca.pem"),
            server_cert: copy(&t.server_cert, "server.pem"),
            server_key: copy(&t.server_key, "server-key.pem"),
            client_cert: copy(&t.client_cert, "client.pem"),
            client_key: copy(&t.client_key, "client-key.pem"),
        });
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://{host}:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut cluster = EtcdCluster {
            dir: dir.clone(),
            members: Vec::new(),
            tls: tls.clone(),
            host: host.to_string(),
            prefix,
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let data = dir.join(format!("{name}.data"));
            let log = dir.join(format!("{name}.log"));
            let args: Vec<String> = [
                "--name".to_string(),
                name.clone(),
                "--data-dir".into(),
                data.display().to_string(),
                "--listen-client-urls".into(),
                format!("{scheme}://{host}:{client}"),
                "--advertise-client-urls".into(),
                format!("{scheme}://{host}:{client}"),
                "--listen-peer-urls".into(),
                format!("http://{host}:{peer}"),
                "--initial-advertise-peer-urls".into(),
                format!("http://{host}:{peer}"),
                "--initial-cluster".into(),
                initial_cluster.clone(),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                unique.clone(),
            ]
            .into();
            let mut args = args;
            if let Some(tls) = &tls {
                for (flag, path) in [
                    ("--cert-file", &tls.server_cert),
                    ("--key-file", &tls.server_key),
                    ("--trusted-ca-file", &tls.ca),
                ] {
                    args.push(flag.into());
                    args.push(path.display().to_string());
                }
                args.push("--client-cert-auth".into());
            }
            let child = spawn_etcd(&cluster.prefix, &args, &log);
            cluster.members.push(Member {
                name,
                client_port: *client,
                child: Some(child),
                log,
                args,
            });
        }
        cluster.wait_healthy(Duration::from_secs(60)).await;
        cluster
    }

    async fn wait_healthy(&mut self, limit: Duration) {
        let started = Instant::now();
        loop {
            for member in &mut self.members {
                if let Some(child) = member.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    panic!(
                        "etcd member {} exited during start-up ({status}); its log ends:\n{}",
                        member.name,
                        tail(&member.log)
                    );
                }
            }
            let all = self.members.iter().filter(|m| m.child.is_some()).all(|m| {
                self.etcdctl_command()
                    .arg(format!("--endpoints={}", self.client_url(m.client_port)))
                    .arg("--command-timeout=1s")
                    .arg("endpoint")
                    .arg("health")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            });
            if all {
                return;
            }
            if started.elapsed() > limit {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| format!("--- {} ---\n{}", m.name, tail(&m.log)))
                    .collect();
                panic!(
                    "etcd did not become healthy within {limit:?}; logs:\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The client endpoints, `127.0.0.1:port` each, of every member
    /// (killed ones included).
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}:{}", self.host, m.client_port))
            .collect()
    }

    /// The backend URL naming every member: `etcd://127.0.0.1:p1,…`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.endpoints().join(","))
    }

    /// The same URL with query parameters, for example `ttl=3s`.
    pub fn url_with(&self, query: &str) -> String {
        format!("{}/highlander?{query}", self.url())
    }

    /// The index of the member that is the raft leader now, as the running
    /// members report it.
    pub fn leader(&self) -> usize {
        let field = |out: &str, name: &str| -> Option<u64> {
            out.lines()
                .find_map(|l| l.trim().strip_prefix(&format!("\"{name}\" : ")))
                .and_then(|v| v.trim().parse().ok())
        };
        for (i, m) in self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.child.is_some())
        {
            let out = self
                .etcdctl_command()
                .arg(format!("--endpoints={}", self.client_url(m.client_port)))
                .args(["endpoint", "status", "-w", "fields"])
                .output()
                .expect("etcdctl runs");
            let out = String::from_utf8_lossy(&out.stdout);
            if let (Some(id), Some(leader)) = (field(&out, "MemberID"), field(&out, "Leader"))
                && id == leader
            {
                return i;
            }
        }
        panic!("no running etcd member says it is the leader")
    }

    /// Kills member `i` with SIGKILL (the others keep quorum in a cluster of
    /// three) and waits for it to exit.
    pub fn kill_member(&mut self, i: usize) {
        let member = &mut self.members[i];
        if let Some(mut child) = member.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to member `i`: a stopped member
    /// keeps its connections open but answers nothing, like a hung host.
    pub fn signal_member(&self, i: usize, signal: &str) {
        let child = self.members[i].child.as_ref().expect("the member runs");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -{signal} of etcd member {i} failed");
    }

    /// Starts member `i` again after [`EtcdCluster::kill_member`], on the
    /// same ports and data, and waits until every running member answers.
    pub async fn restart_member(&mut self, i: usize) {
        let member = &mut self.members[i];
        assert!(member.child.is_none(), "member {i} is running");
        member.child = Some(spawn_etcd(&self.prefix, &member.args, &member.log));
        self.wait_healthy(Duration::from_secs(60)).await;
    }

    /// Runs `etcdctl` against the members still running with `args`, and
    /// returns its stdout. Panics with its stderr when it fails.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| self.client_url(m.client_port))
            .collect();
        let out = self
            .etcdctl_command()
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run `{}` ({e}): install etcd-client", etcdctl_bin())
            });
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn client_url(&self, port: u16) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{port}", self.host)
    }

    fn etcdctl_command(&self) -> Command {
        let mut command = Command::new(etcdctl_bin());
        command.env("ETCDCTL_API", "3");
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cacert={}", tls.ca.display()))
                .arg(format!("--cert={}", tls.client_cert.display()))
                .arg(format!("--key={}", tls.client_key.display()));
        }
        command
    }

    /// Every lease id the cluster holds now (hex, as `etcdctl` prints them).
    pub fn leases(&self) -> Vec<String> {
        // etcdctl 3.4 prints "found N leases", then one hex id per line.
        self.etcdctl(&["lease", "list"])
            .lines()
            .skip(1)
            .map(str::trim)
            .filter(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_hexdigit()))
            .map(str::to_string)
            .collect()
    }

    /// The lease id (hex) that key `key` is attached to, if the key exists.
    pub fn lease_of(&self, key: &str) -> Option<String> {
        let out = self.etcdctl(&["get", key, "-w", "fields"]);
        out.lines()
            .find_map(|l| l.strip_prefix("\"Lease\" : "))
            .map(|v| v.trim().parse::<i64>().expect("a lease id is a number"))
            .map(|id| format!("{id:016x}"))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn_etcd(prefix: &[String], args: &[String], log: &Path) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    let mut command = match prefix.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(etcd_bin());
            c
        }
        None => Command::new(etcd_bin()),
    };
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("clone a file handle"))
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start `{}` ({e}): install etcd (Debian package etcd-server; \
                 scripts/setup does it) or set ETCD_BIN",
                etcd_bin()
            )
        })
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
