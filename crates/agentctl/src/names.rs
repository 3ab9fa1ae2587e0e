//! The API's enums as people write and read them: `--state running` for
//! `AGENT_STATE_RUNNING`, `running` in a table, and which states are still live.

use agentd_proto::v1 as pb;
use anyhow::bail;

/// Accepts `running`, `RUNNING` or the full `AGENT_STATE_RUNNING`.
pub fn parse_enum<E: Into<i32>>(
    text: &str,
    prefix: &str,
    parse: fn(&str) -> Option<E>,
) -> anyhow::Result<i32> {
    let upper = text.to_ascii_uppercase().replace('-', "_");
    let full = if upper.starts_with(prefix) {
        upper
    } else {
        format!("{prefix}{upper}")
    };
    match parse(&full) {
        Some(value) => Ok(value.into()),
        None => bail!(
            "`{text}` is not a known {}",
            prefix.trim_end_matches('_').to_lowercase()
        ),
    }
}

/// A value of a proto enum without its prefix, in lower case (`AGENT_STATE_RUNNING` as
/// `running`); a value this agentctl does not know as its number.
fn lower_name<E: TryFrom<i32>>(value: i32, prefix: &str, name: fn(&E) -> &'static str) -> String {
    E::try_from(value)
        .map(|known| {
            let name = name(&known);
            name.strip_prefix(prefix).unwrap_or(name).to_lowercase()
        })
        .unwrap_or_else(|_| value.to_string())
}

pub fn state_name(value: i32) -> String {
    lower_name(value, "AGENT_STATE_", pb::AgentState::as_str_name)
}

pub fn health_name(value: i32) -> String {
    lower_name(value, "HEALTH_", pb::Health::as_str_name)
}

pub fn event_kind_name(value: i32) -> String {
    lower_name(value, "EVENT_KIND_", pb::EventKind::as_str_name)
}

pub fn stop_outcome_name(value: i32) -> String {
    lower_name(value, "STOP_OUTCOME_", pb::StopOutcome::as_str_name)
}

/// `RUNNING` for `AGENT_STATE_RUNNING`, `UNKNOWN` for a value this agentctl does not know.
pub fn state_upper_name(value: i32) -> &'static str {
    pb::AgentState::try_from(value)
        .map(|s| s.as_str_name().trim_start_matches("AGENT_STATE_"))
        .unwrap_or("UNKNOWN")
}

/// `Some(true)` for a state an agent may still run from by itself, `Some(false)` for one it
/// has ended in for good, `None` for a value this agentctl does not know. No `_` arm: a
/// state the API gains must be placed here.
fn live(state: i32) -> Option<bool> {
    use pb::AgentState::*;
    match pb::AgentState::try_from(state).ok()? {
        Starting | Running | Stopping | BackingOff | Paused => Some(true),
        Completed | Failed | Killed | TimedOut | Lost => Some(false),
        Unspecified => None,
    }
}

/// STARTING, RUNNING, STOPPING, BACKING_OFF or PAUSED.
pub fn is_live(state: i32) -> bool {
    live(state) == Some(true)
}

/// COMPLETED, FAILED, KILLED, TIMED_OUT or LOST: nothing will start it again by itself.
pub fn ended_for_good(state: i32) -> bool {
    live(state) == Some(false)
}

/// `signal 9`, an exit code, or `-` while there is none.
pub fn exit_text(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (_, Some(signal)) => format!("signal {signal}"),
        (Some(code), None) => code.to_string(),
        (None, None) => "-".into(),
    }
}
