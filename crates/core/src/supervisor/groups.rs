//! Exits and process groups: reaping, adopted agents' pidfds, groups and cgroups that
//! outlive their leader, and stray cgroups left by an earlier daemon.

use std::path::{Path, PathBuf};

use crate::handle::{Command, ReapReport};
use crate::machine::AgentMachine;
use crate::os;
use crate::process;
use crate::state::Exit;

use super::SupervisorTask;

impl SupervisorTask {
    /// Reaps every exited child of agentd: the keeper, and the agents it leaves to agentd
    /// should it die (their exits are recorded); anything else is dropped.
    pub(super) fn reap(&mut self) -> ReapReport {
        let mut report = ReapReport::default();
        while let Some((pid, exit)) = self.os.reap_one() {
            match self.table.take_child(pid) {
                Some(agent_id) => {
                    self.leader_exited(&agent_id, Some(exit));
                    report.agent_ids.push(agent_id);
                }
                None => report.orphans_reaped += 1,
            }
        }
        report
    }

    /// The leader exited; `exit` is `None` for an agent watched through a pidfd, whose
    /// status only its real parent could read.
    pub(super) fn leader_exited(&mut self, agent_id: &str, exit: Option<Exit>) {
        let Some(record) = self.table.get(agent_id).ok().map(AgentMachine::record) else {
            return;
        };
        let Some(hold) = record.hold() else {
            return;
        };
        // One read of `cgroup.events`; or usually one `kill(-pgid, 0)` that finds nothing,
        // and a scan only when the group lives on.
        let group_alive = self.os.group_alive(hold);
        let oom_killed = hold.cgroup.is_some_and(|cgroup| self.os.oom_killed(cgroup));
        self.input(agent_id, |m, now, out| {
            m.leader_exited(now, exit, group_alive, oom_killed, out);
        });
    }

    /// Starts or ends the inotify watch on an agent's `cgroup.events`. A cgroup that is
    /// already empty when the watch starts is reported at once.
    pub(super) fn watch_cgroup(&mut self, agent_id: &str, cgroup: &Path, watch: bool) {
        let watched = self
            .cgroups_watched
            .iter()
            .find(|(_, id)| id.as_str() == agent_id)
            .map(|(wd, _)| *wd);
        match (watched, watch) {
            (Some(wd), false) => {
                self.cgroups_watched.remove(&wd);
                self.cgroup_watch.remove(wd);
            }
            (None, true) => {
                let added = self
                    .os
                    .cgroup_events(cgroup)
                    .map(|events| self.cgroup_watch.add(&events));
                match added {
                    Some(Ok(wd)) => {
                        self.cgroups_watched.insert(wd, agent_id.to_string());
                    }
                    Some(Err(error)) => {
                        tracing::debug!(%agent_id, %error, "cgroup gone before it was watched");
                    }
                    None => {}
                }
                self.cgroups_changed(Vec::new());
            }
            _ => {}
        }
    }

    /// Some watched `cgroup.events` changed: the stops whose cgroup is empty are over.
    /// Every watched cgroup is checked (one small read each): an empty `changed` asks
    /// for that too.
    pub(super) fn cgroups_changed(&mut self, changed: Vec<os::WatchDescriptor>) {
        self.strays_changed(&changed);
        let candidates: Vec<String> = if changed.is_empty() {
            self.cgroups_watched.values().cloned().collect()
        } else {
            changed
                .iter()
                .filter_map(|wd| self.cgroups_watched.get(wd).cloned())
                .collect()
        };
        for agent_id in candidates {
            let empty = self
                .table
                .get(&agent_id)
                .ok()
                .and_then(|m| m.record().hold())
                .is_none_or(|hold| !self.os.group_alive(hold));
            if empty {
                self.input(&agent_id, |m, now, out| m.group_gone(now, out));
                self.remove_cgroup_if_empty(&agent_id);
            }
        }
    }

    /// An agent that ended for good gives its cgroup back once no process is left in it.
    pub(super) fn remove_cgroup_if_empty(&mut self, agent_id: &str) {
        let Ok(machine) = self.table.get(agent_id) else {
            return;
        };
        let record = machine.record();
        if let (true, Some(cgroup)) = (machine.has_ended(), &record.cgroup)
            && !record.hold().is_some_and(|hold| self.os.group_alive(hold))
            && let Err(error) = self.os.remove_cgroup(cgroup)
        {
            tracing::warn!(%agent_id, %error, cgroup = %cgroup.display(), "removing the agent's cgroup");
        }
    }

    /// A cgroup under agentd's root that no running agent owns: its processes were killed,
    /// and it is removed once empty.
    pub(super) fn watch_stray(&mut self, cgroup: PathBuf) {
        let Some(events) = self.os.cgroup_events(&cgroup) else {
            return;
        };
        // An error: it is already gone.
        if let Ok(wd) = self.cgroup_watch.add(&events) {
            self.strays.insert(wd, cgroup);
            self.strays_changed(&[wd]);
        }
    }

    pub(super) fn strays_changed(&mut self, changed: &[os::WatchDescriptor]) {
        for wd in changed {
            let Some(cgroup) = self.strays.get(wd) else {
                continue;
            };
            // Strays exist only with cgroups, so the cgroup answers; there is no leader.
            let hold = crate::state::Hold {
                pgid: 0,
                cgroup: Some(cgroup),
            };
            if !self.os.group_alive(hold) {
                if let Err(error) = self.os.remove_cgroup(cgroup) {
                    tracing::warn!(cgroup = %cgroup.display(), %error, "removing a stray cgroup");
                }
                self.cgroup_watch.remove(*wd);
                self.strays.remove(wd);
            }
        }
    }

    /// Checks, on a blocking thread, the groups of stops whose leader is gone.
    pub(super) fn check_groups(&mut self) {
        let groups: Vec<(String, i32)> = self
            .groups_watched
            .iter()
            .filter_map(|id| Some((id.clone(), self.table.get(id).ok()?.record().pid?)))
            .collect();
        let Some(commands) = self.commands.upgrade() else {
            return;
        };
        self.group_check_running = true;
        let os = self.os.clone();
        tokio::task::spawn_blocking(move || {
            let pgids: Vec<i32> = groups.iter().map(|(_, pgid)| *pgid).collect();
            let live = os.live_groups(&pgids);
            let gone = groups
                .into_iter()
                .filter(|(_, pgid)| !live.contains(pgid))
                .collect();
            let _ = commands.blocking_send(Command::GroupsGone(gone));
        });
    }

    /// An adopted agent is not our child: its exit arrives through a pidfd.
    pub(super) fn watch_adopted(&self, agent_id: String, pidfd: std::os::fd::OwnedFd) {
        let exits = self.adopted_exits_tx.clone();
        tokio::spawn(async move {
            match process::wait_for_exit(pidfd).await {
                Ok(()) => {
                    let _ = exits.send(agent_id);
                }
                Err(error) => {
                    tracing::error!(%agent_id, %error, "cannot watch adopted agent for its exit");
                }
            }
        });
    }
}
