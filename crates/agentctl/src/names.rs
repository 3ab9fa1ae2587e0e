//! The API's enums as people write and read them: `--state running` for
//! `AGENT_STATE_RUNNING`, `running` in a table, and which states are still live.

use std::ffi::OsStr;

use agentd_proto::v1 as pb;
use clap::builder::{PossibleValue, TypedValueParser};
use clap::error::{ContextKind, ContextValue, ErrorKind};

/// A clap parser for a proto enum's values as people write them: `on-failure`, `ON_FAILURE`
/// or the full `RESTART_POLICY_ON_FAILURE`. Anything else is a usage error (exit 2) that
/// lists the values; `--help` and shell completions list them too.
#[derive(Clone, Copy)]
pub struct EnumArg<E: 'static> {
    prefix: &'static str,
    name: fn(&E) -> &'static str,
}

/// The parser for the values of `E` named `PREFIX...` (`AgentState`, `"AGENT_STATE_"`).
pub fn enum_arg<E>(prefix: &'static str, name: fn(&E) -> &'static str) -> EnumArg<E> {
    EnumArg { prefix, name }
}

impl<E: TryFrom<i32> + 'static> EnumArg<E> {
    /// Every value but the unspecified one, as people write it: `on-failure`.
    fn values(&self) -> impl Iterator<Item = (i32, String)> + '_ {
        // Enough for every enum of the API; prost gives no list of an enum's values.
        (1..128).filter_map(|number| {
            let value = E::try_from(number).ok()?;
            let name = (self.name)(&value);
            let short = name.strip_prefix(self.prefix).unwrap_or(name);
            Some((number, short.to_lowercase().replace('_', "-")))
        })
    }
}

impl<E: TryFrom<i32> + Clone + Send + Sync + 'static> TypedValueParser for EnumArg<E> {
    type Value = i32;

    fn parse_ref(
        &self,
        command: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<i32, clap::Error> {
        let text = value.to_string_lossy();
        let wanted = text.to_lowercase().replace('_', "-");
        let prefix = self.prefix.to_lowercase().replace('_', "-");
        let wanted = wanted.strip_prefix(&prefix).unwrap_or(&wanted);
        if let Some((number, _)) = self.values().find(|(_, name)| name == wanted) {
            return Ok(number);
        }
        let mut error = clap::Error::new(ErrorKind::InvalidValue).with_cmd(command);
        if let Some(arg) = arg {
            error.insert(
                ContextKind::InvalidArg,
                ContextValue::String(arg.to_string()),
            );
        }
        error.insert(ContextKind::InvalidValue, ContextValue::String(text.into()));
        error.insert(
            ContextKind::ValidValue,
            ContextValue::Strings(self.values().map(|(_, name)| name).collect()),
        );
        Err(error)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            self.values().map(|(_, name)| PossibleValue::new(name)),
        ))
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
