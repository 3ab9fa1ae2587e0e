//! Per-agent history: recent samples over gRPC (GetAgentHistory) and HTTP, one per sampling
//! interval, kept after the run ends, filtered by time.

use std::time::{Duration, SystemTime};

use agentd_proto::v1 as pb;
use pb::AgentState;
use tonic::Code;

use crate::harness::*;

async fn history(client: &mut Client, agent_id: &str) -> pb::GetAgentHistoryResponse {
    client
        .get_agent_history(pb::GetAgentHistoryRequest {
            agent_id: agent_id.into(),
            since: None,
        })
        .await
        .expect("history")
        .into_inner()
}

#[tokio::test]
async fn samples_are_kept_per_interval_and_survive_the_run() {
    let daemon = Daemon::builder()
        .options(&["--http-listen", "127.0.0.1:0"])
        .start()
        .await;
    let mut client = daemon.client().await;
    // 48 MiB held, then idle: the idle samples change nothing and are still read back at
    // each interval.
    let script = "b = bytearray(48 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n\
                  import time\nprint('ready', flush=True)\ntime.sleep(60)";
    spawn(
        &mut client,
        "hist",
        vec!["python3".into(), "-c".into(), script.into()],
    )
    .await;

    let kept = eventually("ten samples show the memory", async || {
        let kept = history(&mut client, "hist").await;
        let big = kept.samples.iter().filter(|s| s.memory_mb > 48.0).count();
        if big >= 10 { Ok(kept) } else { Err(kept) }
    })
    .await;
    assert_eq!(kept.agent_id, "hist");
    assert_eq!(seconds(kept.interval.as_ref()), 0.1);
    assert_eq!(seconds(kept.window.as_ref()), 600.0);
    let times: Vec<SystemTime> = kept
        .samples
        .iter()
        .map(|s| system_time(s.time.as_ref()))
        .collect();
    for pair in times.windows(2) {
        let step = pair[1].duration_since(pair[0]).expect("oldest first");
        assert!(
            step >= Duration::from_millis(50) && step < Duration::from_millis(400),
            "one sample per interval: {times:?}"
        );
    }
    let last = kept.samples.last().expect("a sample");
    assert!(last.num_threads >= 1 && last.num_processes == 1, "{last:?}");

    // `since` keeps the newer samples only; HTTP answers the same message.
    let cut = times[times.len() - 3];
    let since = client
        .get_agent_history(pb::GetAgentHistoryRequest {
            agent_id: "hist".into(),
            since: Some(agentd_proto::Timestamp {
                seconds: cut
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .expect("after 1970")
                    .as_secs() as i64,
                nanos: cut
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .expect("after 1970")
                    .subsec_nanos() as i32,
            }),
        })
        .await
        .expect("history since")
        .into_inner();
    assert!(
        (3..=8).contains(&since.samples.len()),
        "{}",
        since.samples.len()
    );
    assert!(
        since
            .samples
            .iter()
            .all(|s| system_time(s.time.as_ref()) >= cut)
    );
    let http = daemon.http();
    let over_http = http.get("/v1/agents/hist/history").await;
    assert_eq!(over_http.status, 200, "{}", over_http.text());
    let json = over_http.json();
    assert_eq!(json["agentId"], "hist");
    assert_eq!(json["interval"], "0.100s");
    assert!(json["samples"].as_array().is_some_and(|s| s.len() >= 10));
    assert!(json["samples"][0]["memoryMb"].is_number());

    // An ended run keeps its samples and is not extended past its last one.
    stop(&mut client, &["hist"], true).await;
    wait_for_state(&mut client, "hist", AgentState::Killed).await;
    let ended = history(&mut client, "hist").await;
    let again = history(&mut client, "hist").await;
    assert!(ended.samples.len() >= 10);
    assert_eq!(ended.samples, again.samples);
    let ended_at = system_time(status(&mut client, "hist").await.ended_at.as_ref());
    assert!(
        ended
            .samples
            .iter()
            .all(|s| system_time(s.time.as_ref()) <= ended_at)
    );
    // Its last sample is its end: nothing runs.
    let end = ended.samples.last().expect("a sample");
    assert_eq!((end.num_processes, end.num_threads), (0, 0), "{end:?}");
    assert_eq!((end.cpu_percent, end.memory_mb), (0.0, 0.0), "{end:?}");
    let off_by = ended_at
        .duration_since(system_time(end.time.as_ref()))
        .expect("not after the end");
    assert!(off_by < Duration::from_millis(1), "{off_by:?}");

    // Bad questions.
    let unknown = client
        .get_agent_history(pb::GetAgentHistoryRequest {
            agent_id: "nobody".into(),
            since: None,
        })
        .await
        .expect_err("unknown agent");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let bad_time = client
        .get_agent_history(pb::GetAgentHistoryRequest {
            agent_id: "hist".into(),
            since: Some(agentd_proto::Timestamp {
                seconds: 1,
                nanos: -5,
            }),
        })
        .await
        .expect_err("negative nanos");
    assert_eq!(bad_time.code(), Code::InvalidArgument, "{bad_time:?}");
    let bad_query = http.get("/v1/agents/hist/history?since=yesterday").await;
    assert_eq!(bad_query.status, 400, "{}", bad_query.text());
}

#[tokio::test]
async fn history_off_is_a_clear_precondition() {
    let daemon = Daemon::builder().options(&["--history", "0"]).start().await;
    let mut client = daemon.client().await;
    spawn(&mut client, "quiet", sh("sleep 30")).await;
    let off = client
        .get_agent_history(pb::GetAgentHistoryRequest {
            agent_id: "quiet".into(),
            since: None,
        })
        .await
        .expect_err("no history kept");
    assert_eq!(off.code(), Code::FailedPrecondition, "{off:?}");
    assert!(off.message().contains("--history 0"), "{off:?}");
    kill_all(&mut client).await;
}

#[tokio::test]
async fn the_gap_between_runs_reads_as_nothing_running() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    // The first run fails after half a second; the restart waits a second; the second runs on.
    let marker = daemon.data_dir.join("ran-once");
    let script = format!(
        "[ -e {m} ] && exec sleep 30; touch {m}; sleep 0.5; exit 1",
        m = marker.display()
    );
    let mut request = spawn_request("gappy", sh(&script));
    request.restart_policy = pb::RestartPolicy::OnFailure as i32;
    request.restart_backoff = Some(pb::RestartBackoff {
        initial: Some(Duration::from_secs(1).into()),
        ..Default::default()
    });
    spawn_with(&mut client, request).await;

    // Processes per sample, once the second run has been sampled.
    let processes: Vec<u32> = eventually("the second run is sampled", async || {
        let kept = history(&mut client, "gappy").await;
        let processes: Vec<u32> = kept.samples.iter().map(|s| s.num_processes).collect();
        let second_run = processes
            .iter()
            .skip_while(|&&n| n > 0)
            .skip_while(|&&n| n == 0)
            .any(|&n| n > 0);
        if second_run {
            Ok(processes)
        } else {
            Err(processes)
        }
    })
    .await;
    let first: Vec<u32> = processes.iter().copied().take_while(|&n| n > 0).collect();
    let gap = processes[first.len()..]
        .iter()
        .take_while(|&&n| n == 0)
        .count();
    assert!(!first.is_empty(), "{processes:?}");
    // A second's backoff (less its jitter) at one sample per 0.1 s.
    assert!(
        gap >= 5,
        "the backoff reads as nothing running: {processes:?}"
    );
    kill_all(&mut client).await;
}
