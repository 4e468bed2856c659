//! The BEAM comparison's name server: the first BEAM node starts `epmd` as
//! a daemon on the run's port; this guard stops it at the end of the run,
//! or when the run panics.

/// Stops the epmd daemon that the first BEAM node started on its port, at
/// the end of the run or when the run panics.
pub(super) struct Epmd(pub(super) u16);

impl Epmd {
    pub(super) fn kill(&self) {
        let _ = std::process::Command::new("epmd")
            .arg("-kill")
            .env("ERL_EPMD_PORT", self.0.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for Epmd {
    fn drop(&mut self) {
        self.kill();
    }
}
