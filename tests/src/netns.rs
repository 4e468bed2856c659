//! A network namespace joined to this one by a veth pair, whose link the
//! test can cut with real packet loss and bring back.
//!
//! Loopback tricks cannot model a dead link: a TCP proxy's kernel keeps
//! acknowledging what the client sends, and two local addresses always talk
//! over `lo`. Here, a process started in the namespace (see
//! [`Netns::command`]) is reached from this namespace at [`Netns::ns_ip`]
//! across the veth pair, and [`Netns::cut`] drops every packet either way
//! where it arrives (`iptables -j DROP` on each end's `INPUT`, so no sender
//! is told): nothing is closed, nothing is answered, exactly as when a
//! cable is pulled. [`Netns::restore`] removes the rules. (`tc netem` would
//! do as well, but needs the `sch_netem` module, which not every kernel has.)
//!
//! Needs root (`ip` from iproute2, `iptables`, `nsenter` from util-linux). The
//! names (namespace, interfaces) and the /30 subnet are unique per process
//! and per instance, and everything (the namespace, the pair, the rule in
//! this namespace's `iptables`) is deleted when the [`Netns`] is dropped,
//! also when the test panics.
//!
//! ```no_run
//! let ns = highlander_tests::netns::Netns::create();
//! let mut server = ns.command("/usr/bin/some-server");
//! // ... start it, connect to ns.ns_ip() from the test ...
//! ns.cut();
//! ns.restore();
//! # let _ = server;
//! ```

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace and the veth pair to it; deleted on drop.
pub struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

/// Runs a command, returns its stdout, and panics with its output when it
/// fails (for every network-namespace harness of this crate).
pub(crate) fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", args.join(" ")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // `ip -n` and `ip netns exec` remount / as a slave first, which fails
    // when / is not a mount point: inside a chroot.
    let hint = if stderr.contains("make-rslave") {
        "; / is not a mount point here (a chroot?): network namespaces need a real root"
    } else {
        ""
    };
    assert!(
        out.status.success(),
        "`{}` failed (netns tests need root, iproute2, iptables and util-linux{hint}): {}",
        args.join(" "),
        stderr.trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Netns {
    /// Creates the namespace (with `lo` up), the veth pair and addresses:
    /// [`host_ip`](Self::host_ip) here, [`ns_ip`](Self::ns_ip) inside.
    /// Panics with the reason when that fails.
    pub fn create() -> Netns {
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // A /30 in 10.213.0.0/16 picked from the pid, the instance and the
        // clock, so that concurrent test processes do not share one.
        let pick =
            (u128::from(pid) * 7919 + u128::from(n) * 104_729 + crate::unix_nanos()) % 16_384;
        let pick = pick as u32;
        let base = (10u32 << 24) | (213 << 16) | (pick << 2);
        // pid in hex (at most 6 digits on Linux) and the instance: unique,
        // and short enough for a 15-byte interface name.
        let tag = format!("{pid:x}x{n}");
        let ns = Netns {
            name: format!("hl-{pid}-{n}"),
            host_if: format!("hlh{tag}"),
            ns_if: format!("hln{tag}"),
            host_ip: Ipv4Addr::from(base + 1),
            ns_ip: Ipv4Addr::from(base + 2),
        };
        assert!(ns.host_if.len() <= 15, "interface name too long");
        // From here on, Drop cleans up whatever was made.
        run(&["ip", "netns", "add", &ns.name]);
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        run(&[
            "ip",
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ]);
        run(&["ip", "link", "set", &ns.ns_if, "netns", &ns.name]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ]);
        run(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/30", ns.ns_ip),
            "dev",
            &ns.ns_if,
        ]);
        run(&["ip", "link", "set", &ns.host_if, "up"]);
        run(&["ip", "-n", &ns.name, "link", "set", &ns.ns_if, "up"]);
        ns
    }

    /// The namespace's name (as `ip netns` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// This namespace's end of the link.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// The namespace's end of the link: reach a server started with
    /// [`command`](Self::command) here.
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    /// The /30 subnet of the link, `a.b.c.d/30`.
    pub fn subnet(&self) -> String {
        format!("{}/30", Ipv4Addr::from(u32::from(self.host_ip) - 1))
    }

    /// A command that runs `program` inside the namespace (through
    /// `nsenter`, which execs it: the child's pid is the program's). With
    /// `user`, as that uid and gid.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.command_as(program, None)
    }

    /// As [`command`](Self::command), switching to `(uid, gid)` when given
    /// (servers that refuse to run as root).
    pub fn command_as(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        user: Option<(u32, u32)>,
    ) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net={}", self.path().display()));
        if let Some((uid, gid)) = user {
            command.arg(format!("--setuid={uid}"));
            command.arg(format!("--setgid={gid}"));
        }
        command.arg("--").arg(program);
        command
    }

    /// Cuts the link: every packet either way is dropped on arrival
    /// (`iptables -j DROP` on the `INPUT` of each end's interface), so that
    /// the sender's kernel sees nothing but silence. Nothing is closed or
    /// answered.
    pub fn cut(&self) {
        run(&["iptables", "-I", "INPUT", "-i", &self.host_if, "-j", "DROP"]);
        run(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "iptables",
            "-I",
            "INPUT",
            "-i",
            &self.ns_if,
            "-j",
            "DROP",
        ]);
    }

    /// Brings the link back after [`cut`](Self::cut).
    pub fn restore(&self) {
        run(&["iptables", "-D", "INPUT", "-i", &self.host_if, "-j", "DROP"]);
        run(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "iptables",
            "-D",
            "INPUT",
            "-i",
            &self.ns_if,
            "-j",
            "DROP",
        ]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting either end deletes the pair; deleting the namespace
        // deletes its end. Errors are ignored: part may never have existed.
        let quiet = |args: &[&str]| {
            let _ = Command::new(args[0])
                .args(&args[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        // The rule of `cut` in this namespace (the namespace's own go with it).
        quiet(&["iptables", "-D", "INPUT", "-i", &self.host_if, "-j", "DROP"]);
        quiet(&["ip", "link", "del", &self.host_if]);
        quiet(&["ip", "netns", "del", &self.name]);
    }
}
