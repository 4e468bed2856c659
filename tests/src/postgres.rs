//! A real Postgres for the postgres backend's tests: `initdb` + `postgres`
//! from `/usr/lib/postgresql/<major>/bin` (Debian's `postgresql` package,
//! installed by `scripts/setup`), in a temp dir on a free loopback port,
//! with default settings (the shared lock table is as small as on any fresh
//! server), stopped when the [`PgServer`] is dropped.
//!
//! `initdb` and `postgres` refuse to run as root: when the tests run as root,
//! the server runs as the `postgres` system user that the package creates,
//! with the temp dir owned by it.
//!
//! Nothing here skips: when the server cannot start, the harness panics with
//! the reason and the tail of the server's log.
//!
//! ```no_run
//! # #[tokio::main] async fn main() {
//! let pg = highlander_tests::postgres::PgServer::start();
//! let url = pg.url(); // postgres://highlander:…@127.0.0.1:<port>/highlander
//! pg.sql("SELECT 1").await;
//! # let _ = url; }
//! ```

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::pki::TlsFiles;

/// The application role's password in every test server.
pub const PASSWORD: &str = "hl-pw-s3cret";
/// The application role and its database.
pub const USER: &str = "highlander";

/// A running Postgres server.
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
    child: Option<Child>,
    /// The network namespace the server runs in, when not this one.
    netns: Option<PathBuf>,
}

/// How a TLS server treats clients.
#[derive(Clone, Copy)]
struct Tls<'a> {
    files: &'a TlsFiles,
    /// The server accepts TCP connections only over TLS with a client
    /// certificate the CA signed (`hostssl ... clientcert=verify-ca`, the
    /// password still checked).
    client_certs: bool,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

use crate::free_port;

/// `/usr/lib/postgresql/<major>/bin` with the highest major version that has
/// a `postgres` binary, or `$PG_BIN`.
fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .unwrap_or_else(|e| {
            panic!(
                "Postgres is not installed ({}: {e}): run scripts/setup (Debian package `postgresql`)",
                root.display()
            )
        })
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!("no /usr/lib/postgresql/<major>/bin/postgres: run scripts/setup (Debian package `postgresql`)")
    })
}

fn effective_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

/// The `postgres` system user's uid and gid, from /etc/passwd.
fn postgres_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres") && fields.len() > 3)
                .then(|| (fields[2].parse().ok(), fields[3].parse().ok()))
                .and_then(|(u, g)| Some((u?, g?)))
        })
        .unwrap_or_else(|| {
            panic!("running as root, and there is no `postgres` user to run the server as: install the Debian `postgresql` package (scripts/setup)")
        })
}

fn base_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

impl PgServer {
    /// Starts a server and creates the `highlander` role (password
    /// [`PASSWORD`]) and its database. Panics with the reason when that fails.
    pub fn start() -> PgServer {
        PgServer::start_with(None, None)
    }

    /// As [`PgServer::start`], with `ssl = on` and the server certificate
    /// of `tls`.
    pub fn start_tls(tls: &TlsFiles) -> PgServer {
        let tls = Tls {
            files: tls,
            client_certs: false,
        };
        PgServer::start_with(Some(tls), None)
    }

    /// As [`PgServer::start_tls`], and TCP clients must also show a client
    /// certificate that the CA of `tls` signed (the password is still
    /// checked).
    pub fn start_tls_with_client_certs(tls: &TlsFiles) -> PgServer {
        let tls = Tls {
            files: tls,
            client_certs: true,
        };
        PgServer::start_with(Some(tls), None)
    }

    /// As [`PgServer::start`], with the server inside `netns`: it listens on
    /// the namespace's `127.0.0.1` and on [`Netns::ns_ip`](crate::netns::Netns::ns_ip), where this
    /// namespace reaches it across the veth link ([`PgServer::url_at`]), and
    /// on its Unix socket, which every namespace reaches
    /// ([`PgServer::url_via_socket`], [`PgServer::admin`], [`PgServer::psql`]).
    /// Drop the server before the namespace.
    pub fn start_in(netns: &crate::netns::Netns) -> PgServer {
        PgServer::start_with(None, Some(netns))
    }

    fn start_with(tls: Option<Tls<'_>>, netns: Option<&crate::netns::Netns>) -> PgServer {
        let bin = pg_bin();
        let owner = (effective_uid() == 0).then(postgres_user);
        let unique = format!(
            "hl-pg-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            crate::unix_nanos() % 1_000_000_000
        );
        let dir = base_dir().join(unique);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let mut server = PgServer {
            dir,
            bin,
            port: free_port(),
            owner,
            child: None,
            netns: netns.map(|ns| ns.path()),
        };
        server.chown(&server.dir.clone());
        let data = server.data();
        let out = server
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .args(["-E", "UTF8", "--locale=C", "--no-sync"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb: {e}"));
        assert!(
            out.status.success(),
            "initdb failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut conf = format!(
            "\n# highlander tests\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n",
            server.port,
            server.dir.display()
        );
        if let Some(ns) = netns {
            conf = conf.replace(
                "listen_addresses = '127.0.0.1'",
                &format!("listen_addresses = '127.0.0.1,{}'", ns.ns_ip()),
            );
            let hba_path = data.join("pg_hba.conf");
            let mut hba = std::fs::read_to_string(&hba_path).expect("read pg_hba.conf");
            hba.push_str(&format!("host all all {} scram-sha-256\n", ns.subnet()));
            std::fs::write(&hba_path, hba).expect("write pg_hba.conf");
        }
        if let Some(tls) = tls {
            let cert = server.dir.join("server.crt");
            let key = server.dir.join("server.key");
            std::fs::copy(&tls.files.server_cert, &cert).expect("copy server.crt");
            std::fs::copy(&tls.files.server_key, &key).expect("copy server.key");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .expect("chmod server.key");
            server.chown(&cert);
            server.chown(&key);
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                cert.display(),
                key.display()
            ));
            if tls.client_certs {
                let ca = server.dir.join("client-ca.crt");
                std::fs::copy(&tls.files.ca, &ca).expect("copy client-ca.crt");
                server.chown(&ca);
                conf.push_str(&format!("ssl_ca_file = '{}'\n", ca.display()));
                // The first matching line wins: TLS with a client certificate
                // (and the password), nothing else over TCP.
                let hba_path = data.join("pg_hba.conf");
                let hba = std::fs::read_to_string(&hba_path).expect("read pg_hba.conf");
                let hba = format!(
                    "hostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n\
                     host all all 127.0.0.1/32 reject\n{hba}"
                );
                std::fs::write(&hba_path, hba).expect("write pg_hba.conf");
            }
        }
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&conf_path, text).expect("write postgresql.conf");
        server.start_again();
        server.psql(&format!("CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'"));
        server.psql(&format!("CREATE DATABASE {USER} OWNER {USER}"));
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn chown(&self, path: &Path) {
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("cannot chown {} to postgres: {e}", path.display()));
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid).env("HOME", &self.dir);
        }
        command.current_dir(&self.dir).stdin(Stdio::null());
        command
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs SQL as the superuser through `psql` (over the Unix socket).
    /// Panics when it fails.
    pub fn psql(&self, sql: &str) -> String {
        let out = self
            .command("psql")
            .arg("-h")
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
        assert!(
            out.status.success(),
            "psql `{sql}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The application's URL: the `highlander` role (with its password) and
    /// database, over TCP.
    pub fn url(&self) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{USER}",
            self.port
        )
    }

    /// The application's URL with the server's address given as `host`
    /// (for a server in a network namespace: [`Netns::ns_ip`](crate::netns::Netns::ns_ip)).
    pub fn url_at(&self, host: impl std::fmt::Display) -> String {
        format!("postgres://{USER}:{PASSWORD}@{host}:{}/{USER}", self.port)
    }

    /// The application's URL over the server's Unix socket, which works
    /// from any network namespace.
    pub fn url_via_socket(&self) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@/{USER}?host={}&port={}",
            self.dir.display(),
            self.port
        )
    }

    /// The application's URL for another database (see
    /// [`PgServer::create_database`]).
    pub fn url_for(&self, database: &str) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// Creates a database owned by the application role.
    pub fn create_database(&self, name: &str) {
        self.psql(&format!("CREATE DATABASE \"{name}\" OWNER {USER}"));
    }

    /// Starts the server (again, after [`PgServer::stop`]) and waits until
    /// it accepts connections.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("open the server log");
        self.chown(&self.log());
        let mut command = match &self.netns {
            Some(path) => {
                // nsenter execs postgres: the child's pid is the server's.
                let mut command = Command::new("nsenter");
                command.arg(format!("--net={}", path.display()));
                if let Some((uid, gid)) = self.owner {
                    command
                        .arg(format!("--setuid={uid}"))
                        .arg(format!("--setgid={gid}"));
                }
                command
                    .arg("--")
                    .arg(self.bin.join("postgres"))
                    .env("HOME", &self.dir)
                    .current_dir(&self.dir)
                    .stdin(Stdio::null());
                command
            }
            None => self.command("postgres"),
        };
        let child = command
            .arg("-D")
            .arg(self.data())
            .stdout(log.try_clone().expect("clone a file handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start postgres: {e}"));
        self.child = Some(child);
        let pid_file = self.data().join("postmaster.pid");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Line 8 of postmaster.pid is the server's status.
            let ready = std::fs::read_to_string(&pid_file)
                .map(|s| s.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
                .unwrap_or(false);
            if ready {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "postgres exited at start-up ({status}):\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "postgres did not become ready within 60 s:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the server (fast shutdown: every session is ended, as when an
    /// administrator restarts it) and waits until it has exited.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("postgres did not stop within 30 s:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops and starts the server: every session and every advisory lock
    /// is gone, the tables stay.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// A superuser client over the Unix socket, in the application database.
    pub async fn admin(&self) -> tokio_postgres::Client {
        self.admin_in(USER).await
    }

    /// A superuser client over the Unix socket, in `database`.
    pub async fn admin_in(&self, database: &str) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.dir)
            .port(self.port)
            .user("postgres")
            .dbname(database);
        let (client, conn) = config
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect as the superuser: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Runs SQL as the superuser in the application database and returns
    /// the rows as text.
    pub async fn sql(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        self.sql_in(USER, sql).await
    }

    /// Runs SQL as the superuser in `database` and returns the rows as text.
    pub async fn sql_in(&self, database: &str, sql: &str) -> Vec<Vec<Option<String>>> {
        let client = self.admin_in(database).await;
        let messages = client
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("`{sql}` failed: {e}"));
        messages
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_string))
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    }

    /// Ends every session whose `application_name` (the node name) is
    /// `node`, as an administrator would with `pg_terminate_backend`.
    /// Returns how many were ended.
    pub async fn terminate(&self, node: &str) -> usize {
        let rows = self
            .sql(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{node}'"
            ))
            .await;
        rows.len()
    }

    /// How many sessions `node` has open now (`pg_stat_activity`).
    pub async fn sessions_of(&self, node: &str) -> usize {
        let rows = self
            .sql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{node}'"
            ))
            .await;
        rows[0][0]
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Immediate shutdown: nothing to keep.
            let _ = Command::new("kill")
                .arg("-QUIT")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
