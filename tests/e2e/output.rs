//! Agent output over gRPC: tail, follow, resume by offset, rotation, binary, Remove and
//! retention.

use agentd_proto::v1 as pb;
use pb::{AgentState, LogStream};
use tonic::Code;

use crate::harness::*;

fn logs_request(agent_id: &str, stream: LogStream) -> pb::StreamLogsRequest {
    pb::StreamLogsRequest {
        agent_id: agent_id.into(),
        stream: stream as i32,
        ..Default::default()
    }
}

/// Reads a whole (non-following or ending) stream: the bytes of each stream, checking that
/// every chunk starts where the previous one of its stream ended.
async fn read_logs(
    client: &mut Client,
    request: pb::StreamLogsRequest,
) -> Result<(Vec<u8>, Vec<u8>), tonic::Status> {
    let first_out = request.stdout_offset;
    let first_err = request.stderr_offset;
    let mut chunks = client.stream_logs(request).await?.into_inner();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut next_out, mut next_err) = (first_out, first_err);
    while let Some(chunk) = tokio::time::timeout(DEADLINE, chunks.message())
        .await
        .expect("output within the deadline")?
    {
        let (buffer, next) = if chunk.stream == LogStream::Stdout as i32 {
            (&mut out, &mut next_out)
        } else {
            (&mut err, &mut next_err)
        };
        if let Some(expected) = *next {
            assert_eq!(chunk.offset, expected, "a gap or an overlap between chunks");
        }
        *next = Some(chunk.offset + chunk.data.len() as u64);
        buffer.extend_from_slice(&chunk.data);
    }
    Ok((out, err))
}

fn numbered(range: std::ops::RangeInclusive<u32>) -> String {
    range.map(|i| format!("line {i}\n")).collect()
}

#[tokio::test]
async fn tail_and_offsets_return_exactly_the_asked_bytes() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    spawn(
        &mut client,
        "printer",
        sh("i=1; while [ $i -le 100 ]; do echo \"line $i\"; i=$((i+1)); done; echo oops >&2"),
    )
    .await;
    wait_for_state(&mut client, "printer", AgentState::Completed).await;

    let tail = pb::StreamLogsRequest {
        tail: 5,
        ..logs_request("printer", LogStream::Stdout)
    };
    let (out, _) = read_logs(&mut client, tail).await.expect("tail");
    assert_eq!(String::from_utf8_lossy(&out), numbered(96..=100));

    let (all, err) = read_logs(&mut client, logs_request("printer", LogStream::Unspecified))
        .await
        .expect("both");
    assert_eq!(String::from_utf8_lossy(&all), numbered(1..=100));
    assert_eq!(err, b"oops\n");

    // Resuming from any offset gives exactly the rest: no gap, no duplicate.
    let middle = numbered(1..=40).len() as u64;
    let resumed = pb::StreamLogsRequest {
        stdout_offset: Some(middle),
        ..logs_request("printer", LogStream::Stdout)
    };
    let (rest, _) = read_logs(&mut client, resumed).await.expect("resume");
    assert_eq!(String::from_utf8_lossy(&rest), numbered(41..=100));

    let past_end = pb::StreamLogsRequest {
        stdout_offset: Some(all.len() as u64 + 1),
        ..logs_request("printer", LogStream::Stdout)
    };
    let error = read_logs(&mut client, past_end)
        .await
        .expect_err("past the end");
    assert_eq!(error.code(), Code::OutOfRange);
    let both = pb::StreamLogsRequest {
        tail: 1,
        stdout_offset: Some(0),
        ..logs_request("printer", LogStream::Stdout)
    };
    let error = read_logs(&mut client, both)
        .await
        .expect_err("tail and offset");
    assert_eq!(error.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn follow_sends_new_output_and_closes_after_the_agent_ends() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let agent = spawn(
        &mut client,
        "talker",
        sh("echo first; while [ ! -e go ]; do sleep 0.02; done; echo second; echo third"),
    )
    .await;
    let request = pb::StreamLogsRequest {
        follow: true,
        ..logs_request("talker", LogStream::Stdout)
    };
    let mut chunks = client
        .stream_logs(request)
        .await
        .expect("follow")
        .into_inner();
    let mut received = Vec::new();
    while received != b"first\n" {
        let chunk = tokio::time::timeout(DEADLINE, chunks.message())
            .await
            .expect("first line")
            .expect("stream")
            .expect("open");
        received.extend_from_slice(&chunk.data);
    }
    std::fs::write(std::path::Path::new(&agent.agent_dir).join("go"), "").expect("go");
    let rest = tokio::time::timeout(DEADLINE, async {
        let mut rest = Vec::new();
        while let Some(chunk) = chunks.message().await.expect("stream") {
            rest.extend_from_slice(&chunk.data);
        }
        rest
    })
    .await
    .expect("the stream closes once the agent has ended");
    assert_eq!(rest, b"second\nthird\n");
}

#[tokio::test]
async fn binary_output_passes_through_untouched() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let agent = spawn(
        &mut client,
        "binary",
        sh("head -c 100000 /dev/urandom | tee expected.bin"),
    )
    .await;
    wait_for_state(&mut client, "binary", AgentState::Completed).await;
    let expected = std::fs::read(std::path::Path::new(&agent.agent_dir).join("expected.bin"))
        .expect("expected");
    let (out, _) = read_logs(&mut client, logs_request("binary", LogStream::Stdout))
        .await
        .expect("logs");
    assert_eq!(out.len(), 100_000);
    assert!(out == expected, "the bytes changed on the way");
}

#[tokio::test]
async fn rotation_keeps_its_files_and_a_follower_misses_nothing() {
    let daemon = Daemon::builder()
        .options(&["--log-max-bytes", "16K", "--log-keep", "3"])
        .start()
        .await;
    let mut client = daemon.client().await;
    // About 600 KB, written over a second or so: many rotations at one sample per 100 ms.
    let pad = "x".repeat(100);
    let script = format!(
        "i=1; while [ $i -le 5000 ]; do echo \"line $i {pad}\"; \
         [ $((i % 250)) = 0 ] && sleep 0.05; i=$((i+1)); done; \
         while [ ! -e done ]; do sleep 0.02; done"
    );
    let agent = spawn(&mut client, "chatty", sh(&script)).await;
    let request = pb::StreamLogsRequest {
        follow: true,
        ..logs_request("chatty", LogStream::Stdout)
    };
    let mut chunks = client
        .stream_logs(request)
        .await
        .expect("follow")
        .into_inner();
    let expected: String = (1..=5000).map(|i| format!("line {i} {pad}\n")).collect();
    let mut received = Vec::new();
    let mut next_offset = 0;
    while received.len() < expected.len() {
        let chunk = tokio::time::timeout(DEADLINE, chunks.message())
            .await
            .expect("output within the deadline")
            .expect("stream healthy")
            .expect("open");
        assert_eq!(
            chunk.offset, next_offset,
            "a gap or an overlap across a rotation"
        );
        next_offset += chunk.data.len() as u64;
        received.extend_from_slice(&chunk.data);
    }
    assert!(
        String::from_utf8_lossy(&received) == expected,
        "the follower's copy differs"
    );

    let dir = std::path::Path::new(&agent.agent_dir);
    let segments = || {
        std::fs::read_dir(dir)
            .expect("folder")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("stdout.log."))
            .count()
    };
    eventually("the last rotations are done", async || segments() == 3).await;
    std::fs::write(dir.join("done"), "").expect("done");
    wait_for_state(&mut client, "chatty", AgentState::Completed).await;
    assert_eq!(segments(), 3);
    // The oldest output was rotated away for good.
    let from_start = pb::StreamLogsRequest {
        stdout_offset: Some(0),
        ..logs_request("chatty", LogStream::Stdout)
    };
    let gone = read_logs(&mut client, from_start)
        .await
        .expect_err("rotated away");
    assert_eq!(gone.code(), Code::OutOfRange);
    assert!(gone.message().contains("resume from"), "{}", gone.message());
}

#[tokio::test]
async fn a_fast_writer_is_not_slowed_and_the_daemon_stays_small() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    spawn(&mut client, "firehose", sh("head -c 100000000 /dev/zero")).await;
    wait_for_state(&mut client, "firehose", AgentState::Completed).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).expect("status");
    let rss_kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    assert!(
        rss_kb < 64 * 1024,
        "agentd holds {rss_kb} kB after 100 MB of output"
    );
    let tail = pb::StreamLogsRequest {
        stdout_offset: Some(100_000_000 - 10),
        ..logs_request("firehose", LogStream::Stdout)
    };
    let (end, _) = read_logs(&mut client, tail)
        .await
        .expect("the end of the output");
    assert_eq!(end, vec![0u8; 10]);
}

#[tokio::test]
async fn remove_refuses_a_running_agent_and_cleans_an_ended_one() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let running = spawn(&mut client, "busy", vec!["sleep".into(), "300".into()]).await;
    let refused = client
        .remove(pb::RemoveRequest {
            agent_id: "busy".into(),
        })
        .await
        .expect_err("running");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(std::path::Path::new(&running.agent_dir).exists());

    stop(&mut client, &["busy"], true).await;
    let removed = client
        .remove(pb::RemoveRequest {
            agent_id: "busy".into(),
        })
        .await
        .expect("remove")
        .into_inner()
        .status
        .expect("status");
    assert_eq!(removed.state, AgentState::Killed as i32);
    let dir = std::path::PathBuf::from(&running.agent_dir);
    assert!(!dir.exists(), "the folder is moved away at once");
    let trash = daemon.data_dir.join("trash");
    eventually("the folder is deleted", async || {
        std::fs::read_dir(&trash).is_ok_and(|mut entries| entries.next().is_none())
    })
    .await;
    let gone = client
        .status(pb::StatusRequest {
            agent_id: "busy".into(),
        })
        .await
        .expect_err("removed");
    assert_eq!(gone.code(), Code::NotFound);
    // The id is free again, at once.
    let again = spawn(&mut client, "busy", vec!["sleep".into(), "300".into()]).await;
    assert_eq!(again.agent_dir, running.agent_dir);
    stop(&mut client, &["busy"], true).await;
    let removed_again = client
        .remove(pb::RemoveRequest {
            agent_id: "busy".into(),
        })
        .await
        .expect("remove again");
    drop(removed_again);
    spawn(&mut client, "busy", vec!["true".into()]).await;
    wait_for_state(&mut client, "busy", AgentState::Completed).await;
    assert!(
        dir.exists(),
        "the folder of the new agent was deleted with the old one"
    );
    let missing = client
        .remove(pb::RemoveRequest {
            agent_id: "nobody".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn retention_removes_the_oldest_finished_agents() {
    let daemon = Daemon::builder()
        .options(&["--retain-finished-count", "2"])
        .start()
        .await;
    let mut client = daemon.client().await;
    let mut dirs = Vec::new();
    for i in 0..4 {
        let id = format!("done-{i}");
        dirs.push(spawn(&mut client, &id, vec!["true".into()]).await.agent_dir);
        wait_for_state(&mut client, &id, AgentState::Completed).await;
    }
    spawn(&mut client, "running", vec!["sleep".into(), "300".into()]).await;
    let listed = || async {
        let mut client = daemon.client().await;
        client
            .list_agents(pb::ListAgentsRequest::default())
            .await
            .expect("list")
            .into_inner()
            .agents
            .into_iter()
            .map(|a| a.agent_id)
            .collect::<Vec<_>>()
    };
    eventually("retention removes the oldest", async || {
        let listed = listed().await;
        if listed == ["done-2", "done-3", "running"] {
            Ok(())
        } else {
            Err(listed)
        }
    })
    .await;
    for dir in &dirs[..2] {
        let dir = std::path::PathBuf::from(dir);
        eventually("a removed agent's folder is deleted", async || {
            !dir.exists()
        })
        .await;
    }
    stop(&mut client, &["running"], true).await;

    let aged = Daemon::builder()
        .options(&["--retain-finished-age", "300ms"])
        .start()
        .await;
    let mut client = aged.client().await;
    spawn(&mut client, "short-lived", vec!["true".into()]).await;
    wait_for(&mut client, "short-lived", "completed", |s| {
        s.state == AgentState::Completed as i32
    })
    .await;
    eventually("it is removed after its age", async || {
        let answer = client
            .status(pb::StatusRequest {
                agent_id: "short-lived".into(),
            })
            .await;
        matches!(answer, Err(status) if status.code() == Code::NotFound)
    })
    .await;
}
