//! Every conversion between the `agentd.v1` messages and the supervisor's own types, and the
//! one mapping from `agentd_core::Error` to a gRPC status.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentd_core::{
    AgentHistory, AgentState, AgentStatus, Backoff, Containment, EndReason, Error, EventKind, Exit,
    Health, HealthAction, HealthMetric, HealthPolicy, LifecyclePolicy, ListFilter, ListPage,
    ParentExit, ProgressReport, ReapReport, Resources, RestartPolicy, SpawnRequest, StopOutcome,
    StopReport, Summary,
};
use agentd_proto::v1 as pb;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

mod event;
mod sandbox;
pub(crate) mod spend;

pub use event::{event, event_figures};

/// A supervisor enum and the `agentd.v1` enum that mirrors it, variant for variant. Declared
/// once per pair with [`mirror!`], which writes both directions.
pub trait Mirror: Copy + Sized + 'static {
    type Wire: TryFrom<i32>;
    /// The proto enum's name, for errors: "is not an AgentState".
    const WIRE_NAME: &'static str;
    /// Every variant, in the order the proto declares them.
    const ALL: &'static [Self];
    fn to_wire(self) -> Self::Wire;
    /// `None` for the wire's UNSPECIFIED where it means nothing here.
    fn from_wire(wire: Self::Wire) -> Option<Self>;
}

/// A value from a request: INVALID_ARGUMENT naming `field` when it is not a value of the
/// enum, or is UNSPECIFIED where that means nothing.
pub fn from_wire<T: Mirror>(field: &str, value: i32) -> Result<T, Status> {
    T::Wire::try_from(value)
        .ok()
        .and_then(T::from_wire)
        .ok_or_else(|| {
            let article = match T::WIRE_NAME.starts_with(['A', 'E', 'I', 'O', 'U']) {
                true => "an",
                false => "a",
            };
            Status::invalid_argument(format!(
                "invalid `{field}`: {value} is not {article} {}",
                T::WIRE_NAME
            ))
        })
}

/// `mirror!(Core = pb::Wire, unspecified: WHAT, [Variant, ...])`: the variants have the same
/// names on both sides; the wire's UNSPECIFIED reads as WHAT (`None`, or a default). Both
/// matches are exhaustive, so a variant added on either side and not here does not compile.
macro_rules! mirror {
    ($core:ident = pb::$wire:ident, unspecified: $unspecified:expr, [$($variant:ident),+ $(,)?]) => {
        impl Mirror for $core {
            type Wire = pb::$wire;
            const WIRE_NAME: &'static str = stringify!($wire);
            const ALL: &'static [Self] = &[$($core::$variant),+];

            fn to_wire(self) -> pb::$wire {
                match self {
                    $($core::$variant => pb::$wire::$variant,)+
                }
            }

            // Unreachable for EndReason, whose UNSPECIFIED is a variant of its own.
            #[allow(unreachable_patterns)]
            fn from_wire(wire: pb::$wire) -> Option<Self> {
                match wire {
                    $(pb::$wire::$variant => Some($core::$variant),)+
                    pb::$wire::Unspecified => $unspecified,
                }
            }
        }
    };
}

mirror!(AgentState = pb::AgentState, unspecified: None, [
    Starting, Running, Stopping, Completed, Failed, Killed, Lost, BackingOff, TimedOut, Paused,
]);
mirror!(Health = pb::Health, unspecified: None, [
    Healthy, Zombie, Completed, Failed, Unknown, Stalled, OverLimit, Stopped,
]);
mirror!(EventKind = pb::EventKind, unspecified: None, [
    Spawned, Exited, Failed, Stopping, Killed, Health, Progress, Lost, Adopted, Snapshot,
    Stalled, Alert, Recovered, Restarting, TimedOut, Removed, Paused, Resumed, OomKilled,
    EgressDenied, SandboxUpdated, SandboxDenied, BudgetExhausted, BudgetUpdated,
]);
mirror!(EndReason = pb::EndReason, unspecified: Some(EndReason::Unspecified), [
    Unspecified, Exited, Signaled, Stopped, TimedOut, HealthAction, StartFailed, OomKilled, Lost,
    Budget,
]);
mirror!(StopOutcome = pb::StopOutcome, unspecified: None, [
    ExitedOnFirstSignal, Escalated, Killed, AlreadyExited,
]);
mirror!(RestartPolicy = pb::RestartPolicy, unspecified: Some(RestartPolicy::Never), [
    Never, OnFailure, Always,
]);
mirror!(ParentExit = pb::ParentExitPolicy, unspecified: Some(ParentExit::Keep), [Keep, Stop]);
mirror!(HealthAction = pb::HealthAction, unspecified: Some(HealthAction::Report), [
    Report, Stop, Restart,
]);
mirror!(HealthMetric = pb::HealthMetric, unspecified: None, [
    Heartbeat, MemoryMb, CpuPercent,
]);
mirror!(Containment = pb::Containment, unspecified: None, [
    CgroupV2, CgroupHybrid, ProcessGroup,
]);

/// Maps each error variant to the status code a client can act on. No `_` arm: a new
/// variant must choose its code here.
pub fn error_status(error: Error) -> Status {
    let code = match &error {
        Error::Invalid { .. } => Code::InvalidArgument,
        Error::NotFound { .. } => Code::NotFound,
        Error::NotRunning { .. }
        | Error::UnknownParent { .. }
        | Error::NotFinished { .. }
        | Error::CannotRestart { .. }
        | Error::HistoryOff
        | Error::UnsafeAgentDir { .. }
        | Error::Unsupported { .. } => Code::FailedPrecondition,
        Error::TooManyAgents { .. } | Error::OverCapacity { .. } => Code::ResourceExhausted,
        Error::AlreadyExists { .. } => Code::AlreadyExists,
        Error::UserNotAllowed { .. } | Error::SandboxWider { .. } => Code::PermissionDenied,
        Error::WorkingDir { .. } => Code::FailedPrecondition,
        Error::Spawn { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidInput => {
                Code::InvalidArgument
            }
            std::io::ErrorKind::PermissionDenied => Code::FailedPrecondition,
            _ => Code::Internal,
        },
        Error::AgentDir { .. } | Error::Store { .. } | Error::Record { .. } => Code::Internal,
        Error::StoreUnreadable { .. } | Error::StoreDistrusted { .. } => Code::Internal,
        Error::Setup { .. } | Error::DataDirTaken { .. } => Code::Internal,
        Error::SequenceCompacted { .. } | Error::SequenceAhead { .. } => Code::OutOfRange,
        Error::ShuttingDown => Code::Unavailable,
    };
    let message = error.to_string();
    match &error {
        Error::Invalid { field, problem } => Status::with_error_details(
            code,
            message,
            ErrorDetails::with_bad_request_violation(*field, problem.clone()),
        ),
        Error::OverCapacity { .. } => exhausted(message, Exhausted::Capacity),
        Error::TooManyAgents { .. } => exhausted(message, Exhausted::Agents),
        _ => Status::new(code, message),
    }
}

/// Why a RESOURCE_EXHAUSTED was answered, as `google.rpc.ErrorInfo.reason` (domain
/// `agentd`), so a program can tell "the host is full" from "you read too slowly".
#[derive(Debug, Clone, Copy)]
pub enum Exhausted {
    /// The declared load would pass `--capacity`.
    Capacity,
    /// `--max-agents` agents hold places already.
    Agents,
    /// A watcher did not read its events (or fell behind the ring).
    SlowWatcher,
    /// `--max-watchers` watchers are open.
    Watchers,
    /// A request over `--max-request-bytes`.
    RequestSize,
    /// Too many failed authentications from the peer.
    FailedAuthentications,
}

impl Exhausted {
    pub fn reason(self) -> &'static str {
        match self {
            Exhausted::Capacity => "CAPACITY_EXHAUSTED",
            Exhausted::Agents => "TOO_MANY_AGENTS",
            Exhausted::SlowWatcher => "WATCHER_TOO_SLOW",
            Exhausted::Watchers => "TOO_MANY_WATCHERS",
            Exhausted::RequestSize => "REQUEST_TOO_LARGE",
            Exhausted::FailedAuthentications => "TOO_MANY_FAILED_AUTHENTICATIONS",
        }
    }
}

/// RESOURCE_EXHAUSTED with its reason in a `google.rpc.ErrorInfo` detail.
pub fn exhausted(message: impl Into<String>, why: Exhausted) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        message,
        ErrorDetails::with_error_info(why.reason(), "agentd", HashMap::new()),
    )
}

/// A status code by its name in the gRPC specification, as the HTTP API and the metrics
/// write it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `{"code": "NOT_FOUND", "message": "..."}`.
pub fn error_body(status: &Status) -> serde_json::Value {
    serde_json::json!({
        "code": code_name(status.code()),
        "message": status.message(),
    })
}

/// Wall time as a protobuf Timestamp; times before 1970 (a clock set wrong) count from it.
pub fn timestamp(time: SystemTime) -> agentd_proto::Timestamp {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    agentd_proto::Timestamp {
        seconds: i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
        nanos: since_epoch.subsec_nanos() as i32,
    }
}

/// A Timestamp from a request: INVALID_ARGUMENT unless it is a real time after 1970.
pub fn time_from(time: agentd_proto::Timestamp) -> Result<SystemTime, Status> {
    let invalid = || {
        Status::invalid_argument(format!(
            "invalid `since`: {}s {}ns is not a time after 1970 (nanos 0 to 999999999)",
            time.seconds, time.nanos
        ))
    };
    let seconds = u64::try_from(time.seconds).map_err(|_| invalid())?;
    let nanos = u32::try_from(time.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(invalid)?;
    UNIX_EPOCH
        .checked_add(Duration::new(seconds, nanos))
        .ok_or_else(invalid)
}

pub fn history(agent_id: String, history: &AgentHistory) -> pb::GetAgentHistoryResponse {
    pb::GetAgentHistoryResponse {
        agent_id,
        interval: Some(history.interval.into()),
        window: Some(history.window.into()),
        samples: history
            .points
            .iter()
            .map(|point| pb::HistorySample {
                time: Some(timestamp(point.time())),
                cpu_percent: f64::from(point.cpu_percent),
                memory_mb: f64::from(point.memory_kib) / 1024.0,
                num_threads: point.num_threads,
                num_processes: point.num_processes,
            })
            .collect(),
    }
}

/// Agents per `ListAgents` answer when the request does not say, and at most.
const DEFAULT_PAGE_SIZE: u32 = 1000;
const MAX_PAGE_SIZE: u32 = 5000;
/// An answer ends before it would pass this, well under a client's default 4 MiB.
const MAX_PAGE_BYTES: usize = 3 << 20;

pub fn list_filter(request: pb::ListAgentsRequest) -> Result<ListFilter, Status> {
    // A page token is the id of the last agent of the page before.
    let token = request.page_token;
    let is_id = |token: &str| {
        token.len() <= 128
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
    };
    if !is_id(&token) {
        return Err(Status::invalid_argument(
            "invalid `page_token`: pass the `next_page_token` of an earlier answer unchanged",
        ));
    }
    let page_size = match request.page_size {
        0 => DEFAULT_PAGE_SIZE,
        size => size.min(MAX_PAGE_SIZE),
    };
    Ok(ListFilter {
        states: request
            .states
            .into_iter()
            .map(|state| from_wire("states", state))
            .collect::<Result<_, _>>()?,
        parent_agent_id: request.parent_agent_id,
        labels: request.labels.into_iter().collect(),
        subtree_of: Some(request.subtree_of).filter(|root| !root.is_empty()),
        after: Some(token).filter(|token| !token.is_empty()),
        limit: page_size as usize,
    })
}

/// A page of statuses, cut short where it would pass [`MAX_PAGE_BYTES`].
pub fn list_page(page: ListPage) -> pb::ListAgentsResponse {
    let mut more = page.more;
    let mut bytes = 0;
    let mut agents = Vec::with_capacity(page.agents.len());
    for agent in &page.agents {
        let agent = status(agent);
        bytes += prost::Message::encoded_len(&agent) + 8;
        if bytes > MAX_PAGE_BYTES && !agents.is_empty() {
            more = true;
            break;
        }
        agents.push(agent);
    }
    let next_page_token = match agents.last() {
        Some(last) if more => last.agent_id.clone(),
        _ => String::new(),
    };
    pb::ListAgentsResponse {
        agents,
        next_page_token,
    }
}

pub fn spawn_request(request: pb::SpawnRequest) -> Result<SpawnRequest, Status> {
    let policy = request.stop_policy.unwrap_or_default();
    Ok(SpawnRequest {
        request_id: request.request_id,
        agent_id: request.agent_id,
        parent_agent_id: request.parent_agent_id,
        agent_name: request.agent_name,
        agent_type: request.agent_type,
        model: request.model,
        prompt: request.prompt,
        load_percentage: request.load_percentage,
        command: request.command,
        env: request.env.into_iter().collect(),
        working_dir: request.working_dir,
        labels: request.labels.into_iter().collect(),
        stop_signal: policy.stop_signal,
        first_grace: duration("stop_policy.first_grace", policy.first_grace)?,
        second_grace: duration("stop_policy.second_grace", policy.second_grace)?,
        health_policy: health_policy(request.health_policy.unwrap_or_default())?,
        lifecycle: lifecycle(
            request.restart_policy,
            request.restart_backoff.unwrap_or_default(),
            request.max_restarts,
            request.max_runtime,
            request.startup_timeout,
            request.on_parent_exit,
        )?,
        resources: resources(request.resources.unwrap_or_default()),
        user: request.user,
        group: request.group,
        sandbox: request.sandbox.map(sandbox::request).transpose()?,
        budget: request.budget.map(spend::budget_request).transpose()?,
    })
}

/// Zero means no limit; ranges are the supervisor's to check.
fn resources(resources: pb::Resources) -> Resources {
    let positive = |value: f64| (value != 0.0).then_some(value);
    let count = |value: u32| (value != 0).then_some(value);
    Resources {
        memory_max_mb: positive(resources.memory_max_mb),
        memory_high_mb: positive(resources.memory_high_mb),
        cpu_max_cores: positive(resources.cpu_max_cores),
        pids_max: count(resources.pids_max),
        cpus: resources.cpus,
        nice: resources.nice,
        open_files_max: count(resources.open_files_max),
    }
}

fn resources_message(resources: &Resources) -> pb::Resources {
    pb::Resources {
        memory_max_mb: resources.memory_max_mb.unwrap_or(0.0),
        memory_high_mb: resources.memory_high_mb.unwrap_or(0.0),
        cpu_max_cores: resources.cpu_max_cores.unwrap_or(0.0),
        pids_max: resources.pids_max.unwrap_or(0),
        cpus: resources.cpus.clone(),
        nice: resources.nice,
        open_files_max: resources.open_files_max.unwrap_or(0),
    }
}

fn lifecycle(
    restart_policy: i32,
    backoff: pb::RestartBackoff,
    max_restarts: u32,
    max_runtime: Option<pbjson_types::Duration>,
    startup_timeout: Option<pbjson_types::Duration>,
    on_parent_exit: i32,
) -> Result<LifecyclePolicy, Status> {
    let restart = from_wire("restart_policy", restart_policy)?;
    let on_parent_exit = from_wire("on_parent_exit", on_parent_exit)?;
    let defaults = Backoff::default();
    Ok(LifecyclePolicy {
        restart,
        backoff: Backoff {
            initial: duration("restart_backoff.initial", backoff.initial)?
                .unwrap_or(defaults.initial),
            max: duration("restart_backoff.max", backoff.max)?.unwrap_or(defaults.max),
            multiplier: if backoff.multiplier == 0.0 {
                defaults.multiplier
            } else {
                backoff.multiplier
            },
            reset_after: duration("restart_backoff.reset_after", backoff.reset_after)?
                .unwrap_or(defaults.reset_after),
        },
        max_restarts: (max_restarts != 0).then_some(max_restarts),
        max_runtime: duration("max_runtime", max_runtime)?,
        startup_timeout: duration("startup_timeout", startup_timeout)?,
        on_parent_exit,
    })
}

fn health_policy(policy: pb::HealthPolicy) -> Result<HealthPolicy, Status> {
    let limit = |value: f64| (value != 0.0).then_some(value);
    Ok(HealthPolicy {
        heartbeat_timeout: duration("health_policy.heartbeat_timeout", policy.heartbeat_timeout)?,
        on_stall: from_wire("health_policy.on_stall", policy.on_stall)?,
        memory_limit_mb: limit(policy.memory_limit_mb),
        on_memory_limit: from_wire("health_policy.on_memory_limit", policy.on_memory_limit)?,
        cpu_limit_percent: limit(policy.cpu_limit_percent),
        cpu_limit_samples: policy.cpu_limit_samples,
        on_cpu_limit: from_wire("health_policy.on_cpu_limit", policy.on_cpu_limit)?,
    })
}

pub fn progress_report(request: pb::ReportProgressRequest) -> ProgressReport {
    ProgressReport {
        agent_id: request.agent_id,
        progress: request.progress,
        message: request.message,
        details: request.details.into_iter().collect(),
    }
}

fn duration(
    field: &str,
    value: Option<pbjson_types::Duration>,
) -> Result<Option<Duration>, Status> {
    value
        .map(|d| {
            Duration::try_from(d).map_err(|_| {
                Status::invalid_argument(format!(
                    "invalid `{field}`: must be a non-negative duration"
                ))
            })
        })
        .transpose()
}

pub fn status(status: &AgentStatus) -> pb::AgentStatus {
    let record = &status.record;
    let spec = &record.spec;
    pb::AgentStatus {
        agent_id: spec.agent_id.clone(),
        process_alive: status.process_alive,
        process_status: status.process_status.clone(),
        exit_code: record.exit.map(Exit::code),
        is_zombie: status.is_zombie,
        cpu_percent: status.cpu_percent,
        memory_mb: status.memory_mb,
        runtime_seconds: status.runtime.as_secs_f64(),
        num_threads: status.num_threads,
        cmdline: spec.command.clone(),
        health: status.health.to_wire().into(),
        state: record.state.to_wire().into(),
        started_at: record.started_at.map(timestamp),
        progress: record.progress,
        pid: record
            .pid
            .and_then(|pid| u32::try_from(pid).ok())
            .unwrap_or(0),
        exit_signal: record.exit.and_then(Exit::signal),
        ended_at: record.ended_at.map(timestamp),
        error: record.error.clone().unwrap_or_default(),
        progress_message: record.progress_message.clone(),
        parent_agent_id: spec.parent_agent_id.clone(),
        agent_name: spec.agent_name.clone(),
        agent_type: spec.agent_type.clone(),
        model: spec.model.clone(),
        load_percentage: spec.load_percentage,
        labels: spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        agent_dir: record.agent_dir.to_string_lossy().into_owned(),
        num_processes: status.num_processes,
        adopted: record.adopted,
        request_id: spec.request_id.clone(),
        health_reason: record
            .health_issues
            .iter()
            .map(|issue| issue.reason.as_str())
            .collect::<Vec<_>>()
            .join("; "),
        health_since: record
            .health_issues
            .iter()
            .map(|issue| issue.since)
            .min()
            .map(timestamp),
        progress_details: record
            .progress_details
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        last_heartbeat: record.last_heartbeat.map(timestamp),
        restart_count: record.restart_count,
        peak_memory_mb: record.peak_memory_bytes as f64 / (1024.0 * 1024.0),
        cpu_seconds: record.cpu_seconds,
        last_exit_code: record.last_exit.map(Exit::code),
        last_exit_signal: record.last_exit.and_then(Exit::signal),
        next_restart_at: record.next_restart_at.map(timestamp),
        restart_policy: spec.lifecycle.restart.to_wire().into(),
        end_reason: record.end_reason.to_wire().into(),
        containment: record.containment.to_wire().into(),
        cgroup: record
            .cgroup
            .as_ref()
            .map_or(String::new(), |cgroup| format!("/{}", cgroup.display())),
        resources: (!spec.resources.is_empty()).then(|| resources_message(&spec.resources)),
        user: spec
            .run_as
            .as_ref()
            .map_or(String::new(), |run_as| run_as.user.clone()),
        group: spec
            .run_as
            .as_ref()
            .map_or(String::new(), |run_as| run_as.gid.to_string()),
        limit_fallbacks: record.limit_fallbacks.clone(),
        sandbox: spec.sandbox.as_ref().map(sandbox::message),
        egress: sandbox::egress(record),
        denials: sandbox::denials(record),
        spend: (record.spend.total.requests > 0).then(|| spend::spend(&record.spend)),
        budget: spec.budget.as_ref().map(spend::budget),
        tree_spend: (record.tree_spend.requests > 0).then(|| spend::usage(&record.tree_spend)),
        budget_reached: record.budget_reached.clone().unwrap_or_default(),
    }
}

pub fn stop_report(report: &StopReport) -> pb::StopResult {
    let exit = report.status.record.exit;
    pb::StopResult {
        agent_id: report.agent_id.clone(),
        outcome: report.outcome.to_wire().into(),
        exit_code: exit.map(Exit::code),
        exit_signal: exit.and_then(Exit::signal),
        duration: Some(report.duration.into()),
        status: Some(status(&report.status)),
    }
}

pub fn check_health(status: &AgentStatus) -> pb::CheckHealthResponse {
    pb::CheckHealthResponse {
        healthy: status.health == Health::Healthy,
        health: status.health.to_wire().into(),
        state: status.record.state.to_wire().into(),
    }
}

pub fn summary(summary: &Summary) -> pb::GetSummaryResponse {
    pb::GetSummaryResponse {
        total: summary.total,
        starting: summary.count(AgentState::Starting),
        running: summary.count(AgentState::Running),
        stopping: summary.count(AgentState::Stopping),
        completed: summary.count(AgentState::Completed),
        failed: summary.count(AgentState::Failed),
        killed: summary.count(AgentState::Killed),
        lost: summary.count(AgentState::Lost),
        zombies: summary.zombies,
        total_memory_mb: summary.total_memory_mb,
        total_cpu_percent: summary.total_cpu_percent,
        total_load_percentage: summary.total_load_percentage,
        stalled: summary.stalled,
        over_limit: summary.over_limit,
        backing_off: summary.count(AgentState::BackingOff),
        timed_out: summary.count(AgentState::TimedOut),
        capacity: summary.capacity,
        free_capacity: summary.free_capacity,
        max_agents: summary
            .max_agents
            .map_or(0, |max| u32::try_from(max).unwrap_or(u32::MAX)),
        records_set_aside: summary.records_set_aside,
        paused: summary.count(AgentState::Paused),
        containment: summary.containment.to_wire().into(),
        containment_detail: summary.containment_detail.clone(),
        store_bytes: summary.store_bytes,
        // The service adds the host's figures: they are not the supervisor's.
        host: None,
        sandbox: summary.sandbox.as_ref().map(sandbox::support),
        unhealthy: summary
            .unhealthy
            .iter()
            .map(|report| pb::AgentHealthReport {
                agent_id: report.agent_id.clone(),
                health: report.health.to_wire().into(),
                reason: report.reason.clone(),
                since: report.since.map(timestamp),
            })
            .collect(),
    }
}

pub fn reap_report(report: ReapReport) -> pb::ReapZombiesResponse {
    pb::ReapZombiesResponse {
        agent_ids: report.agent_ids,
        orphans_reaped: report.orphans_reaped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wire_value_out_of_range_or_unspecified_is_named_in_the_error() {
        let unknown = from_wire::<AgentState>("states", 99).expect_err("99");
        assert_eq!(
            unknown.message(),
            "invalid `states`: 99 is not an AgentState"
        );
        let unspecified = from_wire::<EventKind>("kinds", 0).expect_err("UNSPECIFIED");
        assert_eq!(
            unspecified.message(),
            "invalid `kinds`: 0 is not an EventKind"
        );
        let defaulted = from_wire::<RestartPolicy>("restart_policy", 0);
        assert!(matches!(defaulted, Ok(RestartPolicy::Never)));
        let invalid = from_wire::<HealthAction>("on_stall", -1).expect_err("-1");
        assert_eq!(
            invalid.message(),
            "invalid `on_stall`: -1 is not a HealthAction"
        );
    }

    #[test]
    fn every_state_goes_to_the_wire_and_back() {
        for &state in AgentState::ALL {
            assert_eq!(AgentState::from_wire(state.to_wire()), Some(state));
        }
    }
}

/// The conversion from the wire takes any message: enums out of range, durations that are
/// negative or enormous, NaN. Whatever it refuses is INVALID_ARGUMENT or FAILED_PRECONDITION.
#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    fn duration() -> impl Strategy<Value = Option<pbjson_types::Duration>> {
        proptest::option::of(
            (any::<i64>(), any::<i32>())
                .prop_map(|(seconds, nanos)| pbjson_types::Duration { seconds, nanos }),
        )
    }

    fn enumeration() -> impl Strategy<Value = i32> {
        prop_oneof![-2..25i32, any::<i32>()]
    }

    fn number() -> impl Strategy<Value = f64> {
        proptest::num::f64::ANY
    }

    prop_compose! {
        fn request()(
            stop in (".{0,8}", duration(), duration()),
            health in (duration(), enumeration(), number(), enumeration(), number(), any::<u32>(),
                       enumeration()),
            lifecycle in (enumeration(), duration(), duration(), number(), duration(),
                          any::<u32>(), duration(), duration(), enumeration()),
            resources in (number(), number(), number(), any::<u32>(),
                          proptest::collection::vec(any::<u32>(), 0..3),
                          proptest::option::of(any::<i32>()), any::<u32>()),
            load_percentage in number(),
        ) -> pb::SpawnRequest {
            pb::SpawnRequest {
                agent_id: "prop".into(),
                command: vec!["true".into()],
                load_percentage,
                stop_policy: Some(pb::StopPolicy {
                    stop_signal: stop.0,
                    first_grace: stop.1,
                    second_grace: stop.2,
                }),
                health_policy: Some(pb::HealthPolicy {
                    heartbeat_timeout: health.0,
                    on_stall: health.1,
                    memory_limit_mb: health.2,
                    on_memory_limit: health.3,
                    cpu_limit_percent: health.4,
                    cpu_limit_samples: health.5,
                    on_cpu_limit: health.6,
                }),
                restart_policy: lifecycle.0,
                restart_backoff: Some(pb::RestartBackoff {
                    initial: lifecycle.1,
                    max: lifecycle.2,
                    multiplier: lifecycle.3,
                    reset_after: lifecycle.4,
                }),
                max_restarts: lifecycle.5,
                max_runtime: lifecycle.6,
                startup_timeout: lifecycle.7,
                on_parent_exit: lifecycle.8,
                resources: Some(pb::Resources {
                    memory_max_mb: resources.0,
                    memory_high_mb: resources.1,
                    cpu_max_cores: resources.2,
                    pids_max: resources.3,
                    cpus: resources.4,
                    nice: resources.5,
                    open_files_max: resources.6,
                }),
                ..Default::default()
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn any_spawn_message_converts_or_is_refused_as_a_request_error(request in request()) {
            if let Err(status) = spawn_request(request) {
                prop_assert!(
                    matches!(status.code(), Code::InvalidArgument | Code::FailedPrecondition),
                    "{status:?}"
                );
            }
        }

        #[test]
        fn any_timestamp_converts_or_is_invalid(seconds in any::<i64>(), nanos in any::<i32>()) {
            if let Err(status) = time_from(agentd_proto::Timestamp { seconds, nanos }) {
                prop_assert_eq!(status.code(), Code::InvalidArgument);
            }
        }
    }
}
