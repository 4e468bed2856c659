use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use super::{Claim, ClaimRequest, Session};

/// The `try_claim` cancel-safety rule: `a` starts claiming `id`, the
/// future is polled `polls` times (yielding to other tasks between
/// polls) and dropped if it has not answered; then `b` must be able to
/// claim `id`, waiting at most for the wake-ups the backend gives it.
/// Returns whether the future was dropped mid-flight (a future that
/// answered was a plain claim; its tenure is released before `b` tries).
pub(crate) async fn dropped_try_claim_leaves_no_tenure(
    a: &dyn Session,
    b: &dyn Session,
    id: &str,
    polls: usize,
) -> bool {
    let request = ClaimRequest::new(id, Duration::from_secs(1));
    let mut dropped = true;
    {
        let mut claim = pin!(a.try_claim(request.clone()));
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..polls {
            if let Poll::Ready(answer) = claim.as_mut().poll(&mut cx) {
                dropped = false;
                if let Ok(Claim::Granted(lease)) = answer {
                    a.release(id, lease.token).await.expect("release");
                }
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    // Hang guard only: a tenure left behind would keep `b` waiting for
    // ever; a correct backend wakes it as soon as nothing holds the id.
    let claimed = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match b.try_claim(request.clone()).await {
                Ok(Claim::Granted(lease)) => return lease,
                Ok(Claim::Busy { wake, .. }) => wake.await,
                Err(e) => panic!("b cannot ask: {e}"),
            }
        }
    })
    .await;
    let lease = claimed.unwrap_or_else(|_| {
        panic!("`{id}` is still held after a dropped try_claim ({polls} polls)")
    });
    b.release(id, lease.token).await.expect("release");
    dropped
}
