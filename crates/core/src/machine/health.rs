//! Heartbeats, samples and the health checks they feed: an issue is raised once, acted on
//! by its policy's action, and cleared when the measurement comes back under its limit.

use crate::agent::AgentRecord;
use crate::events::EventKind;
use crate::health::{Alert, HealthAction, HealthIssue, HealthMetric};
use crate::state::{StopReason, TreeSample};

use super::{AgentMachine, Effect, Now, Phase};

impl AgentMachine {
    /// A heartbeat: `update` writes any progress it carries into the record and says whether
    /// it changed. Only for a live leader (the caller checks).
    pub fn heartbeat(
        &mut self,
        now: Now,
        update: impl FnOnce(&mut AgentRecord) -> bool,
        out: &mut Vec<Effect>,
    ) {
        if !self.leader_alive() {
            return;
        }
        let changed = update(&mut self.record);
        self.record.last_heartbeat = Some(now.wall);
        self.run.last_heartbeat = Some(now.mono);
        out.push(Effect::Persist);
        if changed {
            self.emit(out, EventKind::Progress, String::new());
        }
        self.clear_issue(HealthMetric::Heartbeat, "heartbeat resumed", out);
    }

    /// A health sample of the agent's process tree.
    pub fn sampled(&mut self, sample: TreeSample, out: &mut Vec<Effect>) {
        if self.leader_alive() {
            // Kept in the record (written with its next change, at the latest when the run
            // ends), not persisted for each sample.
            let record = &mut self.record;
            record.peak_memory_bytes = record.peak_memory_bytes.max(sample.memory_bytes);
            record.cpu_seconds = record.cpu_seconds.max(sample.cpu_seconds);
            self.sample = Some(sample);
            self.emit(out, EventKind::Health, String::new());
        }
    }

    /// Figures no sample carries changed (spend, egress counts, denials): told as a HEALTH
    /// event, running or not (a tree's spend grows while its root backs off or has ended).
    pub fn figures_moved(&self, out: &mut Vec<Effect>) {
        self.emit(out, EventKind::Health, String::new());
    }

    /// Runs every health check of a running agent; once per sampling interval.
    pub fn check_health(&mut self, now: Now, out: &mut Vec<Effect>) {
        if self.phase != Phase::Running {
            return;
        }
        let policy = self.record.spec.health_policy.clone();
        // Until the first heartbeat, a startup timeout (if any) is the limit that applies.
        let awaiting_first = self.run.last_heartbeat.is_none()
            && self.record.spec.lifecycle.startup_timeout.is_some();
        if let Some(timeout) = policy.heartbeat_timeout.filter(|_| !awaiting_first) {
            let since = self.run.last_heartbeat.unwrap_or(self.run.quiet_since);
            let silent = now.mono.saturating_duration_since(since);
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
                self.raise_issue(now, alert, reason, out);
            }
        }
        let Some(sample) = self.sample.clone() else {
            return;
        };
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
                self.raise_issue(now, alert, reason, out);
            } else {
                self.clear_issue(HealthMetric::MemoryMb, "memory back under its limit", out);
            }
        }
        if let Some(limit) = policy.cpu_limit_percent
            && self.phase == Phase::Running
        {
            let over = &mut self.run.cpu_samples_over;
            *over = if sample.cpu_percent > limit {
                *over + 1
            } else {
                0
            };
            let over = *over;
            if over >= policy.cpu_limit_samples {
                let reason = format!(
                    "CPU {:.0}% over the {limit}% limit for {over} samples",
                    sample.cpu_percent
                );
                let alert = Alert {
                    metric: HealthMetric::CpuPercent,
                    value: sample.cpu_percent,
                    threshold: limit,
                    action: policy.on_cpu_limit,
                };
                self.raise_issue(now, alert, reason, out);
            } else if over == 0 {
                self.clear_issue(HealthMetric::CpuPercent, "CPU back under its limit", out);
            }
        }
    }

    /// Records a failed check once (until it clears), emits its event and acts on it.
    pub(super) fn raise_issue(
        &mut self,
        now: Now,
        alert: Alert,
        reason: String,
        out: &mut Vec<Effect>,
    ) {
        let issues = &mut self.record.health_issues;
        if issues.iter().any(|issue| issue.metric == alert.metric) {
            return;
        }
        issues.push(HealthIssue {
            metric: alert.metric,
            reason: reason.clone(),
            since: now.wall,
        });
        let stop_reason = match alert.action {
            HealthAction::Report => None,
            HealthAction::Stop => Some(StopReason::Health),
            HealthAction::Restart => Some(StopReason::HealthRestart),
        };
        if stop_reason.is_some() {
            self.record.error = Some(format!("stopped by agentd: {reason}"));
        }
        out.push(Effect::Persist);
        let kind = match alert.metric {
            HealthMetric::Heartbeat => EventKind::Stalled,
            HealthMetric::MemoryMb | HealthMetric::CpuPercent => EventKind::Alert,
        };
        out.push(Effect::Emit {
            kind,
            message: reason,
            alert: Some(alert),
        });
        if let Some(stop_reason) = stop_reason {
            self.stop(now, false, stop_reason, out);
        }
    }

    pub(super) fn clear_issue(
        &mut self,
        metric: HealthMetric,
        message: &str,
        out: &mut Vec<Effect>,
    ) {
        let issues = &mut self.record.health_issues;
        let before = issues.len();
        issues.retain(|issue| issue.metric != metric);
        if issues.len() != before {
            out.push(Effect::Persist);
            self.emit(out, EventKind::Recovered, message.to_string());
        }
    }
}
