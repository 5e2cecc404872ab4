//! [`eventually`]: the one way a test waits for something to become true
//! that has no event to await (a log line in a file, a status field): it
//! checks again every 20 ms until [`WAIT`] has passed, then fails naming
//! what it waited for. Never a fixed sleep standing in for the event.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::broker::WAIT;

const POLL: Duration = Duration::from_millis(20);

/// Calls `check` until it returns `Some`, and returns that; panics with
/// `what` after [`WAIT`].
pub async fn eventually<T, F>(what: &str, mut check: impl FnMut() -> F) -> T
where
    F: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "waited {WAIT:?} for {what}, in vain"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_first_value_and_fails_naming_what_it_waited_for() {
        let mut calls = 0;
        let value = eventually("the third call", || {
            calls += 1;
            let ready = calls == 3;
            async move { ready.then_some(7) }
        })
        .await;
        assert_eq!((value, calls), (7, 3));
        let failed = tokio::spawn(async {
            tokio::time::pause();
            eventually::<(), _>("a thing that never happens", || async { None }).await
        })
        .await
        .unwrap_err();
        let message = failed.into_panic();
        let message = message.downcast_ref::<String>().unwrap();
        assert!(
            message.contains("for a thing that never happens"),
            "{message}"
        );
    }
}
