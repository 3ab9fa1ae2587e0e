//! What a starting daemon finds of the agents an earlier one left: for each stored record,
//! whether its process still runs (the same pid with the same start time), and every process
//! agentd started whatever the records say (they carry their agent folder in their
//! environment), so that a spawn or a restart whose record missed the disk before a crash
//! is adopted under its record, and one with no record at all is killed. Where agents have
//! cgroups, the cgroups are the truth about membership: every process in a running agent's
//! cgroup is adopted with it, and the processes of any other cgroup under agentd's root
//! (no record, or an agent that has ended) are strays, to be killed. What each finding
//! means for the agent is the machine's business ([`AgentMachine::recovered`]).
//!
//! [`AgentMachine::recovered`]: crate::machine::AgentMachine::recovered

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::sys::signal::Signal;

use crate::agent::AgentRecord;

use crate::keeper::{KeptChild, KeptExit};
use crate::machine::Recovered;
use crate::os::Os;
use crate::process::MarkedLeader;
use crate::state::AgentState;
use crate::state::Hold;

/// One stored agent as recovery found it.
pub(crate) struct Found {
    /// The record, with the pid of a run it did not know about filled in.
    pub record: AgentRecord,
    pub how: Recovered,
    pub watch: ExitWatch,
}

/// How the exit of an adopted agent will be learned.
pub(crate) enum ExitWatch {
    /// It is not running.
    None,
    /// It is the keeper's child: the keeper reports its exit.
    Keeper,
    /// It is nobody's we know (its keeper died, or an older agentd started it): a pidfd says
    /// when it ends, but not how.
    Pidfd(OwnedFd),
}

/// What the keeper knows: its children that run, and the exits agentd has not acknowledged.
pub(crate) struct KeeperState {
    pub children: Vec<KeptChild>,
    pub exits: Vec<KeptExit>,
}

/// Everything recovery found: the stored agents, and the cgroups whose processes belong to
/// no running agent (killed already; each is removed once empty).
pub(crate) struct Recovery {
    pub found: Vec<Found>,
    pub strays: Vec<PathBuf>,
}

/// `trusted`: the records are the store's, which the host agreed with, so a process or a
/// cgroup of an agent with no record is killed. Records rebuilt from agent folders are not
/// the whole truth: then only what belongs to a known agent is.
pub(crate) fn recover(
    records: Vec<AgentRecord>,
    os: &dyn Os,
    agents_dir: &Path,
    keeper: &KeeperState,
    trusted: bool,
) -> Recovery {
    let cgroups = os.agent_cgroups();
    let mut marked: HashMap<String, Vec<MarkedLeader>> = HashMap::new();
    for leader in os.marked_leaders(agents_dir) {
        marked
            .entry(leader.agent_id.clone())
            .or_default()
            .push(leader);
    }
    let known: HashSet<String> = records.iter().map(|r| r.spec.agent_id.clone()).collect();
    let found: Vec<Found> = records
        .into_iter()
        .map(|record| find(record, os, &mut marked, keeper, &cgroups))
        .collect();
    // Processes of agents with no record at all: their spawn was never acknowledged.
    for leader in marked.into_values().flatten() {
        if !trusted {
            tracing::error!(
                agent_id = %leader.agent_id,
                pid = leader.pid,
                "leaving running a process of an agent that has no record (records were \
                 rebuilt): stop it by hand if it should not run"
            );
            continue;
        }
        tracing::warn!(
            agent_id = %leader.agent_id,
            pid = leader.pid,
            "killing a process agentd started but has no record of (its spawn was cut short)"
        );
        let hold = Hold {
            pgid: leader.pid,
            cgroup: None,
        };
        if let Err(error) = os.signal_group(hold, Signal::SIGKILL) {
            tracing::error!(pid = leader.pid, %error, "killing an unrecorded agent process");
        }
    }
    let running: HashSet<&str> = found
        .iter()
        .filter(|found| matches!(found.how, Recovered::Running { .. }))
        .map(|found| found.record.spec.agent_id.as_str())
        .collect();
    let mut strays = Vec::new();
    for (agent_id, cgroup, members) in &cgroups {
        if running.contains(agent_id.as_str()) || (!trusted && !known.contains(agent_id)) {
            continue;
        }
        if let Some(&pgid) = members.first() {
            tracing::warn!(
                %agent_id,
                processes = members.len(),
                "killing processes left in the cgroup of an agent that is not running"
            );
            let hold = Hold {
                pgid,
                cgroup: Some(cgroup),
            };
            if let Err(error) = os.signal_group(hold, Signal::SIGKILL) {
                tracing::error!(%agent_id, %error, "killing a stray cgroup's processes");
            }
        }
        strays.push(cgroup.clone());
    }
    Recovery { found, strays }
}

fn find(
    mut record: AgentRecord,
    os: &dyn Os,
    marked: &mut HashMap<String, Vec<MarkedLeader>>,
    keeper: &KeeperState,
    cgroups: &[(String, PathBuf, Vec<i32>)],
) -> Found {
    let agent_id = record.spec.agent_id.clone();
    let mut leaders = marked.remove(&agent_id).unwrap_or_default();
    // The keeper names its children too, whatever their environment became since.
    for child in keeper
        .children
        .iter()
        .filter(|child| child.agent_id == agent_id)
    {
        if !leaders.iter().any(|leader| leader.pid == child.pid)
            && let Some(stat) = os
                .proc_stat(child.pid)
                .filter(|stat| child.start_ticks == Some(stat.start_ticks) && stat.state != 'Z')
        {
            leaders.push(MarkedLeader {
                pid: child.pid,
                stat,
                agent_id: agent_id.clone(),
            });
        }
    }
    let was_live = record.state.is_live() || record.state == AgentState::BackingOff;
    if !was_live {
        // Younger leaders carrying an ended agent's folder are its descendants.
        return as_found(record, Recovered::AsStored, ExitWatch::None);
    }
    // The keeper saw it end while agentd was away.
    if record.state.is_live()
        && let Some(kept) = keeper.exits.iter().find(|exit| {
            exit.agent_id == agent_id
                && record.pid.is_none_or(|pid| pid == exit.pid)
                && (record.start_ticks.is_none() || exit.start_ticks == record.start_ticks)
        })
    {
        let how = Recovered::Exited {
            exit: kept.exit,
            ran_for: Some(kept.ran_for),
            at: kept.at,
        };
        record.pid = Some(kept.pid);
        record.start_ticks = kept.start_ticks;
        return as_found(record, how, ExitWatch::None);
    }
    // Same pid and start time: the same process. A zombie is already gone (its new parent
    // may never reap it).
    let same = record
        .pid
        .filter(|_| record.state.is_live())
        .and_then(|pid| {
            os.proc_stat(pid)
                .filter(|stat| Some(stat.start_ticks) == record.start_ticks && stat.state != 'Z')
        });
    let unrecorded = same.is_none();
    let stat = match same {
        Some(stat) => stat,
        // Else the run whose record did not reach the disk: the oldest leader carrying the
        // agent's folder or named by the keeper (any younger one is its descendant).
        None => match leaders.into_iter().min_by_key(|l| l.stat.start_ticks) {
            Some(leader) => {
                tracing::warn!(
                    %agent_id,
                    pid = leader.pid,
                    "found the agent's process running though its record did not say so"
                );
                if record.state == AgentState::BackingOff {
                    // The restart had started: count it as the machine would have.
                    record.restart_count += 1;
                    record.last_exit = record.exit;
                    record.exit = None;
                    record.next_restart_at = None;
                }
                record.pid = Some(leader.pid);
                record.start_ticks = Some(leader.stat.start_ticks);
                record.ended_at = None;
                record.error = None;
                // Its cgroup is the one it is in.
                record.cgroup = cgroups
                    .iter()
                    .find(|(_, _, members)| members.contains(&leader.pid))
                    .map(|(_, cgroup, _)| cgroup.clone());
                if record.cgroup.is_some() {
                    record.containment = os.containment().0;
                }
                leader.stat
            }
            None if record.state == AgentState::BackingOff => {
                return as_found(record, Recovered::AsStored, ExitWatch::None);
            }
            None => return as_found(record, Recovered::Gone, ExitWatch::None),
        },
    };
    let Some(pid) = record.pid else {
        return as_found(record, Recovered::Gone, ExitWatch::None);
    };
    let ran_for = os.running_for(&stat).unwrap_or_default();
    if unrecorded {
        record.started_at = SystemTime::now().checked_sub(ran_for);
    }
    let running = Recovered::Running { ran_for };
    let kept = keeper.children.iter().any(|child| {
        child.pid == pid
            && child.agent_id == agent_id
            && child.start_ticks == Some(stat.start_ticks)
    });
    if kept {
        return as_found(record, running, ExitWatch::Keeper);
    }
    match os.pidfd_open(pid) {
        Ok(pidfd) => as_found(record, running, ExitWatch::Pidfd(pidfd)),
        Err(error) => {
            tracing::warn!(%agent_id, pid, %error, "cannot watch the agent's process");
            as_found(record, Recovered::Gone, ExitWatch::None)
        }
    }
}

fn as_found(record: AgentRecord, how: Recovered, watch: ExitWatch) -> Found {
    Found { record, how, watch }
}
