//! Health that means something for agents: a heartbeat that must keep coming (agents hang
//! on network calls) and memory and CPU thresholds over the whole process tree (agents leak
//! and spin). A failed check sets the agent's health with a reason, emits an event with the
//! measurement, and, when the policy says so, stops the agent.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::agent::AgentStatus;
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::stop::StopReason;
use crate::supervisor::SupervisorTask;

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
    fn validate(&self) -> Result<()> {
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

impl SupervisorTask {
    /// A heartbeat from the ReportProgress RPC.
    pub(crate) fn report_progress(&mut self, report: ProgressReport) -> Result<AgentStatus> {
        report.validate()?;
        let agent = self
            .agents
            .get_mut(&report.agent_id)
            .ok_or_else(|| Error::NotFound {
                id: report.agent_id.clone(),
            })?;
        if !agent.leader_alive {
            return Err(Error::NotRunning {
                id: report.agent_id,
                state: agent.record.state,
            });
        }
        let record = &mut agent.record;
        let carries_progress =
            report.progress.is_some() || !report.message.is_empty() || !report.details.is_empty();
        let changed = carries_progress
            && (report.progress.is_some_and(|p| p != record.progress)
                || report.message != record.progress_message
                || report.details != record.progress_details);
        if carries_progress {
            record.progress = report.progress.unwrap_or(record.progress);
            record.progress_message = report.message;
            record.progress_details = report.details;
        }
        self.on_heartbeat(&report.agent_id, changed);
        self.agent(&report.agent_id).map(|agent| agent.status())
    }

    /// Records a heartbeat (and new progress when `progress_changed`), clearing a stall.
    pub(crate) fn on_heartbeat(&mut self, agent_id: &str, progress_changed: bool) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        agent.record.last_heartbeat = Some(SystemTime::now());
        let record = agent.record.clone();
        self.persist(&record);
        if progress_changed {
            self.emit(agent_id, EventKind::Progress, String::new());
        }
        self.clear_issue(agent_id, HealthMetric::Heartbeat, "heartbeat resumed");
    }

    /// Runs every check of a live agent; called once per sampling interval.
    pub(crate) fn check_health(&mut self, agent_id: &str) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        if !agent.leader_alive || agent.stop.is_some() {
            return;
        }
        let policy = agent.record.spec.health_policy.clone();
        let sample = agent.sample.clone();
        // Until the first heartbeat, a startup timeout (if any) is the limit that applies.
        let starting = agent.record.last_heartbeat.is_none()
            && agent.record.spec.lifecycle.startup_timeout.is_some();
        if let Some(timeout) = policy.heartbeat_timeout.filter(|_| !starting) {
            let since = agent.record.last_heartbeat.or(agent.record.started_at);
            let silent = since
                .and_then(|since| SystemTime::now().duration_since(since).ok())
                .unwrap_or_default();
            if silent > timeout {
                let reason = format!(
                    "no heartbeat for {:.1}s (timeout {:.1}s)",
                    silent.as_secs_f64(),
                    timeout.as_secs_f64()
                );
                let alert = Alert {
                    metric: HealthMetric::Heartbeat,
                    value: silent.as_secs_f64(),
                    threshold: timeout.as_secs_f64(),
                    action: policy.on_stall,
                };
                self.raise_issue(agent_id, alert, reason);
            }
        }
        let Some(sample) = sample else { return };
        if let Some(limit) = policy.memory_limit_mb {
            let memory_mb = sample.memory_bytes as f64 / (1024.0 * 1024.0);
            if memory_mb > limit {
                let reason = format!("memory {memory_mb:.1} MB is over the {limit} MB limit");
                let alert = Alert {
                    metric: HealthMetric::MemoryMb,
                    value: memory_mb,
                    threshold: limit,
                    action: policy.on_memory_limit,
                };
                self.raise_issue(agent_id, alert, reason);
            } else {
                self.clear_issue(
                    agent_id,
                    HealthMetric::MemoryMb,
                    "memory back under its limit",
                );
            }
        }
        if let Some(limit) = policy.cpu_limit_percent {
            let Some(agent) = self.agents.get_mut(agent_id) else {
                return;
            };
            if sample.cpu_percent > limit {
                agent.cpu_samples_over += 1;
            } else {
                agent.cpu_samples_over = 0;
            }
            if agent.cpu_samples_over >= policy.cpu_limit_samples {
                let reason = format!(
                    "CPU {:.0}% over the {limit}% limit for {} samples",
                    sample.cpu_percent, agent.cpu_samples_over
                );
                let alert = Alert {
                    metric: HealthMetric::CpuPercent,
                    value: sample.cpu_percent,
                    threshold: limit,
                    action: policy.on_cpu_limit,
                };
                self.raise_issue(agent_id, alert, reason);
            } else if agent.cpu_samples_over == 0 {
                self.clear_issue(
                    agent_id,
                    HealthMetric::CpuPercent,
                    "CPU back under its limit",
                );
            }
        }
    }

    /// Records a failed check once (until it clears), emits its event and acts on it.
    fn raise_issue(&mut self, agent_id: &str, alert: Alert, reason: String) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        let issues = &mut agent.record.health_issues;
        if issues.iter().any(|issue| issue.metric == alert.metric) {
            return;
        }
        issues.push(HealthIssue {
            metric: alert.metric,
            reason: reason.clone(),
            since: SystemTime::now(),
        });
        let stop_reason = match alert.action {
            HealthAction::Report => None,
            HealthAction::Stop => Some(StopReason::Health),
            HealthAction::Restart => Some(StopReason::HealthRestart),
        };
        if stop_reason.is_some() {
            agent.record.error = Some(format!("stopped by agentd: {reason}"));
        }
        let record = agent.record.clone();
        self.persist(&record);
        tracing::warn!(%agent_id, ?alert, "{reason}");
        let kind = match alert.metric {
            HealthMetric::Heartbeat => EventKind::Stalled,
            HealthMetric::MemoryMb | HealthMetric::CpuPercent => EventKind::Alert,
        };
        self.emit_alert(agent_id, kind, reason, alert);
        if let Some(stop_reason) = stop_reason {
            // Nobody waits for this stop; its events say how it went.
            drop(self.begin_stop(agent_id, false, stop_reason));
        }
    }

    fn clear_issue(&mut self, agent_id: &str, metric: HealthMetric, message: &str) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        let issues = &mut agent.record.health_issues;
        let before = issues.len();
        issues.retain(|issue| issue.metric != metric);
        if issues.len() == before {
            return;
        }
        let record = agent.record.clone();
        self.persist(&record);
        self.emit(agent_id, EventKind::Recovered, message.to_string());
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
