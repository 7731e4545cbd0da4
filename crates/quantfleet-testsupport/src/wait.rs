//! Polling until the cluster reaches a state. Controllers act within milliseconds to seconds, so a short
//! fixed interval with a deadline is simpler and easier to reason about than a watch.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::Error;

/// What one probe saw: done with a value, or not yet with a description of the current state
/// (reported in the timeout error so a failure says where things got stuck).
pub enum Probe<T> {
    Done(T),
    Pending(String),
}

const INTERVAL: Duration = Duration::from_millis(200);

/// Runs `probe` every 200 ms until it returns `Done` or an error, or `timeout` passes.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Probe<T>, Error>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe().await? {
            Probe::Done(value) => return Ok(value),
            Probe::Pending(state) => state,
        };
        if Instant::now() >= deadline {
            return Err(Error::Timeout { what: what.to_string(), seconds: timeout.as_secs(), last });
        }
        tokio::time::sleep(INTERVAL).await;
    }
}
