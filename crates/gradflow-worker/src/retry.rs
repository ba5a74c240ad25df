//! Retrying calls to a shard: which failures are worth another try, how long to wait before
//! it, and the one loop every call runs through ([`Retry::run`]).
//!
//! A failure is worth retrying when the server is not (yet, or for a moment) reachable:
//! `UNAVAILABLE`, `UNKNOWN` or `CANCELLED` ([`transient`]), unless the server says it is
//! shutting down (the typed [`RefusalCode::ShuttingDown`] in the status, see
//! `gradflow_proto::refusal`). Everything else (a refusal, a reply that does not fit the
//! request) fails the call at once.
//!
//! Retry number `n` waits a random time drawn uniformly from `[0, bound(n)]`, where
//! `bound(n)` is `transport.initial_backoff` doubled `n` times, at most
//! `transport.max_backoff` ("full jitter"): workers refused together, by a server that
//! restarted say, spread their retries instead of coming back in step. At most
//! `transport.max_retries` retries follow the first try. The randomness comes from a
//! [`Jitter`], seeded from the operating system for a worker and from a fixed seed in tests.
//!
//! Every call to a shard goes through [`Retry::run`], or drives [`Retry::tries`] itself where its
//! try borrows the caller's buffers (a dense pull). Waiting for the servers to come up at
//! startup is not a retry of a call: `Worker::connect` asks until `startup_timeout` (see
//! `connection`).

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gradflow_proto::TransportConfig;
use gradflow_proto::refusal::{self, RefusalCode};
use tonic::{Code, Status};
use tracing::warn;

/// Whether a failure is worth retrying: the server is not (yet, or for a moment) reachable,
/// and did not say that it is going away.
pub(crate) fn transient(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled)
        && refusal::code(status) != Some(RefusalCode::ShuttingDown)
}

/// Why one try of a call failed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The server refused, or the transport failed: retried when [`transient`].
    Status(Status),
    /// The reply does not fit the request (a protocol error): never retried.
    Protocol(String),
}

impl From<Status> for CallError {
    fn from(status: Status) -> CallError {
        CallError::Status(status)
    }
}

/// A source of uniform random numbers for retry delays: SplitMix64 over an atomic state, so
/// that calls to several shards at once draw from it without a lock.
#[derive(Debug)]
pub(crate) struct Jitter {
    state: AtomicU64,
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

impl Jitter {
    /// A fixed sequence: the same seed draws the same numbers.
    pub(crate) fn seeded(seed: u64) -> Jitter {
        Jitter { state: AtomicU64::new(seed) }
    }

    /// A sequence seeded from the operating system's randomness (through std's hasher keys),
    /// different in every process.
    pub(crate) fn from_entropy() -> Jitter {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id() as u64);
        Jitter::seeded(h.finish())
    }

    /// The next number, uniform in `[0, 1)`.
    fn next_unit(&self) -> f64 {
        let mut z = self.state.fetch_add(GOLDEN_GAMMA, Ordering::Relaxed).wrapping_add(GOLDEN_GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // The top 53 bits, as a double's mantissa holds them.
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The retry policy of one shard's calls: the transport's limits and a source of jitter.
#[derive(Debug)]
pub(crate) struct Retry {
    transport: TransportConfig,
    jitter: Jitter,
}

impl Retry {
    pub(crate) fn new(transport: &TransportConfig, jitter: Jitter) -> Retry {
        Retry { transport: transport.clone(), jitter }
    }

    /// The delay before retry number `attempt` (0-based): uniform in
    /// `[0, transport.backoff(attempt)]`, so never above `max_backoff`.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        self.transport.backoff(attempt).mul_f64(self.jitter.next_unit())
    }

    /// How long to wait before trying again after `status`, the failure of retry number
    /// `attempt` (0: the first try); `None`: do not.
    fn next_delay(&self, attempt: u32, status: &Status) -> Option<Duration> {
        if !transient(status) || attempt >= self.transport.max_retries {
            return None;
        }
        Some(self.delay(attempt))
    }

    /// The tries of one call, for a caller that drives the loop itself (a try that borrows
    /// the caller's buffers): `loop { match try().await { Ok(v) => break v, Err(e) =>
    /// tries.failed(e).await? } }`. `shard` and `rpc` name the call in the log.
    pub(crate) fn tries(&self, shard: usize, rpc: &'static str) -> Tries<'_> {
        Tries { retry: self, shard, rpc, attempt: 0 }
    }

    /// Runs `call` until it succeeds, fails for good, or runs out of retries; returns the
    /// last failure. `shard` and `rpc` name the call in the log.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        shard: usize,
        rpc: &'static str,
        mut call: F,
    ) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let mut tries = self.tries(shard, rpc);
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) => tries.failed(e).await?,
            }
        }
    }
}

/// The tries of one call so far (see [`Retry::tries`]).
pub(crate) struct Tries<'a> {
    retry: &'a Retry,
    shard: usize,
    rpc: &'static str,
    /// Retries so far.
    attempt: u32,
}

impl Tries<'_> {
    /// After a failed try: waits before the next one and returns `Ok`, or returns the failure
    /// when it is not worth another try or the retries are used up.
    pub(crate) async fn failed(&mut self, e: CallError) -> Result<(), CallError> {
        let CallError::Status(status) = &e else { return Err(e) };
        let Some(delay) = self.retry.next_delay(self.attempt, status) else { return Err(e) };
        let (shard, rpc, attempt) = (self.shard, self.rpc, self.attempt);
        warn!(shard, rpc, attempt, ?delay, "transient error, retrying: {}", status.message());
        self.attempt += 1;
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(seed: u64, transport: TransportConfig) -> Retry {
        Retry::new(&transport, Jitter::seeded(seed))
    }

    #[test]
    fn delays_are_drawn_below_a_doubling_bound_capped_by_max_backoff() {
        let t = TransportConfig::default();
        let r = retry(7, t.clone());
        let mut low = [false; 12];
        let mut high = [false; 12];
        for _ in 0..200 {
            for (attempt, (low, high)) in low.iter_mut().zip(&mut high).enumerate() {
                let bound = t.backoff(attempt as u32);
                let d = r.delay(attempt as u32);
                assert!(d <= bound && d <= t.max_backoff, "attempt {attempt}: {d:?} above {bound:?}");
                *low |= d < bound / 4;
                *high |= d > bound * 3 / 4;
            }
        }
        // Spread over the whole range, not clustered at the bound: that is the point.
        assert!(low.iter().chain(&high).all(|&x| x), "low {low:?} high {high:?}");
    }

    #[test]
    fn the_same_seed_draws_the_same_delays_and_another_seed_others() {
        let t = TransportConfig::default();
        let draw = |seed| (0..8).map(|a| retry(seed, t.clone()).delay(a)).collect::<Vec<_>>();
        let (a, b) = (retry(1, t.clone()), retry(1, t.clone()));
        assert_eq!(
            (0..8).map(|n| a.delay(n)).collect::<Vec<_>>(),
            (0..8).map(|n| b.delay(n)).collect::<Vec<_>>()
        );
        assert_ne!(draw(1), draw(2));
        let u = Jitter::seeded(0);
        assert!((0..10_000).map(|_| u.next_unit()).all(|x| (0.0..1.0).contains(&x)));
    }

    #[test]
    fn only_transient_failures_are_retried_and_shutting_down_is_not() {
        assert!(transient(&Status::unavailable("connection refused")));
        assert!(transient(&Status::unknown("h2 protocol error")));
        assert!(transient(&Status::cancelled("reset")));
        assert!(!transient(&Status::failed_precondition("stale")));
        let mut stopping = Status::unavailable("server is shutting down");
        assert!(transient(&stopping), "the message alone says nothing");
        refusal::set_code(&mut stopping, RefusalCode::ShuttingDown);
        assert!(!transient(&stopping));
    }

    /// Counts the tries of a call that fails with `status` every time.
    async fn tries(status: Status) -> (u32, CallError) {
        // Tiny bounds: the count, not the time, is what is tested.
        let t = TransportConfig {
            max_retries: 5,
            initial_backoff: Duration::from_micros(1),
            max_backoff: Duration::from_micros(4),
            ..Default::default()
        };
        let r = retry(3, t);
        let mut n = 0;
        let e = r
            .run(0, "Test", || {
                n += 1;
                let status = status.clone();
                async move { Err::<(), _>(status.into()) }
            })
            .await
            .unwrap_err();
        (n, e)
    }

    #[tokio::test]
    async fn the_loop_retries_max_retries_times_then_returns_the_last_failure() {
        let (n, e) = tries(Status::unavailable("down")).await;
        assert_eq!(n, 6, "the first try and 5 retries");
        assert!(matches!(e, CallError::Status(s) if s.code() == Code::Unavailable));
        assert_eq!(tries(Status::invalid_argument("bad")).await.0, 1);
        let mut stopping = Status::unavailable("going away");
        refusal::set_code(&mut stopping, RefusalCode::ShuttingDown);
        assert_eq!(tries(stopping).await.0, 1);
    }

    #[tokio::test]
    async fn the_loop_stops_at_success_and_never_retries_a_protocol_error() {
        let r = retry(4, TransportConfig { initial_backoff: Duration::ZERO, ..Default::default() });
        let mut n = 0;
        let v = r
            .run(0, "Test", || {
                n += 1;
                let n = n;
                async move { if n < 3 { Err(Status::unavailable("not yet").into()) } else { Ok(n) } }
            })
            .await
            .unwrap();
        assert_eq!(v, 3);
        let mut n = 0;
        let e = r
            .run(0, "Test", || {
                n += 1;
                async { Err::<(), _>(CallError::Protocol("unrequested piece".into())) }
            })
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::Protocol(_)) && n == 1);
    }
}
