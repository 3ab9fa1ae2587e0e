//! `describe`: everything about one agent, grouped, with times people can read, the last
//! lines of its output and its children (`kubectl describe`, `pm2 describe`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentd_proto::v1 as pb;
use anyhow::Context;
use serde_json::Value;

use crate::client::Client;
use crate::names::state_upper_name;
use crate::output::{Output, one_line, print_json};

/// Every field of AgentStatus, by its proto name, in the group it is shown in. A field the
/// proto gains and this list lacks is still shown, under "other".
const GROUPS: &[(&str, &[&str])] = &[
    (
        "Identity",
        &[
            "agent_id",
            "agent_name",
            "agent_type",
            "model",
            "parent_agent_id",
            "request_id",
            "labels",
            "load_percentage",
            "user",
            "group",
        ],
    ),
    (
        "Process",
        &[
            "pid",
            "cmdline",
            "process_alive",
            "process_status",
            "is_zombie",
            "num_processes",
            "num_threads",
            "cpu_percent",
            "memory_mb",
            "peak_memory_mb",
            "cpu_seconds",
            "containment",
            "cgroup",
        ],
    ),
    (
        "Health",
        &[
            "health",
            "health_reason",
            "health_since",
            "last_heartbeat",
            "progress",
            "progress_message",
            "progress_details",
        ],
    ),
    (
        "Limits and policies",
        &["resources", "limit_fallbacks", "restart_policy"],
    ),
    ("Sandbox", &["sandbox", "egress", "denials"]),
    (
        "Spend",
        &["spend", "tree_spend", "budget", "budget_reached"],
    ),
    (
        "Lifecycle",
        &[
            "state",
            "started_at",
            "ended_at",
            "runtime_seconds",
            "exit_code",
            "exit_signal",
            "end_reason",
            "error",
            "adopted",
            "restart_count",
            "last_exit_code",
            "last_exit_signal",
            "next_restart_at",
        ],
    ),
    ("Output", &["agent_dir"]),
];

/// What an agent's folder holds.
const FILES: [&str; 5] = [
    "stdout.log",
    "stderr.log",
    "prompt.txt",
    "status.json",
    "error.log",
];

/// Lines of each output stream shown.
const TAIL: u32 = 10;

/// Prints everything about one agent; with `json`, one object: `status` (an AgentStatus),
/// `stdoutTail` and `stderrTail` (the last lines), `children` (their AgentStatus).
pub async fn describe(client: &mut Client, agent_id: String, out: Output) -> anyhow::Result<()> {
    let request = pb::StatusRequest {
        agent_id: agent_id.clone(),
    };
    let status = client
        .status(request)
        .await?
        .into_inner()
        .status
        .context("no status in the answer")?;
    let mut tails = Vec::new();
    for stream in [pb::LogStream::Stdout, pb::LogStream::Stderr] {
        let request = pb::StreamLogsRequest {
            agent_id: agent_id.clone(),
            stream: stream.into(),
            tail: TAIL,
            ..Default::default()
        };
        let mut chunks = client.stream_logs(request).await?.into_inner();
        let mut text = Vec::new();
        while let Some(chunk) = chunks.message().await? {
            text.extend_from_slice(&chunk.data);
        }
        tails.push(String::from_utf8_lossy(&text).into_owned());
    }
    let request = pb::ListAgentsRequest {
        parent_agent_id: agent_id,
        ..Default::default()
    };
    let children = client.list_agents(request).await?.into_inner().agents;
    let history = history(client, &status.agent_id).await;
    if out.json {
        let described = serde_json::json!({
            "status": status,
            "history": history.as_ref().ok(),
            "stdoutTail": tails[0],
            "stderrTail": tails[1],
            "children": children,
        });
        print_json(&described, true);
        return Ok(());
    }

    let fields = match serde_json::to_value(&status)? {
        Value::Object(fields) => fields,
        _ => anyhow::bail!("a status that is not a JSON object"),
    };
    let now = SystemTime::now();
    let mut shown = std::collections::HashSet::new();
    for (group, names) in GROUPS {
        println!("{group}:");
        for name in *names {
            shown.insert(camel_case(name));
            let value = value_text(fields.get(&camel_case(name)), now);
            println!("  {name:<18} {}", one_line(&value));
        }
        match *group {
            "Lifecycle" => print_history(&history, now),
            "Output" => print_files(&status.agent_dir),
            _ => {}
        }
    }
    let other: Vec<_> = fields.keys().filter(|key| !shown.contains(*key)).collect();
    if !other.is_empty() {
        println!("Other:");
        for key in other {
            println!(
                "  {key:<18} {}",
                one_line(&value_text(fields.get(key), now))
            );
        }
    }
    for (name, tail) in ["stdout", "stderr"].iter().zip(&tails) {
        println!("Last {TAIL} lines of {name}:");
        for line in tail.lines() {
            println!("  {}", one_line(line));
        }
    }
    println!("Children:");
    if children.is_empty() {
        println!("  none");
    }
    for child in &children {
        let state = state_upper_name(child.state);
        println!("  {:<24} {state:<12} pid {}", child.agent_id, child.pid);
    }
    Ok(())
}

/// The files of the agent's folder that exist; when the folder cannot be read from here
/// (agentd on another host, or another user's folder), every file it may hold, said so.
fn print_files(agent_dir: &str) {
    let dir = std::path::Path::new(agent_dir);
    let readable = std::fs::read_dir(dir).is_ok();
    match readable {
        true => println!("  files:"),
        false => println!("  files (where present: the folder is not readable from here):"),
    }
    for file in FILES {
        if !readable || dir.join(file).exists() {
            println!("    {}/{file}", one_line(agent_dir));
        }
    }
}

fn print_history(history: &Result<Vec<pb::AgentEvent>, tonic::Status>, now: SystemTime) {
    println!("  history:");
    let events = match history {
        Ok(events) if events.is_empty() => return println!("    -"),
        Ok(events) => events,
        Err(error) => return println!("    - ({})", one_line(error.message())),
    };
    for event in events {
        let time = event
            .time
            .and_then(|time| u64::try_from(time.seconds).ok())
            .map(|seconds| relative(UNIX_EPOCH + Duration::from_secs(seconds), now))
            .unwrap_or_default();
        let kind = pb::EventKind::try_from(event.kind)
            .map(|k| k.as_str_name().trim_start_matches("EVENT_KIND_"))
            .unwrap_or("UNKNOWN");
        println!(
            "    #{:<8} {time:<12} {kind:<10} {}",
            event.sequence,
            one_line(&event.message)
        );
    }
}

/// The agent's lifecycle events still in the daemon's log, oldest first: this agent's, not
/// those of an earlier agent of the same id that was removed.
async fn history(
    client: &mut Client,
    agent_id: &str,
) -> Result<Vec<pb::AgentEvent>, tonic::Status> {
    use pb::EventKind::*;
    let kinds = [
        Spawned, Exited, Failed, Stopping, Killed, Lost, Adopted, Restarting, TimedOut, Paused,
        Resumed, OomKilled, Removed,
    ];
    let request = pb::WatchAgentsRequest {
        agent_ids: vec![agent_id.to_string()],
        kinds: kinds.map(Into::into).into(),
        after_sequence: Some(0),
        replay_only: true,
        ..Default::default()
    };
    let mut events = client.watch_agents(request).await?.into_inner();
    let mut history = Vec::new();
    while let Some(event) = events.message().await? {
        if event.kind == i32::from(Removed) {
            history.clear();
        } else {
            history.push(event);
        }
    }
    Ok(history)
}

/// `started_at` as the JSON names it: `startedAt`.
fn camel_case(name: &str) -> String {
    let mut camel = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        match c {
            '_' => upper = true,
            c if upper => {
                camel.push(c.to_ascii_uppercase());
                upper = false;
            }
            c => camel.push(c),
        }
    }
    camel
}

/// A field's value for people: `-` when unset, enum names without their prefix, times both
/// absolute and relative.
fn value_text(value: Option<&Value>, now: SystemTime) -> String {
    match value {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(text)) if text.is_empty() => "-".into(),
        Some(Value::String(text)) => match parse_rfc3339(text) {
            Some(time) => format!("{text} ({})", relative(time, now)),
            None => enum_text(text),
        },
        Some(Value::Array(items)) if items.is_empty() => "-".into(),
        Some(Value::Object(map)) if map.is_empty() => "-".into(),
        Some(other) => other.to_string(),
    }
}

/// `AGENT_STATE_RUNNING` as `RUNNING`; any other text as it is.
fn enum_text(text: &str) -> String {
    const PREFIXES: [&str; 6] = [
        "AGENT_STATE_",
        "HEALTH_",
        "END_REASON_",
        "RESTART_POLICY_",
        "CONTAINMENT_",
        "LOG_STREAM_",
    ];
    PREFIXES
        .iter()
        .find_map(|prefix| text.strip_prefix(prefix))
        .filter(|rest| rest.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .unwrap_or(text)
        .to_string()
}

/// An RFC 3339 time, as agentd writes them.
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let time = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    let seconds = u64::try_from(time.timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::new(seconds, time.timestamp_subsec_nanos()))
}

/// "3m12s ago", "in 4s".
fn relative(time: SystemTime, now: SystemTime) -> String {
    match now.duration_since(time) {
        Ok(past) => format!("{} ago", short_duration(past)),
        Err(future) => format!("in {}", short_duration(future.duration())),
    }
}

fn short_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{}s", seconds / 60, seconds % 60),
        3600..86_400 => format!("{}h{}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d{}h", seconds / 86_400, seconds % 86_400 / 3600),
    }
}
