//! The supervisor's time, injected: the system's in the daemon, a hand-moved one in the
//! driver's unit tests (where deadlines pass when the test says so).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Instant, SystemTime};

pub(crate) trait Clock: Send + Sync {
    /// Every duration and deadline.
    fn mono(&self) -> Instant;
    /// Timestamps shown to people.
    fn wall(&self) -> SystemTime;
    /// A random draw in [-1, 1] (backoff jitter).
    fn jitter(&self) -> f64;
}

pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn mono(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }

    fn jitter(&self) -> f64 {
        // Each `RandomState` is keyed afresh: its hash of nothing is a random draw.
        let unit = (RandomState::new().build_hasher().finish() >> 11) as f64 / (1u64 << 53) as f64;
        2.0 * unit - 1.0
    }
}

/// A clock that moves only when told to, with no jitter.
#[cfg(test)]
pub(crate) struct FakeClock {
    start: (Instant, SystemTime),
    elapsed: std::sync::Mutex<std::time::Duration>,
}

#[cfg(test)]
impl FakeClock {
    pub fn new() -> FakeClock {
        FakeClock {
            start: (
                Instant::now(),
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30),
            ),
            elapsed: std::sync::Mutex::default(),
        }
    }

    pub fn advance(&self, by: std::time::Duration) {
        *self.elapsed.lock().unwrap_or_else(|e| e.into_inner()) += by;
    }

    fn elapsed(&self) -> std::time::Duration {
        *self.elapsed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
impl Clock for FakeClock {
    fn mono(&self) -> Instant {
        self.start.0 + self.elapsed()
    }

    fn wall(&self) -> SystemTime {
        self.start.1 + self.elapsed()
    }

    fn jitter(&self) -> f64 {
        0.0
    }
}
