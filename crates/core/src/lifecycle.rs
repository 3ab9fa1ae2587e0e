//! Lifecycle policies as a spawn states them: restarts with backoff, runtime and startup
//! limits, what a child does when its parent ends; and the restart decision itself. The
//! machine (`machine.rs`) applies them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state::Exit;
use crate::state::StopReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    #[default]
    Never,
    /// A non-zero exit, a signal agentd did not send, a failed start, a startup timeout or a
    /// health check whose action is restart.
    OnFailure,
    /// Any end that was not a stop a client asked for.
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParentExit {
    #[default]
    Keep,
    Stop,
}

/// Exponential backoff between restarts, with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// A run at least this long resets the backoff.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            multiplier: 2.0,
            reset_after: Duration::from_secs(60),
        }
    }
}

/// Up to this share of a delay is added or taken off at random, so agents that failed
/// together do not all restart at the same instant.
const JITTER: f64 = 0.1;

impl Backoff {
    /// The wait before the restart that follows `failures` consecutive short runs (0: the
    /// first), before jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = self.multiplier.powi(failures.min(64) as i32);
        let seconds = (self.initial.as_secs_f64() * factor).min(self.max.as_secs_f64());
        Duration::from_secs_f64(seconds)
    }

    /// The delay with `jitter` (a draw in [-1, 1]) applied.
    pub(crate) fn jittered(&self, failures: u32, jitter: f64) -> Duration {
        self.delay(failures)
            .mul_f64(1.0 + JITTER * jitter.clamp(-1.0, 1.0))
    }
}

/// A spawn's lifecycle policies.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LifecyclePolicy {
    pub restart: RestartPolicy,
    pub backoff: Backoff,
    /// `None`: no limit.
    pub max_restarts: Option<u32>,
    pub max_runtime: Option<Duration>,
    pub startup_timeout: Option<Duration>,
    pub on_parent_exit: ParentExit,
}

const MAX_LIMIT: Duration = Duration::from_secs(365 * 24 * 3600);

impl LifecyclePolicy {
    pub(crate) fn validate(self, has_heartbeat: bool) -> Result<LifecyclePolicy> {
        let invalid = |field: &'static str, problem: String| Err(Error::Invalid { field, problem });
        let backoff = self.backoff;
        if backoff.initial.is_zero() || backoff.initial > backoff.max || backoff.max > MAX_LIMIT {
            return invalid(
                "restart_backoff",
                format!(
                    "initial {:?} must be above zero and at most max {:?} (at most a year)",
                    backoff.initial, backoff.max
                ),
            );
        }
        if !(backoff.multiplier.is_finite() && (1.0..=100.0).contains(&backoff.multiplier)) {
            return invalid(
                "restart_backoff.multiplier",
                format!("{} must be between 1 and 100", backoff.multiplier),
            );
        }
        for (field, limit) in [
            ("max_runtime", self.max_runtime),
            ("startup_timeout", self.startup_timeout),
        ] {
            if let Some(limit) = limit
                && (limit.is_zero() || limit > MAX_LIMIT)
            {
                return invalid(
                    field,
                    format!("{limit:?} must be above zero and at most a year"),
                );
            }
        }
        if self.startup_timeout.is_some() && !has_heartbeat {
            return invalid(
                "startup_timeout",
                "needs health_policy.heartbeat_timeout: the first heartbeat is what it waits for"
                    .into(),
            );
        }
        Ok(self)
    }
}

/// How a run ended, for the restart decision.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RunEnd {
    /// The leader exited on its own (`None`: how could not be learned).
    Exited(Option<Exit>),
    /// The run was stopped, for this reason.
    Stopped(StopReason),
    /// The process could not be started again.
    FailedToStart,
    /// The process was gone when agentd restarted.
    Lost,
}

pub(crate) fn wants_restart(policy: RestartPolicy, end: &RunEnd) -> bool {
    let on_failure = policy != RestartPolicy::Never;
    match end {
        RunEnd::Stopped(reason) if reason.client_asked() => false,
        RunEnd::Stopped(StopReason::ParentExited | StopReason::Health | StopReason::Budget) => {
            false
        }
        RunEnd::Stopped(StopReason::MaxRuntime) => policy == RestartPolicy::Always,
        RunEnd::Stopped(_) | RunEnd::FailedToStart | RunEnd::Lost => on_failure,
        RunEnd::Exited(Some(Exit::Code(0))) => policy == RestartPolicy::Always,
        RunEnd::Exited(_) => on_failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_the_multiplier_up_to_the_max() {
        let backoff = Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            reset_after: Duration::from_secs(60),
        };
        let delays: Vec<u128> = (0..5).map(|n| backoff.delay(n).as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1000, 1000]);
        for n in 0..20 {
            let plain = backoff.delay(n).as_secs_f64();
            for jitter in [-1.0, -0.3, 0.0, 0.7, 1.0, 5.0] {
                let jittered = backoff.jittered(n, jitter).as_secs_f64();
                assert!((plain * 0.9 - 1e-9..=plain * 1.1 + 1e-9).contains(&jittered));
            }
        }
    }

    #[test]
    fn restart_decisions_follow_the_policy() {
        use RestartPolicy::*;
        let crash = RunEnd::Exited(Some(Exit::Code(1)));
        let clean = RunEnd::Exited(Some(Exit::Code(0)));
        let asked = RunEnd::Stopped(StopReason::Requested);
        let timeout = RunEnd::Stopped(StopReason::MaxRuntime);
        let stalled = RunEnd::Stopped(StopReason::HealthRestart);
        assert!(!wants_restart(Never, &crash));
        assert!(wants_restart(OnFailure, &crash) && wants_restart(Always, &crash));
        assert!(!wants_restart(OnFailure, &clean) && wants_restart(Always, &clean));
        assert!(!wants_restart(Always, &asked));
        assert!(!wants_restart(OnFailure, &timeout) && wants_restart(Always, &timeout));
        assert!(wants_restart(OnFailure, &stalled));
        assert!(wants_restart(OnFailure, &RunEnd::FailedToStart));
        // An end that could not be learned is not a success.
        assert!(wants_restart(OnFailure, &RunEnd::Exited(None)));
        assert!(!wants_restart(Never, &RunEnd::Lost));
    }
}
