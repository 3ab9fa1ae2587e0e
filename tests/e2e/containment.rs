//! Containment: a cgroup per agent (stops reach every descendant, limits, freezing,
//! recovery), and the process-group fallback with `--cgroups=off`. A test that needs
//! cgroups this host does not offer says so and returns (see `Need::Cgroups`).

use agentd_proto::v1 as pb;
use pb::{AgentState, Containment, EndReason, EventKind, StopOutcome};
use std::path::{Path, PathBuf};
use tonic::Code;

use crate::harness::*;

/// How this daemon holds agents, which must be a cgroup: the test asked for
/// [`Need::Cgroups`], so agentd must have found them.
async fn cgroups(client: &mut Client) -> Containment {
    let summary = client
        .get_summary(pb::GetSummaryRequest {})
        .await
        .expect("summary")
        .into_inner();
    let containment = summary.containment();
    assert!(
        !matches!(
            containment,
            Containment::ProcessGroup | Containment::Unspecified
        ),
        "agentd runs as root on a host with cgroup v2 but found no cgroups: {}",
        summary.containment_detail
    );
    // The VM's older-kernel run (tests/vm/run.sh) has agentd act as before `cgroup.kill`.
    if std::env::var_os("AGENTD_TEST_NO_CGROUP_KILL").is_some() {
        assert!(
            summary.containment_detail.contains("no cgroup.kill"),
            "{}",
            summary.containment_detail
        );
    }
    containment
}

/// The agent's cgroup folder in the v2 hierarchy (membership, events, freezing).
fn unified_dir(cgroup: &str) -> PathBuf {
    cgroup_dirs(Path::new(cgroup))
        .into_iter()
        .find(|dir| dir.join("cgroup.events").exists())
        .unwrap_or_else(|| panic!("no v2 folder for cgroup {cgroup}"))
}

fn members(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.parse().ok())
        .collect()
}

fn event_field(dir: &Path, key: &str) -> Option<String> {
    let events = std::fs::read_to_string(dir.join("cgroup.events")).ok()?;
    events
        .lines()
        .find_map(|line| Some(line.strip_prefix(key)?.trim().to_string()))
}

fn with_resources(
    agent_id: &str,
    command: Vec<String>,
    resources: pb::Resources,
) -> pb::SpawnRequest {
    pb::SpawnRequest {
        resources: Some(resources),
        ..spawn_request(agent_id, command)
    }
}

fn proc_status_field(pid: i32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|line| Some(line.strip_prefix(field)?.trim().to_string()))
}

#[tokio::test]
async fn a_stop_reaches_setsid_descendants_and_double_forked_daemons() {
    if !requires(Need::Cgroups) {
        return;
    }
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let kind = cgroups(&mut client).await;
    let script = "setsid sleep 3690 & (setsid sh -c 'sleep 3692 &'); exec sleep 3691";
    let agent = spawn(&mut client, "t", sh(script)).await;
    assert_eq!(agent.containment, kind as i32, "{agent:#?}");
    let dir = unified_dir(&agent.cgroup);
    let session = |pid: i32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat_field(&stat, 6).map(str::to_string)
    };
    let leader_session = session(agent.pid as i32);
    let escaped = || {
        let tree = members(&dir);
        let outside = tree.iter().filter(|&&pid| session(pid) != leader_session);
        (tree.len(), outside.count())
    };
    eventually(
        "three sleeps run in the cgroup, two in sessions of their own",
        async || escaped() == (3, 2),
    )
    .await;
    let tree = members(&dir);

    let [result] = stop(&mut client, &["t"], false)
        .await
        .try_into()
        .expect("one");
    assert_eq!(result.outcome, StopOutcome::ExitedOnFirstSignal as i32);
    for pid in tree {
        assert!(!process_exists(pid), "{pid} outlived the stop");
    }
    assert!(
        !dir.exists(),
        "the cgroup of an agent that ended for good is removed"
    );
}

#[tokio::test]
async fn nothing_of_agentd_is_left_in_the_hierarchy_after_remove_and_shutdown() {
    if !requires(Need::Cgroups) {
        return;
    }
    let mut daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let kind = cgroups(&mut client).await;
    let root = daemon
        .cgroup_root
        .clone()
        .expect("the ready line names the root");
    let done = spawn(&mut client, "done", sh("exit 0")).await;
    wait_for_state(&mut client, "done", AgentState::Completed).await;
    client
        .remove(pb::RemoveRequest {
            agent_id: "done".into(),
        })
        .await
        .expect("remove");
    assert!(cgroup_dirs(Path::new(&done.cgroup)).is_empty());
    let running = spawn(&mut client, "running", sh("sleep 300")).await;
    assert!(!cgroup_dirs(Path::new(&running.cgroup)).is_empty());
    // A hybrid host has the root in the v2 hierarchy and in v1's; a pure v2 one, once.
    let least = if kind == Containment::CgroupHybrid {
        2
    } else {
        1
    };
    assert!(
        cgroup_dirs(&root).len() >= least,
        "{kind:?}: {:?}",
        cgroup_dirs(&root)
    );
    drop(client);
    assert!(daemon.terminate().await.success());
    assert_eq!(cgroup_dirs(&root), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn memory_max_ends_a_hog_oom_killed_near_its_limit_and_on_failure_restarts_it() {
    if !requires(Need::Cgroups) {
        return;
    }
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    cgroups(&mut client).await;
    let mut events = client
        .watch_agents(pb::WatchAgentsRequest {
            agent_ids: vec!["hog".into()],
            kinds: vec![EventKind::OomKilled as i32, EventKind::Restarting as i32],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let hog =
        "a = []\nwhile True:\n    a.append(bytearray(1 << 20))\n    print(len(a), flush=True)";
    let mut request = with_resources(
        "hog",
        vec!["python3".into(), "-c".into(), hog.into()],
        pb::Resources {
            memory_max_mb: 64.0,
            ..Default::default()
        },
    );
    request.restart_policy = pb::RestartPolicy::OnFailure as i32;
    request.max_restarts = 1;
    let agent = spawn_with(&mut client, request).await;
    let kinds: Vec<i32> = [
        next_event(&mut events).await,
        next_event(&mut events).await,
        next_event(&mut events).await,
    ]
    .iter()
    .map(|event| event.kind)
    .collect();
    assert_eq!(
        kinds,
        [
            EventKind::OomKilled as i32,
            EventKind::Restarting as i32,
            EventKind::OomKilled as i32
        ]
    );
    let ended = wait_for_state(&mut client, "hog", AgentState::Failed).await;
    assert_eq!(ended.end_reason, EndReason::OomKilled as i32, "{ended:#?}");
    assert_eq!(ended.exit_signal, Some(9));
    assert_eq!(ended.restart_count, 1);
    let output = std::fs::read_to_string(Path::new(&agent.agent_dir).join("stdout.log"))
        .expect("the hog's output");
    let reached: u32 = output
        .lines()
        .last()
        .and_then(|line| line.parse().ok())
        .expect("the hog printed what it held");
    assert!(
        (40..=64).contains(&reached),
        "killed at {reached} MB, the limit is 64 MB"
    );
}

#[tokio::test]
async fn pids_max_holds_a_fork_bomb_that_then_stops_cleanly() {
    if !requires(Need::Cgroups) {
        return;
    }
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    cgroups(&mut client).await;
    let bomb = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)";
    let request = with_resources(
        "bomb",
        vec!["python3".into(), "-c".into(), bomb.into()],
        pb::Resources {
            pids_max: 12,
            ..Default::default()
        },
    );
    let agent = spawn_with(&mut client, request).await;
    let dir = unified_dir(&agent.cgroup);
    eventually("the bomb reaches its limit", async || {
        members(&dir).len() == 12
    })
    .await;
    let held = wait_for(&mut client, "bomb", "sampled at its limit", |s| {
        s.num_processes == 12
    })
    .await;
    assert_eq!(held.state, AgentState::Running as i32);
    let tree = members(&dir);
    let [result] = stop(&mut client, &["bomb"], false)
        .await
        .try_into()
        .expect("one");
    assert_ne!(result.outcome, StopOutcome::AlreadyExited as i32);
    for pid in tree {
        assert!(!process_exists(pid), "{pid} outlived the stop");
    }
}

#[tokio::test]
async fn cpu_max_of_half_a_core_holds_a_busy_loop_near_fifty_percent() {
    if !requires(Need::Cgroups) {
        return;
    }
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    cgroups(&mut client).await;
    let mut events = client
        .watch_agents(pb::WatchAgentsRequest {
            agent_ids: vec!["busy".into()],
            kinds: vec![EventKind::Health as i32],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let request = with_resources(
        "busy",
        sh("while :; do :; done"),
        pb::Resources {
            cpu_max_cores: 0.5,
            ..Default::default()
        },
    );
    spawn_with(&mut client, request).await;
    // The first samples cover the start; then ten samples, a second at 100 ms each.
    let mut percents = Vec::new();
    for n in 0..13 {
        let event = next_event(&mut events).await;
        if n >= 3 {
            percents.push(event.status.expect("status").cpu_percent);
        }
    }
    let mean = percents.iter().sum::<f64>() / percents.len() as f64;
    assert!(
        (40.0..=60.0).contains(&mean),
        "mean {mean:.1}% of {percents:?}"
    );
}

#[tokio::test]
async fn cpus_pin_an_agent_with_and_without_cgroups() {
    for options in [&[][..], &["--cgroups", "off"][..]] {
        let daemon = Daemon::builder().options(options).start().await;
        let mut client = daemon.client().await;
        let request = with_resources(
            "pinned",
            vec!["sleep".into(), "300".into()],
            pb::Resources {
                cpus: vec![0],
                ..Default::default()
            },
        );
        let agent = spawn_with(&mut client, request).await;
        assert_eq!(
            proc_status_field(agent.pid as i32, "Cpus_allowed_list:").as_deref(),
            Some("0"),
            "with {options:?}: {agent:#?}"
        );
        kill_all(&mut client).await;
    }
}

#[tokio::test]
async fn pause_freezes_the_whole_tree_resume_thaws_it_and_a_paused_agent_stops_cleanly() {
    if !requires(Need::Cgroups) {
        return;
    }
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    cgroups(&mut client).await;
    let agent = spawn(&mut client, "busy", sh("sleep 1000 & while :; do :; done")).await;
    let dir = unified_dir(&agent.cgroup);
    eventually("both processes run", async || members(&dir).len() == 2).await;
    wait_for(&mut client, "busy", "sampled busy", |s| {
        s.cpu_percent > 50.0
    })
    .await;
    let paused = client
        .pause(pb::PauseRequest {
            agent_ids: vec!["busy".into()],
        })
        .await
        .expect("pause")
        .into_inner()
        .statuses;
    assert_eq!(paused[0].state, AgentState::Paused as i32);
    eventually("the cgroup is frozen", async || {
        event_field(&dir, "frozen").as_deref() == Some("1")
    })
    .await;
    let cpu_time = |pid: i32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let field = |n| stat_field(&stat, n).and_then(|f| f.parse::<u64>().ok());
        field(14).unwrap_or(0) + field(15).unwrap_or(0)
    };
    let frozen_at = cpu_time(agent.pid as i32);
    // Several samples later, the busy loop has had no CPU time.
    let sampled = wait_for(&mut client, "busy", "sampled while paused", |s| {
        s.state == AgentState::Paused as i32 && s.cpu_percent == 0.0
    })
    .await;
    assert_eq!(sampled.num_processes, 2);
    assert_eq!(cpu_time(agent.pid as i32), frozen_at, "a frozen loop ran");

    client
        .resume(pb::ResumeRequest {
            agent_ids: vec!["busy".into()],
        })
        .await
        .expect("resume");
    eventually("the loop runs again", async || {
        cpu_time(agent.pid as i32) > frozen_at
    })
    .await;
    assert_eq!(event_field(&dir, "frozen").as_deref(), Some("0"));

    client
        .pause(pb::PauseRequest {
            agent_ids: vec!["busy".into()],
        })
        .await
        .expect("pause again");
    let [result] = stop(&mut client, &["busy"], false)
        .await
        .try_into()
        .expect("one");
    assert_eq!(
        result.outcome,
        StopOutcome::ExitedOnFirstSignal as i32,
        "{result:?}"
    );
    assert_eq!(result.exit_signal, Some(15));
}

#[tokio::test]
async fn without_cgroups_pause_stops_the_group_and_limits_fall_back_to_setrlimit() {
    let daemon = Daemon::builder()
        .options(&["--cgroups", "off"])
        .start()
        .await;
    let mut client = daemon.client().await;
    let request = with_resources(
        "plain",
        sh("sleep 1000 & exec sleep 1001"),
        pb::Resources {
            memory_max_mb: 512.0,
            open_files_max: 100,
            ..Default::default()
        },
    );
    let agent = spawn_with(&mut client, request).await;
    assert_eq!(agent.containment, Containment::ProcessGroup as i32);
    assert!(agent.cgroup.is_empty());
    assert!(
        agent
            .limit_fallbacks
            .iter()
            .any(|f| f.contains("RLIMIT_AS")),
        "{:?}",
        agent.limit_fallbacks
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.pid)).expect("limits");
    let line = |name: &str| {
        limits
            .lines()
            .find(|line| line.starts_with(name))
            .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert!(line("Max address space").contains(&(512u64 << 20).to_string()));
    assert!(line("Max open files").contains("100 100"));

    let refused = client
        .spawn(with_resources(
            "capped",
            sh("true"),
            pb::Resources {
                cpu_max_cores: 0.5,
                ..Default::default()
            },
        ))
        .await
        .expect_err("a CPU limit without a cgroup is refused");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("cpu_max_cores"), "{refused:?}");

    eventually("both processes run", async || {
        children_of(agent.pid as i32).len() == 1
    })
    .await;
    let group = [agent.pid as i32, children_of(agent.pid as i32)[0].0];
    let state = |pid: i32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat_field(&stat, 3).unwrap_or("?").to_string()
    };
    client
        .pause(pb::PauseRequest {
            agent_ids: vec!["plain".into()],
        })
        .await
        .expect("pause");
    eventually("every process is stopped", async || {
        group.iter().all(|&p| state(p) == "T")
    })
    .await;
    client
        .resume(pb::ResumeRequest {
            agent_ids: vec!["plain".into()],
        })
        .await
        .expect("resume");
    eventually("every process runs again", async || {
        group.iter().all(|&p| state(p) == "S")
    })
    .await;
    kill_all(&mut client).await;
}

#[tokio::test]
async fn an_agent_runs_as_nobody_and_cannot_write_the_data_folder() {
    if !requires(Need::Root) {
        return;
    }
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let intruder = daemon.data_dir.join("intruder");
    let script = format!("id -u; touch {} || echo refused", intruder.display());
    let request = pb::SpawnRequest {
        user: "nobody".into(),
        ..spawn_request("guest", sh(&script))
    };
    let agent = spawn_with(&mut client, request).await;
    assert_eq!(agent.user, "nobody");
    let ended = wait_for_state(&mut client, "guest", AgentState::Completed).await;
    let dir = Path::new(&ended.agent_dir);
    let output = std::fs::read_to_string(dir.join("stdout.log")).expect("output");
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("user database")
        .expect("a nobody user");
    assert_eq!(output, format!("{}\nrefused\n", nobody.uid));
    assert!(!intruder.exists());
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(dir.join("stdout.log"))
        .expect("metadata")
        .uid();
    assert_eq!(owner, nobody.uid.as_raw(), "its output belongs to it");

    let unknown = client
        .spawn(pb::SpawnRequest {
            user: "no-such-user-of-agentd".into(),
            ..spawn_request("ghost", sh("true"))
        })
        .await
        .expect_err("an unknown user is refused");
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert!(unknown.message().contains("no-such-user-of-agentd"));
}

#[tokio::test]
async fn after_a_crash_cgroups_decide_what_is_adopted_and_what_is_killed() {
    if !requires(Need::Cgroups) {
        return;
    }
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    cgroups(&mut client).await;
    let root = daemon.cgroup_root.clone().expect("root");
    let tree = "setsid sleep 3600 & exec sleep 3601";
    let kept = spawn(&mut client, "kept", sh(tree)).await;
    let ended = spawn(&mut client, "ended", sh(tree)).await;
    let (kept_dir, ended_dir) = (unified_dir(&kept.cgroup), unified_dir(&ended.cgroup));
    eventually("both trees run", async || {
        members(&kept_dir).len() == 2 && members(&ended_dir).len() == 2
    })
    .await;
    let ended_tree = members(&ended_dir);
    // A process agentd never started, in a cgroup under its root that no record names.
    let ghost_dir = unified_dir(root.to_str().expect("utf-8")).join("ghost");
    std::fs::create_dir(&ghost_dir).expect("ghost cgroup");
    let mut ghost = std::process::Command::new("sleep")
        .arg("3602")
        .spawn()
        .expect("ghost process");
    std::fs::write(ghost_dir.join("cgroup.procs"), ghost.id().to_string()).expect("join ghost");
    drop(client);

    let dir = daemon.crash();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ended.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill a leader while agentd is down");
    eventually("the leader is gone", async || {
        !process_exists(ended.pid as i32)
    })
    .await;

    let daemon = Daemon::builder().dir(dir).start().await;
    let mut client = daemon.client().await;
    let adopted = wait_for(&mut client, "kept", "adopted with its whole tree", |s| {
        s.num_processes == 2
    })
    .await;
    assert_eq!(
        (adopted.state, adopted.adopted),
        (AgentState::Running as i32, true)
    );
    assert_eq!(adopted.cgroup, kept.cgroup);
    let gone = status(&mut client, "ended").await;
    assert_eq!(gone.state, AgentState::Failed as i32, "{gone:#?}");
    eventually(
        "the strays are killed and their cgroups removed",
        async || {
            ended_tree.iter().all(|&pid| !process_exists(pid))
                && !ended_dir.exists()
                && !ghost_dir.exists()
        },
    )
    .await;
    ghost.wait().expect("reap the ghost");

    let [result] = stop(&mut client, &["kept"], false)
        .await
        .try_into()
        .expect("one");
    assert_eq!(result.outcome, StopOutcome::ExitedOnFirstSignal as i32);
    assert_eq!(members(&kept_dir), Vec::<i32>::new());
}

#[tokio::test]
async fn limits_out_of_range_or_beyond_the_host_are_refused_by_name() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let base = client.clone();
    let refused = |resources: pb::Resources| {
        let mut client = base.clone();
        async move {
            client
                .spawn(with_resources("bad", sh("true"), resources))
                .await
                .expect_err("refused")
        }
    };
    for (resources, field) in [
        (
            pb::Resources {
                memory_max_mb: -1.0,
                ..Default::default()
            },
            "resources.memory_max_mb",
        ),
        (
            pb::Resources {
                cpu_max_cores: 10_000.0,
                ..Default::default()
            },
            "resources.cpu_max_cores",
        ),
        (
            pb::Resources {
                nice: Some(40),
                ..Default::default()
            },
            "resources.nice",
        ),
        (
            pb::Resources {
                cpus: vec![100_000],
                ..Default::default()
            },
            "resources.cpus",
        ),
    ] {
        let status = refused(resources).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{status:?}");
    }
    let summary = client
        .get_summary(pb::GetSummaryRequest {})
        .await
        .expect("summary");
    if summary.into_inner().containment() == Containment::CgroupHybrid {
        let status = refused(pb::Resources {
            memory_high_mb: 100.0,
            ..Default::default()
        })
        .await;
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("memory_high_mb"), "{status:?}");
    }
    let paused = client
        .pause(pb::PauseRequest {
            agent_ids: vec!["nobody-here".into()],
        })
        .await
        .expect_err("an unknown agent");
    assert_eq!(paused.code(), Code::NotFound);
    spawn(&mut client, "done", sh("true")).await;
    wait_for_state(&mut client, "done", AgentState::Completed).await;
    let paused = client
        .pause(pb::PauseRequest {
            agent_ids: vec!["done".into()],
        })
        .await
        .expect_err("an agent that ended");
    assert_eq!(paused.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn a_daemon_that_is_not_root_keeps_process_groups_and_refuses_other_users() {
    if !requires(Need::Root) {
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("user database")
        .expect("a nobody user");
    let daemon = Daemon::builder()
        .run_as(nobody.uid.as_raw(), nobody.gid.as_raw())
        .start()
        .await;
    let mut client = daemon.client().await;
    let summary = client
        .get_summary(pb::GetSummaryRequest {})
        .await
        .expect("summary")
        .into_inner();
    assert_eq!(summary.containment(), Containment::ProcessGroup);
    assert!(
        summary
            .containment_detail
            .contains("cannot use cgroup root"),
        "it says why: {}",
        summary.containment_detail
    );
    let agent = spawn(&mut client, "plain", vec!["sleep".into(), "300".into()]).await;
    assert_eq!(agent.containment, Containment::ProcessGroup as i32);
    let refused = client
        .spawn(pb::SpawnRequest {
            user: "root".into(),
            ..spawn_request("as-root", sh("true"))
        })
        .await
        .expect_err("a user other than agentd's needs root");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("not run as root"), "{refused:?}");
    kill_all(&mut client).await;
}
