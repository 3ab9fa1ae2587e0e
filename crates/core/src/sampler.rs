//! Background health sampling. A dedicated thread wakes every interval, asks the supervisor
//! which agents are live, measures each agent's whole process tree (CPU, memory, threads,
//! leader state) and reads the progress the agent wrote to its status file, then hands the
//! batch back. Status calls answer from the latest batch and never wait for a sample.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use crate::logs::{LogFile, LogRotation, LogStream};
use crate::os;
use crate::spawn::STATUS_FILE;

/// A live agent to sample.
#[derive(Debug, Clone)]
pub struct SampleTarget {
    pub agent_id: String,
    /// Leader pid and process group id.
    pub pid: i32,
    /// The agent's folder: its status file and its output.
    pub dir: PathBuf,
}

/// One measurement of an agent's process tree: the leader, its descendants, and orphans of
/// its process group that were reparented to agentd.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeSample {
    pub leader_status: String,
    pub cpu_percent: f64,
    pub memory_bytes: u64,
    pub num_threads: u32,
    pub num_processes: u32,
}

/// What an agent reported in its status file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Progress {
    pub progress: f64,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Default)]
pub struct SampleBatch {
    pub samples: Vec<(String, TreeSample)>,
    pub progress: Vec<(String, Progress)>,
}

/// Largest status file read; a bigger one is ignored with a warning.
const STATUS_FILE_LIMIT: u64 = 64 * 1024;

/// Runs the sampling loop on its own thread until `deliver` returns false. Each round also
/// rotates the live agents' output (the thread already visits them, off the supervisor task).
pub fn start(
    interval: Duration,
    rotation: LogRotation,
    mut targets: impl FnMut() -> Option<Vec<SampleTarget>> + Send + 'static,
    mut deliver: impl FnMut(SampleBatch) -> bool + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("agentd-sampler".into())
        .spawn(move || {
            let mut sampler = Sampler::default();
            loop {
                std::thread::sleep(interval);
                let Some(targets) = targets() else { return };
                let batch = sampler.sample(&targets);
                if !deliver(batch) {
                    return;
                }
                rotate_output(&targets, rotation);
            }
        })?;
    Ok(())
}

#[derive(Default)]
struct Sampler {
    system: Option<System>,
    /// Modification time of each agent's status file when it was last read.
    status_seen: HashMap<String, SystemTime>,
}

impl Sampler {
    fn sample(&mut self, targets: &[SampleTarget]) -> SampleBatch {
        let mut batch = SampleBatch::default();
        if targets.is_empty() {
            self.status_seen.clear();
            return batch;
        }
        if self.system.is_none() {
            match System::new() {
                Ok(system) => self.system = Some(system),
                Err(error) => {
                    tracing::warn!(%error, "cannot read processes; skipping this sample");
                    return batch;
                }
            }
        }
        let Some(system) = self.system.as_mut() else {
            return batch;
        };
        system.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            ProcessRefreshKind::nothing().with_cpu().with_memory(),
        );
        let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
        for (pid, process) in system.processes() {
            if process.thread_kind().is_some() {
                continue;
            }
            if let Some(parent) = process.parent() {
                children
                    .entry(parent.as_u32() as i32)
                    .or_default()
                    .push(pid.as_u32() as i32);
            }
        }
        // Orphans reparented to agentd still belong to their agent's process group.
        let leaders: std::collections::HashSet<i32> = targets.iter().map(|t| t.pid).collect();
        let mut orphans_by_group: HashMap<i32, Vec<i32>> = HashMap::new();
        for &child in children
            .get(&(std::process::id() as i32))
            .into_iter()
            .flatten()
        {
            if leaders.contains(&child) {
                continue;
            }
            if let Some(stat) = os::proc_stat(child) {
                orphans_by_group.entry(stat.pgrp).or_default().push(child);
            }
        }
        for target in targets {
            let mut roots = vec![target.pid];
            roots.extend(orphans_by_group.get(&target.pid).into_iter().flatten());
            if let Some(sample) = measure_tree(system, &children, &roots) {
                batch.samples.push((target.agent_id.clone(), sample));
            }
            if let Some(progress) = read_status_file(&mut self.status_seen, target) {
                batch.progress.push((target.agent_id.clone(), progress));
            }
        }
        self.status_seen
            .retain(|id, _| targets.iter().any(|t| &t.agent_id == id));
        batch
    }
}

/// Reads an agent's status file when it changed since the last read.
fn read_status_file(
    status_seen: &mut HashMap<String, SystemTime>,
    target: &SampleTarget,
) -> Option<Progress> {
    let status_file = target.dir.join(STATUS_FILE);
    let modified = std::fs::metadata(&status_file)
        .and_then(|m| m.modified())
        .ok()?;
    if status_seen.insert(target.agent_id.clone(), modified) == Some(modified) {
        return None;
    }
    match read_progress(&status_file) {
        Ok(progress) => Some(progress),
        Err(problem) => {
            tracing::warn!(
                agent_id = %target.agent_id,
                file = %status_file.display(),
                "ignoring status file: {problem}"
            );
            None
        }
    }
}

fn rotate_output(targets: &[SampleTarget], rotation: LogRotation) {
    for target in targets {
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            if let Err(error) = LogFile::new(&target.dir, stream).rotate(rotation) {
                tracing::warn!(agent_id = %target.agent_id, ?stream, %error, "rotating output");
            }
        }
    }
}

fn measure_tree(
    system: &System,
    children: &HashMap<i32, Vec<i32>>,
    roots: &[i32],
) -> Option<TreeSample> {
    let leader = os::proc_stat(roots[0])?;
    let mut sample = TreeSample {
        leader_status: os::state_name(leader.state).to_string(),
        cpu_percent: 0.0,
        memory_bytes: 0,
        num_threads: 0,
        num_processes: 0,
    };
    let mut stack = roots.to_vec();
    let mut seen = std::collections::HashSet::new();
    while let Some(pid) = stack.pop() {
        if !seen.insert(pid) {
            continue;
        }
        if let Some(process) = system.process(Pid::from_u32(pid as u32)) {
            sample.cpu_percent += f64::from(process.cpu_usage());
            sample.memory_bytes += process.memory();
        }
        if let Some(stat) = os::proc_stat(pid) {
            sample.num_threads += stat.num_threads;
            sample.num_processes += 1;
        }
        stack.extend(children.get(&pid).into_iter().flatten());
    }
    Some(sample)
}

/// Parses `{"progress": 0-100, "message": "..."}`.
fn read_progress(path: &std::path::Path) -> Result<Progress, String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(STATUS_FILE_LIMIT + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > STATUS_FILE_LIMIT {
        return Err(format!("larger than {STATUS_FILE_LIMIT} bytes"));
    }
    parse_progress(&text)
}

fn parse_progress(text: &str) -> Result<Progress, String> {
    let progress: Progress = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if !(0.0..=100.0).contains(&progress.progress) {
        return Err(format!(
            "progress {} is not between 0 and 100",
            progress.progress
        ));
    }
    Ok(progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_files_are_checked() {
        assert_eq!(
            parse_progress(r#"{"progress": 42.5, "message": "reading"}"#),
            Ok(Progress {
                progress: 42.5,
                message: "reading".into()
            })
        );
        assert_eq!(
            parse_progress(r#"{"progress": 7}"#).map(|p| p.message),
            Ok(String::new())
        );
        for bad in [
            "",
            "{",
            r#"{"progress": "x"}"#,
            r#"{"progress": 101}"#,
            "[]",
        ] {
            assert!(parse_progress(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
