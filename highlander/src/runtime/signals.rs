//! SIGTERM and Ctrl-C.

use crate::{Error, Result};

/// SIGTERM and Ctrl-C (SIGINT), listened for from the moment they are
/// installed.
pub(super) struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    pub(super) fn install() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| {
                signal(kind)
                    .map_err(|e| Error::config_with(format!("cannot listen for {name}: {e}"), e))
            };
            Ok(ShutdownSignals {
                term: listen(SignalKind::terminate(), "SIGTERM")?,
                int: listen(SignalKind::interrupt(), "Ctrl-C (SIGINT)")?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(ShutdownSignals {})
        }
    }

    /// Completes at the next signal, with its name.
    pub(super) async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "Ctrl-C",
            }
        }
        #[cfg(not(unix))]
        {
            match tokio::signal::ctrl_c().await {
                Ok(()) => "Ctrl-C",
                // Without a way to hear Ctrl-C, run until stopped otherwise.
                Err(_) => std::future::pending().await,
            }
        }
    }
}
