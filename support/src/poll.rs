//! Polling until something holds: the one way tests wait for what a
//! process or a server does in its own time. Bounded by [`PATIENCE`], so a
//! test that waits for what never happens fails, saying what it waited for.

use std::fmt;
use std::time::Duration;

/// How long a test waits for something that should happen promptly. Only a
/// bound against hanging forever, never a measure of speed.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The pause between two looks.
pub const POLL: Duration = Duration::from_millis(20);

/// What one look returns: done (with a value) or not yet (perhaps saying
/// what it saw, for the message when patience runs out).
pub trait Poll {
    type Output;
    fn ready(self) -> Result<Self::Output, Option<String>>;
}

impl Poll for bool {
    type Output = ();
    fn ready(self) -> Result<(), Option<String>> {
        if self { Ok(()) } else { Err(None) }
    }
}

impl<T> Poll for Option<T> {
    type Output = T;
    fn ready(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

/// `Err` is "not yet"; its text is shown if it is the last look.
impl<T, E: fmt::Display> Poll for Result<T, E> {
    type Output = T;
    fn ready(self) -> Result<T, Option<String>> {
        self.map_err(|e| Some(e.to_string()))
    }
}

/// Patience ran out; the last look's account of what it saw, if any.
#[derive(Debug)]
pub struct GaveUp {
    pub last: Option<String>,
}

impl fmt::Display for GaveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, " (gave up after {PATIENCE:?}")?;
        match &self.last {
            Some(last) => write!(f, "; last seen: {last})"),
            None => write!(f, ")"),
        }
    }
}

/// Looks with `look` every `every` until it is ready, at most [`PATIENCE`].
pub async fn poll_until<P: Poll>(
    every: Duration,
    mut look: impl AsyncFnMut() -> P,
) -> Result<P::Output, GaveUp> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match look().await.ready() {
            Ok(v) => return Ok(v),
            Err(last) if tokio::time::Instant::now() > deadline => return Err(GaveUp { last }),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// Looks every [`POLL`] until `look` is ready and returns its value; panics
/// naming `what` if it is not within [`PATIENCE`].
pub async fn eventually<P: Poll>(
    what: impl fmt::Display,
    look: impl AsyncFnMut() -> P,
) -> P::Output {
    poll_until(POLL, look)
        .await
        .unwrap_or_else(|gave_up| panic!("never: {what}{gave_up}"))
}

/// [`eventually`] looking every `every`: for a look that acts (sends a
/// request), whose pace the test depends on.
pub async fn eventually_every<P: Poll>(
    what: impl fmt::Display,
    every: Duration,
    look: impl AsyncFnMut() -> P,
) -> P::Output {
    poll_until(every, look)
        .await
        .unwrap_or_else(|gave_up| panic!("never: {what}{gave_up}"))
}

/// [`eventually`] for a caller that is not async (it blocks the thread).
pub fn eventually_blocking<P: Poll>(
    what: impl fmt::Display,
    mut look: impl FnMut() -> P,
) -> P::Output {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        match look().ready() {
            Ok(v) => return v,
            Err(last) if std::time::Instant::now() > deadline => {
                panic!("never: {what}{}", GaveUp { last })
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}
