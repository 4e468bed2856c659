//! Which etcd member each kind of request goes to: the keep-alive, the
//! watch and the other requests each stay on a member that answers, move to
//! the next one after a failure, and avoid a member that left a request
//! unanswered; and one request sent through that choice, within its timeout.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::{Instant, timeout};
use tonic::{Response, Status};

use super::conn::{Conn, DialError, Dialer};
use super::failure::{Call, classify};

/// What a request to etcd came to: etcd's answer or its refusal, or `Err`
/// when no answer came in time.
pub(super) type Outcome<T> =
    std::result::Result<std::result::Result<T, Status>, tokio::time::error::Elapsed>;

/// What a request to etcd is for: each use keeps its own member, and they
/// share what they learn about members that do not answer.
#[derive(Debug, Clone, Copy)]
pub(super) enum Use {
    KeepAlive = 0,
    Watch = 1,
    Request = 2,
}

/// The members, each reached through a connection of its own. A client that
/// balances requests over all members at random would send a share of every
/// kind of request to a member that hangs with its connections open
/// (paused, overloaded), each lost for a whole request timeout. Here each
/// use stays on a member that answers, moves to the next one after a
/// failure, and avoids a member that left a request unanswered.
pub(super) struct Members {
    dialer: Dialer,
    /// How long a member that did not answer is avoided.
    avoid_for: Duration,
    /// How long one request may take, tries on two members included.
    request_timeout: Duration,
    state: Mutex<Choice<Conn>>,
}

/// Which member each use is at, each member's connection (`C`: a
/// connection, a placeholder in tests) and until when it is avoided.
struct Choice<C> {
    conns: Vec<Option<C>>,
    avoid_until: Vec<Option<Instant>>,
    /// The current member of each [`Use`].
    at: [usize; 3],
}

impl<C> Choice<C> {
    fn new(n: usize) -> Choice<C> {
        let n = n.max(1);
        Choice {
            conns: (0..n).map(|_| None).collect(),
            avoid_until: vec![None; n],
            at: [0; 3],
        }
    }

    /// `use_`'s current member failed a request at `now`: move that use to
    /// the next member not avoided (the next one when all are). `silent`
    /// (no answer, or no connection) also makes every use avoid that member
    /// until `now + avoid_for`, and drops its connection so that a later use
    /// reconnects.
    fn failed(&mut self, use_: Use, silent: bool, now: Instant, avoid_for: Duration) {
        let n = self.conns.len();
        if n < 2 {
            return;
        }
        let at = self.at[use_ as usize];
        if silent {
            self.avoid_until[at] = Some(now + avoid_for);
            self.conns[at] = None;
        }
        let next = (1..n)
            .map(|step| (at + step) % n)
            .find(|&i| self.avoid_until[i].is_none_or(|t| t <= now))
            .unwrap_or((at + 1) % n);
        self.at[use_ as usize] = next;
    }
}

impl Members {
    pub(super) fn new(
        dialer: Dialer,
        n: usize,
        ttl: Duration,
        request_timeout: Duration,
    ) -> Members {
        Members {
            dialer,
            avoid_for: ttl,
            request_timeout,
            state: Mutex::new(Choice::new(n)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Choice<Conn>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// How many members there are.
    pub(super) fn count(&self) -> usize {
        self.lock().conns.len()
    }

    fn several(&self) -> bool {
        self.count() > 1
    }

    /// The connection to `use_`'s current member, connecting (and
    /// authenticating) on first use, within `limit`.
    pub(super) async fn client(
        &self,
        use_: Use,
        limit: Duration,
    ) -> std::result::Result<Conn, DialError> {
        let (at, existing) = {
            let state = self.lock();
            let at = state.at[use_ as usize];
            (at, state.conns[at].clone())
        };
        if let Some(conn) = existing {
            return Ok(conn);
        }
        let conn = timeout(limit, self.dialer.dial(at))
            .await
            .map_err(|_| DialError::Unreachable(format!("no connection within {limit:?}")))??;
        let mut state = self.lock();
        Ok(state.conns[at].get_or_insert(conn).clone())
    }

    /// `use_`'s current member failed a request: see [`Choice::failed`].
    pub(super) fn failed(&self, use_: Use, silent: bool) {
        self.lock()
            .failed(use_, silent, Instant::now(), self.avoid_for);
    }

    /// One request through `Use::Request`'s member, within the request
    /// timeout. A member that does not answer, or cannot be reached, moves
    /// the next request elsewhere; a request the transport could not deliver
    /// or the member could not serve (`Unavailable`: nothing was applied) is
    /// sent once more to the next member. `Err` is a timeout.
    pub(super) async fn request<T, F, Fut>(&self, mut send: F) -> Outcome<T>
    where
        F: FnMut(Conn) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.request_timeout;
        let mut tries = if self.several() { 2 } else { 1 };
        loop {
            tries -= 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = async {
                match self.client(Use::Request, left).await {
                    Ok(conn) => Some(conn.call(&mut send).await),
                    // Connected, but authenticating failed: that answer.
                    Err(DialError::Failed(status)) => Some(Err(status)),
                    Err(DialError::Credentials(why)) => Some(Err(Status::unauthenticated(why))),
                    Err(
                        DialError::Unreachable(_) | DialError::Handshake(_) | DialError::Tls(_),
                    ) => None,
                }
            };
            let outcome = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Some(answer)) => Ok(answer),
                Ok(None) | Err(_) => {
                    self.failed(Use::Request, true);
                    // Unreachable member or no answer: a timeout to the caller
                    // (a zero timeout on a future that never completes is
                    // the `Elapsed` value, at once).
                    if tries > 0 && Instant::now() < deadline {
                        continue;
                    }
                    return timeout(Duration::ZERO, std::future::pending()).await;
                }
            };
            if let Ok(Err(e)) = &outcome {
                let failure = classify(e, Call::Request);
                if failure.undelivered() {
                    self.failed(Use::Request, failure.silent());
                    if tries > 0 {
                        continue;
                    }
                }
            }
            return outcome;
        }
    }
}

/// Whether a failed request says its member is out of reach: no answer in
/// time, or no connection at all. Such a member is avoided for a while.
pub(super) fn out_of_reach<T>(outcome: &Outcome<T>) -> bool {
    match outcome {
        Err(_) => true,
        Ok(Err(e)) => classify(e, Call::Request).silent(),
        Ok(Ok(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AVOID: Duration = Duration::from_secs(10);

    #[test]
    fn a_failure_moves_only_that_use_to_the_next_member() {
        let now = Instant::now();
        let mut choice = Choice::<()>::new(3);
        choice.failed(Use::Watch, false, now, AVOID);
        assert_eq!(choice.at, [0, 1, 0]);
        choice.failed(Use::Watch, false, now, AVOID);
        choice.failed(Use::Watch, false, now, AVOID);
        assert_eq!(choice.at, [0, 0, 0], "round the ring");
        assert!(choice.avoid_until.iter().all(Option::is_none));
    }

    #[test]
    fn a_silent_member_is_avoided_by_every_use_until_the_time_passes() {
        let now = Instant::now();
        let mut choice = Choice::new(3);
        choice.conns = vec![Some('a'), Some('b'), Some('c')];
        // Member 1 does not answer the requests.
        choice.at[Use::Request as usize] = 1;
        choice.failed(Use::Request, true, now, AVOID);
        assert_eq!(choice.at[Use::Request as usize], 2);
        assert_eq!(choice.conns, vec![Some('a'), None, Some('c')]);
        // The keep-alive, failing on member 0, skips member 1.
        choice.failed(Use::KeepAlive, false, now, AVOID);
        assert_eq!(choice.at[Use::KeepAlive as usize], 2);
        // Once the time has passed, member 1 is a choice again.
        choice.failed(Use::KeepAlive, false, now + AVOID, AVOID);
        assert_eq!(choice.at[Use::KeepAlive as usize], 0);
        choice.failed(Use::KeepAlive, false, now + AVOID, AVOID);
        assert_eq!(choice.at[Use::KeepAlive as usize], 1);
    }

    #[test]
    fn with_every_member_avoided_the_next_one_is_tried() {
        let now = Instant::now();
        let mut choice = Choice::<()>::new(2);
        choice.failed(Use::Request, true, now, AVOID);
        choice.failed(Use::Request, true, now, AVOID);
        assert_eq!(choice.at[Use::Request as usize], 0);
        choice.failed(Use::Request, true, now, AVOID);
        assert_eq!(choice.at[Use::Request as usize], 1);
    }

    #[test]
    fn one_member_is_never_avoided() {
        let mut choice = Choice::new(1);
        choice.conns = vec![Some(())];
        choice.failed(Use::Request, true, Instant::now(), AVOID);
        assert_eq!(choice.at, [0, 0, 0]);
        assert_eq!(choice.conns, vec![Some(())], "its connection is kept");
        assert!(choice.avoid_until[0].is_none());
    }
}
