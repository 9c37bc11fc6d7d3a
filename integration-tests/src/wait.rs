//! Condition waits with deadlines.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polling period of the condition waits.
pub const POLL: Duration = Duration::from_millis(10);

/// Waits until `cond()` returns `Some`, polling every 10 ms; panics after `timeout` with
/// `what` and the last debug value `cond` produced via `Err`.
pub async fn wait_for<T, E, F, Fut>(timeout: Duration, what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    let deadline = Instant::now() + timeout;
    loop {
        match cond().await {
            Ok(v) => return v,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last state: {last:?}");
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `cond()` is true, polling every 10 ms; panics after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(timeout, what, || {
        let fut = cond();
        async move { if fut.await { Ok(()) } else { Err("false") } }
    })
    .await
}

/// Synchronous [`wait_for`].
pub fn wait_for_sync<T, E: std::fmt::Debug>(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match cond() {
            Ok(v) => return v,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last state: {last:?}");
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Synchronous [`wait_until`].
pub fn wait_until_sync(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for_sync(timeout, what, || if cond() { Ok(()) } else { Err("false") })
}
