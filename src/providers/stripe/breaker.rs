//! A circuit breaker: when the provider keeps failing, callers get an
//! immediate "unavailable, retry after N seconds" instead of each waiting out
//! its own timeouts and retries, which would pile requests up behind a dead
//! dependency. After a cool-down one trial call is let through; its success
//! closes the breaker, its failure opens it again.
//!
//! Written here rather than taken from a crate: the state machine is a few
//! dozen lines, and the crates that offer one (failsafe, recloser) either
//! wrap the future themselves, which hides the per-attempt outcome we
//! classify (a 402 is a healthy provider), or pull in their own runtime
//! abstractions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One trial call is (or may be) in flight; everyone else waits.
    HalfOpen {
        trial_in_flight: bool,
    },
}

/// What a breaker reports, for the `provider_circuit_breaker_state` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

#[derive(Debug)]
pub struct CircuitBreaker {
    provider: &'static str,
    failure_threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

/// Permission to make one call. Report its outcome with [`Permit::record`];
/// a permit dropped unreported (the caller was cancelled) frees a half-open
/// breaker for the next trial instead of wedging it.
#[must_use]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    trial: bool,
    recorded: bool,
}

impl Permit<'_> {
    /// `healthy`: the provider answered as a working provider does (any 2xx
    /// or a 4xx about the request itself).
    pub fn record(mut self, healthy: bool) {
        self.recorded = true;
        self.breaker.record(healthy);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.trial && !self.recorded {
            let mut state = self.breaker.lock();
            if matches!(*state, State::HalfOpen { .. }) {
                *state = State::HalfOpen { trial_in_flight: false };
            }
        }
    }
}

impl CircuitBreaker {
    pub fn new(provider: &'static str, failure_threshold: u32, cooldown: Duration) -> Self {
        let breaker = CircuitBreaker {
            provider,
            failure_threshold: failure_threshold.max(1),
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        };
        breaker.publish(BreakerState::Closed);
        breaker
    }

    /// The breaker for `key` (provider and API base), created on first use:
    /// every client built for the same provider in this process shares it, so
    /// the API handlers, the workers and the reconcile job all see one state.
    /// The first caller's thresholds win.
    pub fn shared(
        key: &str,
        provider: &'static str,
        failure_threshold: u32,
        cooldown: Duration,
    ) -> Arc<Self> {
        static BREAKERS: OnceLock<Mutex<HashMap<String, Arc<CircuitBreaker>>>> = OnceLock::new();
        let mut all = BREAKERS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        all.entry(key.to_owned())
            .or_insert_with(|| Arc::new(CircuitBreaker::new(provider, failure_threshold, cooldown)))
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A permit to call, or how long until the breaker may let a call through.
    pub fn acquire(&self) -> Result<Permit<'_>, Duration> {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Ok(Permit { breaker: self, trial: false, recorded: false }),
            State::Open { until } => {
                let now = Instant::now();
                if now < until {
                    return Err(until - now);
                }
                *state = State::HalfOpen { trial_in_flight: true };
                self.publish(BreakerState::HalfOpen);
                tracing::info!(provider = self.provider, "circuit breaker half-open: trying one call");
                Ok(Permit { breaker: self, trial: true, recorded: false })
            }
            State::HalfOpen { trial_in_flight: true } => Err(Duration::from_secs(1)),
            State::HalfOpen { trial_in_flight: false } => {
                *state = State::HalfOpen { trial_in_flight: true };
                Ok(Permit { breaker: self, trial: true, recorded: false })
            }
        }
    }

    fn record(&self, healthy: bool) {
        let mut state = self.lock();
        let next = match (*state, healthy) {
            (State::Closed { failures: 0 }, true) => return,
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 < self.failure_threshold => {
                State::Closed { failures: failures + 1 }
            }
            // A call that started before the breaker opened and failed late
            // does not extend the cool-down.
            (State::Open { .. }, false) => return,
            (_, false) => State::Open { until: Instant::now() + self.cooldown },
        };
        let was = Self::public(*state);
        *state = next;
        let now = Self::public(next);
        if was != now {
            match now {
                BreakerState::Open => tracing::warn!(
                    provider = self.provider,
                    cooldown_seconds = self.cooldown.as_secs_f64(),
                    "circuit breaker open: calls fail at once until the cool-down ends"
                ),
                BreakerState::Closed => tracing::info!(provider = self.provider, "circuit breaker closed"),
                BreakerState::HalfOpen => {}
            }
            self.publish(now);
        }
    }

    fn public(state: State) -> BreakerState {
        match state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// How long calls will still be refused, without taking a permit: lets
    /// a caller fail fast before doing work of its own that only makes
    /// sense if the call is tried. `None`: a call would go through.
    pub fn refusing_for(&self) -> Option<Duration> {
        match *self.lock() {
            State::Open { until } => until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()),
            State::HalfOpen { trial_in_flight: true } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    pub fn state(&self) -> BreakerState {
        Self::public(*self.lock())
    }

    fn publish(&self, state: BreakerState) {
        metrics::gauge!("provider_circuit_breaker_state", "provider" => self.provider).set(state.gauge());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_repeated_failures_and_closes_after_a_good_trial() {
        let b = CircuitBreaker::new("test", 3, Duration::from_millis(30));
        for _ in 0..2 {
            b.acquire().unwrap().record(false);
        }
        assert_eq!(b.state(), BreakerState::Closed, "two failures are not enough");
        b.acquire().unwrap().record(true);
        for _ in 0..3 {
            b.acquire().unwrap().record(false);
        }
        assert_eq!(b.state(), BreakerState::Open);
        let wait = b.acquire().err().expect("open refuses at once");
        assert!(wait <= Duration::from_millis(30));

        std::thread::sleep(Duration::from_millis(35));
        let trial = b.acquire().expect("after the cool-down one trial goes through");
        assert!(b.acquire().is_err(), "only one trial at a time");
        trial.record(false);
        assert_eq!(b.state(), BreakerState::Open, "a failed trial opens it again");

        std::thread::sleep(Duration::from_millis(35));
        b.acquire().unwrap().record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.acquire().is_ok());
    }

    #[test]
    fn an_abandoned_trial_frees_the_next_one() {
        let b = CircuitBreaker::new("test", 1, Duration::from_millis(1));
        b.acquire().unwrap().record(false);
        std::thread::sleep(Duration::from_millis(2));
        drop(b.acquire().unwrap());
        assert!(b.acquire().is_ok(), "a dropped trial permit does not wedge the breaker");
    }
}
