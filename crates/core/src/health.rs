//! Health that means something for agents: a heartbeat that must keep coming (agents hang
//! on network calls) and memory and CPU thresholds over the whole process tree (agents leak
//! and spin). A failed check sets the agent's health with a reason, emits an event with the
//! measurement, and, when the policy says so, stops the agent. The checks themselves run in
//! the machine (`machine.rs`); here are the policies and the reports agents send.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What agentd does when a check fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthAction {
    /// Set the health and emit an event.
    #[default]
    Report,
    /// Also stop the agent with its ladder.
    Stop,
    /// Stop it and let the restart policy start it again.
    Restart,
}

/// One agent's checks beyond being alive. `None` limits are off.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthPolicy {
    pub heartbeat_timeout: Option<Duration>,
    pub on_stall: HealthAction,
    pub memory_limit_mb: Option<f64>,
    pub on_memory_limit: HealthAction,
    pub cpu_limit_percent: Option<f64>,
    /// Consecutive samples over the CPU limit that count as crossing it.
    pub cpu_limit_samples: u32,
    pub on_cpu_limit: HealthAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthMetric {
    /// Seconds since the last heartbeat.
    Heartbeat,
    MemoryMb,
    CpuPercent,
}

/// A failed check that still holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthIssue {
    pub metric: HealthMetric,
    pub reason: String,
    pub since: SystemTime,
}

/// The measurement behind a STALLED or ALERT event.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub metric: HealthMetric,
    pub value: f64,
    pub threshold: f64,
    pub action: HealthAction,
}

/// An agent's heartbeat, with optional progress.
#[derive(Debug, Clone, Default)]
pub struct ProgressReport {
    pub agent_id: String,
    /// `None`: a plain heartbeat that keeps the last progress.
    pub progress: Option<f64>,
    pub message: String,
    pub details: BTreeMap<String, String>,
}

/// Limits on what a report may carry.
pub const REPORT_MESSAGE_BYTES: usize = 4 * 1024;
pub const REPORT_DETAILS: usize = 64;
pub const REPORT_DETAILS_BYTES: usize = 16 * 1024;
/// The CPU limit's sample count when the policy gives none.
const DEFAULT_CPU_SAMPLES: u32 = 3;
const MAX_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

fn invalid<T>(field: &'static str, problem: String) -> Result<T> {
    Err(Error::Invalid { field, problem })
}

impl HealthPolicy {
    pub(crate) fn validate(mut self) -> Result<HealthPolicy> {
        if let Some(timeout) = self.heartbeat_timeout
            && (timeout.is_zero() || timeout > MAX_HEARTBEAT_TIMEOUT)
        {
            return invalid(
                "health_policy.heartbeat_timeout",
                format!("{timeout:?} must be above zero and at most a day"),
            );
        }
        for (field, limit) in [
            ("health_policy.memory_limit_mb", self.memory_limit_mb),
            ("health_policy.cpu_limit_percent", self.cpu_limit_percent),
        ] {
            if let Some(limit) = limit
                && !(limit.is_finite() && limit > 0.0)
            {
                return invalid(
                    field,
                    format!("{limit} must be a positive number, or 0 for none"),
                );
            }
        }
        if self.cpu_limit_samples == 0 {
            self.cpu_limit_samples = DEFAULT_CPU_SAMPLES;
        }
        if self.cpu_limit_samples > 1000 {
            return invalid(
                "health_policy.cpu_limit_samples",
                format!("{} is over the limit of 1000", self.cpu_limit_samples),
            );
        }
        Ok(self)
    }
}

impl ProgressReport {
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(progress) = self.progress
            && !(0.0..=100.0).contains(&progress)
        {
            return invalid(
                "progress",
                format!("must be between 0 and 100, got {progress}"),
            );
        }
        if self.message.len() > REPORT_MESSAGE_BYTES {
            return invalid(
                "message",
                format!(
                    "{} bytes is over the limit of {REPORT_MESSAGE_BYTES}",
                    self.message.len()
                ),
            );
        }
        let bytes: usize = self.details.iter().map(|(k, v)| k.len() + v.len()).sum();
        if self.details.len() > REPORT_DETAILS || bytes > REPORT_DETAILS_BYTES {
            return invalid(
                "details",
                format!(
                    "{} entries and {bytes} bytes is over the limit of {REPORT_DETAILS} entries \
                     and {REPORT_DETAILS_BYTES} bytes",
                    self.details.len()
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_or_out_of_range_reports_are_refused() {
        let ok = ProgressReport {
            agent_id: "a".into(),
            progress: Some(50.0),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let bad = [
            ProgressReport {
                progress: Some(100.5),
                ..ok.clone()
            },
            ProgressReport {
                progress: Some(f64::NAN),
                ..ok.clone()
            },
            ProgressReport {
                message: "x".repeat(REPORT_MESSAGE_BYTES + 1),
                ..ok.clone()
            },
            ProgressReport {
                details: (0..65).map(|i| (i.to_string(), String::new())).collect(),
                ..ok.clone()
            },
        ];
        for report in bad {
            assert!(report.validate().is_err(), "{report:?} was accepted");
        }
    }

    #[test]
    fn policies_are_checked_and_default_the_cpu_window() {
        let policy = HealthPolicy {
            cpu_limit_percent: Some(90.0),
            ..Default::default()
        };
        assert_eq!(policy.validate().expect("valid").cpu_limit_samples, 3);
        let zero = HealthPolicy {
            heartbeat_timeout: Some(Duration::ZERO),
            ..Default::default()
        };
        assert!(zero.validate().is_err());
        let negative = HealthPolicy {
            memory_limit_mb: Some(-1.0),
            ..Default::default()
        };
        assert!(negative.validate().is_err());
    }
}
