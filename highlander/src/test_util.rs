//! Helpers shared by the crate's unit tests.

use std::future::Future;
use std::time::Duration;

/// `fut`'s output, if it is complete or completes once every other task
/// ran (tests that use it run on tokio's paused clock, where the 50 ms
/// pass as soon as nothing else can run).
pub(crate) async fn soon<T>(fut: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(Duration::from_millis(50), fut)
        .await
        .ok()
}
