//! Capped, jittered exponential backoff for the engine's retry loops (recording outcomes,
//! reconnecting the listener, follow-ups).
//!
//! Each wait is drawn from the upper half of the current step (`step/2 ..= step`), and the
//! step doubles up to a named maximum. The jitter keeps nodes that failed together (a database
//! restart) from retrying in lockstep; the lower bound keeps the wait from collapsing to zero.

use std::time::Duration;

/// A capped exponential backoff with jitter.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    /// Starts at `initial`, doubling up to `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self::with_rng(initial, max, fastrand::Rng::new())
    }

    /// Like [`Backoff::new`], with the jitter drawn from `rng` (tests, simulations).
    pub(crate) fn with_rng(initial: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        let initial = initial.min(max);
        Backoff {
            initial,
            max,
            step: initial,
            rng,
        }
    }

    /// The wait before the next retry; the following one is longer, up to the maximum.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let step_ms = u64::try_from(self.step.as_millis()).unwrap_or(u64::MAX);
        let half = step_ms / 2;
        let wait = Duration::from_millis(half + self.rng.u64(0..=step_ms - half));
        self.step = self.step.saturating_mul(2).min(self.max);
        wait
    }

    /// Back to the initial step (the operation succeeded, or a connection stayed up).
    pub(crate) fn reset(&mut self) {
        self.step = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_in_the_upper_half() {
        let ms = Duration::from_millis;
        let mut b = Backoff::with_rng(ms(100), ms(1_000), fastrand::Rng::with_seed(3));
        let mut steps = Vec::new();
        for _ in 0..8 {
            steps.push(b.next_wait());
        }
        let expected = [100, 200, 400, 800, 1_000, 1_000, 1_000, 1_000];
        for (w, step) in steps.iter().zip(expected) {
            assert!(
                *w >= ms(step / 2) && *w <= ms(step),
                "{w:?} for step {step}"
            );
        }
        b.reset();
        assert!(b.next_wait() <= ms(100));
    }

    #[test]
    fn the_same_seed_gives_the_same_waits() {
        let ms = Duration::from_millis;
        let waits = |seed| {
            let mut b = Backoff::with_rng(ms(50), ms(5_000), fastrand::Rng::with_seed(seed));
            (0..10).map(|_| b.next_wait()).collect::<Vec<_>>()
        };
        assert_eq!(waits(9), waits(9));
        assert_ne!(waits(9), waits(10));
    }
}
