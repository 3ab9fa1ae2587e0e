//! A provider's rate limits, shared by every agent: requests and tokens per minute as token
//! buckets, and a hold while the provider has answered 429 with `Retry-After`. Requests wait
//! in a queue per agent, and the queues take turns, so one agent's burst does not keep the
//! others waiting behind it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{Notify, oneshot};

/// Refilled continuously up to one minute's worth.
#[derive(Debug)]
struct Bucket {
    per_minute: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u64, now: Instant) -> Bucket {
        Bucket {
            per_minute: per_minute as f64,
            level: per_minute as f64,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
    }

    /// How long until `amount` (at most a minute's worth) is there.
    fn wait_for(&self, amount: f64) -> Duration {
        let missing = amount.min(self.per_minute) - self.level;
        if missing <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(missing * 60.0 / self.per_minute)
    }

    fn take(&mut self, amount: f64) {
        self.level -= amount.min(self.per_minute);
    }
}

struct Waiter {
    tokens: u64,
    go: oneshot::Sender<()>,
}

struct State {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    /// The provider said 429 with Retry-After: nobody goes before then.
    held_until: Option<Instant>,
    /// Waiting requests, a queue per agent; `turn` is the agent served last.
    queues: BTreeMap<String, VecDeque<Waiter>>,
    turn: Option<String>,
}

/// One provider's limits. Without limits and without a hold, a request goes at once.
pub struct Limits {
    state: Mutex<State>,
    changed: Notify,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits").finish_non_exhaustive()
    }
}

impl Limits {
    pub fn new(requests_per_minute: Option<u32>, tokens_per_minute: Option<u64>) -> Limits {
        let now = Instant::now();
        Limits {
            state: Mutex::new(State {
                requests: requests_per_minute.map(|n| Bucket::new(u64::from(n), now)),
                tokens: tokens_per_minute.map(|n| Bucket::new(n, now)),
                held_until: None,
                queues: BTreeMap::new(),
                turn: None,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for this request's turn and for room in the buckets, then takes its share
    /// (one request, and `tokens` at most). Dropped while waiting: it leaves the queue.
    pub async fn acquire(&self, agent_id: &str, tokens: u64) {
        let (go, turn) = oneshot::channel();
        {
            let mut state = self.lock();
            let free =
                state.requests.is_none() && state.tokens.is_none() && state.queues.is_empty();
            if free && state.held_until.is_none_or(|until| until <= Instant::now()) {
                return;
            }
            state
                .queues
                .entry(agent_id.to_string())
                .or_default()
                .push_back(Waiter { tokens, go });
        }
        self.changed.notify_one();
        // The dispatcher (`run`) grants turns; a closed channel means the gateway stopped.
        let _ = turn.await;
    }

    /// Gives tokens back that a request reserved and did not use.
    pub fn refund(&self, tokens: u64) {
        if let Some(bucket) = &mut self.lock().tokens {
            bucket.level = (bucket.level + tokens as f64).min(bucket.per_minute);
        }
        self.changed.notify_one();
    }

    /// The provider answered 429: hold every agent's requests for `retry_after`.
    pub fn hold(&self, retry_after: Duration) {
        let until = Instant::now() + retry_after;
        let mut state = self.lock();
        state.held_until = Some(state.held_until.map_or(until, |held| held.max(until)));
    }

    /// Grants turns as the limits allow, the agents' queues in rotation. Runs as long as the
    /// gateway does.
    pub async fn run(&self) {
        loop {
            let wait = self.grant();
            match wait {
                Some(wait) => {
                    let _ = tokio::time::timeout(wait, self.changed.notified()).await;
                }
                None => self.changed.notified().await,
            }
        }
    }

    /// Grants every turn that can go now; answers how long until the next could.
    fn grant(&self) -> Option<Duration> {
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            // Waiters whose request went away.
            for queue in state.queues.values_mut() {
                queue.retain(|waiter| !waiter.go.is_closed());
            }
            state.queues.retain(|_, queue| !queue.is_empty());
            let next = {
                let after = state.turn.clone().unwrap_or_default();
                state
                    .queues
                    .range::<String, _>((
                        std::ops::Bound::Excluded(&after),
                        std::ops::Bound::Unbounded,
                    ))
                    .next()
                    .or_else(|| state.queues.iter().next())
                    .map(|(agent, queue)| (agent.clone(), queue.front().map_or(0, |w| w.tokens)))
            };
            let (agent, tokens) = next?;
            if let Some(until) = state.held_until {
                if until > now {
                    return Some(until - now);
                }
                state.held_until = None;
            }
            let mut wait = Duration::ZERO;
            if let Some(bucket) = &mut state.requests {
                bucket.refill(now);
                wait = wait.max(bucket.wait_for(1.0));
            }
            if let Some(bucket) = &mut state.tokens {
                bucket.refill(now);
                wait = wait.max(bucket.wait_for(tokens as f64));
            }
            if wait > Duration::ZERO {
                return Some(wait);
            }
            if let Some(bucket) = &mut state.requests {
                bucket.take(1.0);
            }
            if let Some(bucket) = &mut state.tokens {
                bucket.take(tokens as f64);
            }
            if let Some(waiter) = state.queues.get_mut(&agent).and_then(VecDeque::pop_front) {
                let _ = waiter.go.send(());
            }
            state.turn = Some(agent);
        }
    }
}

/// `Retry-After`: seconds, or an HTTP date; at most 10 minutes.
pub fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Duration::from_secs_f64(seconds),
        Ok(_) => return None,
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value)
                .ok()?
                .timestamp();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            Duration::from_secs(u64::try_from(at).unwrap_or(0).saturating_sub(now))
        }
    };
    Some(wait.min(Duration::from_secs(600)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn the_agents_queues_take_turns_within_the_request_rate() {
        // 60 a minute: one a second once the first minute's worth is used.
        let limits = Arc::new(Limits::new(Some(60), None));
        tokio::spawn({
            let limits = limits.clone();
            async move { limits.run().await }
        });
        for _ in 0..60 {
            limits.acquire("burst", 0).await;
        }
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for (agent, n) in [("burst", 5), ("quiet", 1)] {
            for i in 0..n {
                let (limits, order) = (limits.clone(), order.clone());
                waiting.push(tokio::spawn(async move {
                    limits.acquire(agent, 0).await;
                    order.lock().unwrap().push(format!("{agent}{i}"));
                }));
                tokio::task::yield_now().await;
            }
        }
        for task in waiting {
            task.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        // The quiet agent's one request goes first or second, not after the burst's five.
        assert!(order[..2].contains(&"quiet0".to_string()), "{order:?}");
        assert_eq!(order.len(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_keeps_everyone_waiting_until_it_ends() {
        let limits = Arc::new(Limits::new(None, Some(1000)));
        tokio::spawn({
            let limits = limits.clone();
            async move { limits.run().await }
        });
        limits.hold(Duration::from_secs(5));
        let start = tokio::time::Instant::now();
        limits.acquire("a", 10).await;
        assert!(
            start.elapsed() >= Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(retry_after("99999"), Some(Duration::from_secs(600)));
        assert_eq!(retry_after("soon"), None);
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
    }
}
