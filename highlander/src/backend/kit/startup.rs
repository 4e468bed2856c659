//! The start-up policy, once for every backend: try to reach the engine
//! with backoff, one warning line per failed attempt, until the start
//! timeout; fail at once on what retrying cannot fix.

use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::{BackendErrorKind, Error, Result};

/// The first pause between attempts.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause between attempts.
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// Runs `attempt` until it succeeds, it fails with an error retrying
/// cannot fix ([`Error::is_retryable`] is false: bad credentials, a missing
/// database, TLS files that do not load), or `timeout` has passed since the
/// first try; then fails with [`Error::Unreachable`] naming `what` and the
/// last cause.
///
/// Pauses between attempts start at 50 ms and double up to 2 s, each cut to
/// a random 50–100 % of its length (so a fleet restarted at once does not
/// retry in step), and never run past the timeout. Every failed attempt
/// logs one `warn!` line with its cause; `what` and the cause must already
/// be free of credentials (backends redact their URLs before they wrap an
/// error).
///
/// An attempt still running at the timeout is dropped (connecting must be
/// cancel-safe); its own per-attempt timeout, if shorter, ends it first.
pub(crate) async fn retry_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    let deadline = start.checked_add(timeout);
    let mut pause = FIRST_PAUSE;
    let mut last: Option<Error> = None;
    let mut attempt_no = 0u32;
    loop {
        attempt_no = attempt_no.saturating_add(1);
        let outcome = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, attempt()).await.ok(),
            None => Some(attempt().await),
        };
        let error = match outcome {
            Some(Ok(value)) => return Ok(value),
            Some(Err(error)) if !error.is_retryable() => return Err(error),
            Some(Err(error)) => error,
            // The attempt ran into the deadline: the cause is the last
            // error seen, or that the attempt never answered.
            None => last.take().unwrap_or_else(|| {
                Error::backend(
                    BackendErrorKind::Unreachable,
                    format!(
                        "{what} did not answer within {}",
                        super::duration::show(timeout)
                    ),
                )
            }),
        };
        let now = Instant::now();
        let left = deadline.map(|d| d.saturating_duration_since(now));
        if left.is_some_and(|left| left.is_zero()) {
            return Err(Error::unreachable(what, timeout, error));
        }
        let wait = jitter(pause).min(left.unwrap_or(Duration::MAX));
        warn!(
            backend = %what,
            attempt = attempt_no,
            retry_in_ms = wait.as_millis() as u64,
            "cannot reach the backend yet, retrying: {error}"
        );
        last = Some(error);
        tokio::time::sleep(wait).await;
        pause = pause.saturating_mul(2).min(MAX_PAUSE);
    }
}

/// A random 50–100 % of `pause`.
fn jitter(pause: Duration) -> Duration {
    let random = RandomState::new().hash_one(Instant::now());
    // 0..=1023 thousandths-ish of the upper half.
    let fraction = 1024 + (random % 1025) as u32;
    pause * fraction / 2048
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn down() -> Error {
        Error::backend(BackendErrorKind::Unreachable, "connection refused")
    }

    #[test]
    fn jitter_stays_within_half_and_whole() {
        for _ in 0..1_000 {
            let d = jitter(Duration::from_millis(800));
            assert!(
                d >= Duration::from_millis(400) && d <= Duration::from_millis(800),
                "{d:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_it_succeeds() {
        let tries = Arc::new(AtomicU32::new(0));
        let t = tries.clone();
        let value = retry_until("test", Duration::from_secs(30), move || {
            let n = t.fetch_add(1, Ordering::SeqCst);
            async move { if n < 4 { Err(down()) } else { Ok(n) } }
        })
        .await
        .expect("the fifth attempt succeeds");
        assert_eq!(value, 4);
        assert_eq!(tries.load(Ordering::SeqCst), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_timeout_with_the_last_cause() {
        let started = Instant::now();
        let tries = Arc::new(AtomicU32::new(0));
        let t = tries.clone();
        let err = retry_until("etcd://a:2379", Duration::from_secs(10), move || {
            let n = t.fetch_add(1, Ordering::SeqCst);
            async move {
                Err::<(), _>(Error::backend(
                    BackendErrorKind::Unreachable,
                    format!("refused #{n}"),
                ))
            }
        })
        .await
        .unwrap_err();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "{waited:?}"
        );
        let n = tries.load(Ordering::SeqCst);
        // 50 ms doubling to 2 s, halved at worst: a handful, not a busy loop
        assert!((5..=40).contains(&n), "{n} attempts");
        let Error::Unreachable {
            backend, source, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(backend, "etcd://a:2379");
        assert_eq!(source.to_string(), format!("refused #{}", n - 1));
        assert!(err.to_string().contains("etcd://a:2379"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_retrying_cannot_fix_fails_at_once() {
        let tries = Arc::new(AtomicU32::new(0));
        let t = tries.clone();
        let err = retry_until("test", Duration::from_secs(30), move || {
            t.fetch_add(1, Ordering::SeqCst);
            async {
                Err::<(), _>(Error::backend(
                    BackendErrorKind::Auth,
                    "password authentication failed",
                ))
            }
        })
        .await
        .unwrap_err();
        assert_eq!(tries.load(Ordering::SeqCst), 1);
        assert_eq!(err.to_string(), "password authentication failed");
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_hangs_is_cut_at_the_timeout() {
        let started = Instant::now();
        let err = retry_until("test", Duration::from_secs(5), || {
            std::future::pending::<Result<()>>()
        })
        .await
        .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
        assert!(
            err.to_string().contains("did not answer within 5s"),
            "{err}"
        );
    }
}
