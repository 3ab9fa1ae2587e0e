//! `agentctl top` in a real terminal (tmux): it shows the agents, live ones before those that
//! ended, a key sorts them, j/k move the selection, and keys stop, kill, pause, resume,
//! restart and remove the selected one (with `y` to confirm where it ends or deletes). At 80
//! columns it leaves out whole columns rather than cutting one. It talks to agentd over TCP
//! (`--addr`).

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use agentd_proto::v1 as pb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::*;

/// One tmux server per test (its own socket name), killed when the test ends.
struct Tmux {
    server: String,
    socket: Option<String>,
}

impl Tmux {
    /// `command` in a terminal of `columns` x `rows`.
    fn start(command: &str, columns: u16, rows: u16) -> Tmux {
        static SERVERS: AtomicUsize = AtomicUsize::new(0);
        let mut tmux = Tmux {
            server: format!(
                "agentd-top-{}-{}",
                std::process::id(),
                SERVERS.fetch_add(1, Ordering::Relaxed)
            ),
            socket: None,
        };
        let (columns, rows) = (columns.to_string(), rows.to_string());
        let started = tmux
            .run(&[
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                &columns,
                "-y",
                &rows,
                command,
            ])
            .status
            .success();
        assert!(started, "tmux new-session");
        let socket = tmux.run(&["display-message", "-p", "-t", "top", "#{socket_path}"]);
        tmux.socket = Some(String::from_utf8_lossy(&socket.stdout).trim().to_string());
        tmux
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.server])
            .args(args)
            .output()
            .expect("tmux (tests/setup.sh installs it)")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend(keys);
        assert!(self.run(&args).status.success(), "tmux send-keys");
    }

    /// Polls the screen until `done` holds, failing at the deadline.
    async fn wait(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        eventually(&format!("the screen shows {what}"), async || {
            let screen = self.screen();
            if done(&screen) {
                Ok(screen)
            } else {
                Err(Shown(screen))
            }
        })
        .await
    }

    /// Moves the selection to `agent` with `g` and `j`s, as a user would.
    async fn select(&self, agent: &str) {
        let screen = self
            .wait(&format!("{agent} in the table"), |screen| {
                row(screen, agent).is_some()
            })
            .await;
        let below = order(&screen).iter().position(|a| a == agent);
        self.keys(&["g"]);
        self.wait("the first row selected", |screen| {
            selected(screen).is_some() && selected(screen) == order(screen).first().cloned()
        })
        .await;
        for _ in 0..below.expect("shown") {
            self.keys(&["j"]);
        }
        self.wait(&format!("{agent} selected"), |screen| {
            selected(screen).as_deref() == Some(agent)
        })
        .await;
    }

    fn session_alive(&self) -> bool {
        self.run(&["has-session", "-t", "top"]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
        // A tmux server that ends leaves its socket file behind.
        if let Some(socket) = &self.socket {
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// The lines of the agent table: after its header, before the output pane.
fn table(screen: &str) -> impl Iterator<Item = &str> {
    screen
        .lines()
        .skip_while(|line| !line.trim_start().starts_with("AGENT"))
        .skip(1)
        .take_while(|line| !line.starts_with('┌'))
}

/// The table's header line.
fn header(screen: &str) -> &str {
    screen
        .lines()
        .find(|line| line.trim_start().starts_with("AGENT"))
        .unwrap_or("")
}

/// The agent a table line shows: its first word.
fn agent_of(line: &str) -> Option<&str> {
    line.trim_start_matches(['▶', ' ', '└'])
        .split_whitespace()
        .next()
}

/// The agents of the table, in order.
fn order(screen: &str) -> Vec<String> {
    table(screen)
        .filter_map(agent_of)
        .map(str::to_string)
        .collect()
}

/// The agent of the selected row (marked `▶`).
fn selected(screen: &str) -> Option<String> {
    table(screen)
        .find(|line| line.starts_with('▶'))
        .and_then(agent_of)
        .map(str::to_string)
}

/// The table line of `agent`.
fn row<'a>(screen: &'a str, agent: &str) -> Option<&'a str> {
    table(screen).find(|line| agent_of(line) == Some(agent))
}

/// The line shows a whole peak memory: `peak 9.4`.
fn shows_peak(line: &str) -> bool {
    line.split_once("peak ").is_some_and(|(_, after)| {
        let figure = after.split_whitespace().next().unwrap_or("");
        figure
            .split_once('.')
            .is_some_and(|(whole, tenth)| whole.parse::<u32>().is_ok() && tenth.len() == 1)
    })
}

/// What the agent has written so far.
async fn output_of(client: &mut Client, agent: &str) -> String {
    let request = pb::StreamLogsRequest {
        agent_id: agent.into(),
        ..Default::default()
    };
    let mut stream = client
        .stream_logs(request)
        .await
        .expect("StreamLogs")
        .into_inner();
    let mut output = Vec::new();
    while let Some(chunk) = stream.message().await.expect("its output") {
        output.extend(chunk.data);
    }
    String::from_utf8_lossy(&output).into()
}

#[tokio::test]
async fn top_shows_agents_sorts_on_a_key_and_stops_the_selected_one() {
    if !requires(Need::Tmux) {
        return;
    }
    let daemon = Daemon::builder()
        .options(&["--listen", "127.0.0.1:0"])
        .start()
        .await;
    let mut client = daemon.client().await;
    let hold = |mib: u32| {
        vec![
            "python3".to_string(),
            "-c".into(),
            format!(
                "b = bytearray({mib} << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n\
                 print('holding {mib} MiB', flush=True)\nimport time\ntime.sleep(300)"
            ),
        ]
    };
    // Ids in one order, memory in the other.
    spawn(&mut client, "a-small", hold(8)).await;
    spawn(&mut client, "b-medium", hold(40)).await;
    spawn(&mut client, "c-large", hold(90)).await;
    let agents = ["a-small", "b-medium", "c-large"];
    for agent in agents {
        wait_for(&mut client, agent, "holding its memory", |s| {
            s.memory_mb > 8.0
        })
        .await;
    }

    let address = daemon.grpc_address.clone().expect("gRPC over TCP");
    let tmux = Tmux::start(
        &format!("{} --addr {address} top", agentctl_path().display()),
        160,
        40,
    );
    // By CPU at first: all idle, so by id.
    let screen = tmux
        .wait("the three agents by id", |screen| {
            order(screen) == agents && screen.contains("live")
        })
        .await;
    assert!(screen.contains("3 running"), "{screen}");
    // What an agent spent (here reported by itself) shows in its row.
    client
        .report_usage(pb::ReportUsageRequest {
            agent_id: "a-small".into(),
            model: "openai/gpt-x".into(),
            usage: Some(pb::Usage {
                cost_micros: 1500,
                ..Default::default()
            }),
        })
        .await
        .expect("ReportUsage");
    tmux.wait("the agent's spend", |screen| {
        row(screen, "a-small").is_some_and(|row| row.contains("$0.0015"))
    })
    .await;

    // `m` sorts by memory, largest first (the selection stays on its agent); `g` goes to the
    // top row, and the output pane follows the selected agent.
    tmux.keys(&["m"]);
    tmux.wait("the agents by memory", |screen| {
        order(screen) == ["c-large", "b-medium", "a-small"] && screen.contains("memory↓")
    })
    .await;
    tmux.keys(&["g"]);
    tmux.wait("the selected agent's output", |screen| {
        screen.contains("output of c-large") && screen.contains("holding 90 MiB")
    })
    .await;

    // `s` asks, `y` stops the selected agent (the largest) with its ladder.
    tmux.keys(&["s"]);
    tmux.wait("the confirmation", |screen| {
        screen.contains("c-large? y to confirm")
    })
    .await;
    tmux.keys(&["y"]);
    wait_for_state(&mut client, "c-large", pb::AgentState::Killed).await;
    tmux.wait("the stopped agent", |screen| {
        screen.contains("c-large stopped")
    })
    .await;
    for agent in ["a-small", "b-medium"] {
        assert_eq!(
            status(&mut client, agent).await.state,
            pb::AgentState::Running as i32
        );
    }

    tmux.keys(&["q"]);
    eventually("top quits on `q`", async || !tmux.session_alive()).await;
    kill_all(&mut client).await;
}

#[tokio::test]
async fn top_at_80x24_lists_live_agents_first_and_acts_on_keys() {
    live_first_and_keys(80, 24).await;
}

#[tokio::test]
async fn top_at_160x40_lists_live_agents_first_and_acts_on_keys() {
    live_first_and_keys(160, 40).await;
}

/// Two agents that ended (code 3, signal 9) with ids before two live ones: top lists the live
/// ones first, whole cells at this size, j/k/g/G select, and p, R, d, K act on the selected
/// agent, checked over gRPC.
async fn live_first_and_keys(columns: u16, rows: u16) {
    if !requires(Need::Tmux) {
        return;
    }
    let daemon = Daemon::builder()
        .options(&["--listen", "127.0.0.1:0"])
        .start()
        .await;
    let mut client = daemon.client().await;
    // Exits with code 3 on SIGUSR1.
    let python = vec![
        "python3".to_string(),
        "-c".into(),
        "import signal, sys, time\n\
         signal.signal(signal.SIGUSR1, lambda *_: sys.exit(3))\n\
         print('up', flush=True)\ntime.sleep(300)"
            .into(),
    ];
    let (ended, live) = (["a-code3", "b-signal9"], ["c-live", "d-live"]);
    for agent in ended.iter().chain(&live) {
        spawn(&mut client, agent, python.clone()).await;
        // Its handler set, and its memory sampled for a peak.
        eventually(&format!("{agent} is up"), async || {
            output_of(&mut client, agent).await == "up\n"
        })
        .await;
        wait_for(&mut client, agent, "sampled", |s| s.memory_mb > 0.0).await;
    }
    for (agent, signal) in [("a-code3", Signal::SIGUSR1), ("b-signal9", Signal::SIGKILL)] {
        let pid = status(&mut client, agent).await.pid;
        kill(Pid::from_raw(pid as i32), signal).expect("signal the agent");
    }
    let a = wait_for_state(&mut client, "a-code3", pb::AgentState::Failed).await;
    let b = wait_for_state(&mut client, "b-signal9", pb::AgentState::Failed).await;
    assert_eq!((a.exit_code, b.exit_signal), (Some(3), Some(9)));
    assert!(a.peak_memory_mb > 0.0 && b.peak_memory_mb > 0.0);

    let address = daemon.grpc_address.clone().expect("gRPC over TCP");
    let tmux = Tmux::start(
        &format!("{} --addr {address} top", agentctl_path().display()),
        columns,
        rows,
    );
    // By default (CPU, largest first), the live agents come first.
    let screen = tmux
        .wait("the live agents first", |screen| {
            let order = order(screen);
            order.len() == 4
                && live.iter().all(|a| order[..2].contains(&a.to_string()))
                && ended.iter().all(|a| order[2..].contains(&a.to_string()))
        })
        .await;
    // Whole cells: the compact exit, the state, a peak memory that says it is one.
    for title in ["AGENT", "STATE", "EXIT", "CPU%", "MEM MiB", "RUNTIME"] {
        assert!(header(&screen).contains(title), "{title}:\n{screen}");
    }
    for (agent, exit) in [("a-code3", "code 3"), ("b-signal9", "signal 9")] {
        let line = row(&screen, agent).expect("shown");
        assert!(
            line.contains(" failed ") && line.contains(exit) && shows_peak(line),
            "{agent}:\n{screen}"
        );
    }
    for agent in live {
        let line = row(&screen, agent).expect("shown");
        assert!(
            line.contains(" running ") && !line.contains("peak"),
            "{screen}"
        );
    }
    assert!(
        screen.contains("j/k"),
        "the footer lists the keys:\n{screen}"
    );

    // By id the ended agents would come first: live ones stay ahead of them.
    tmux.keys(&["i"]);
    tmux.wait("live agents, then ended ones, by id", |screen| {
        order(screen) == ["c-live", "d-live", "a-code3", "b-signal9"]
            && screen.contains("sort id↑ (live first)")
    })
    .await;

    // j and k move the selection, G and g go to the last and first rows; the output pane
    // follows.
    tmux.keys(&["g"]);
    tmux.wait("the first row selected", |screen| {
        selected(screen).as_deref() == Some("c-live") && screen.contains("output of c-live")
    })
    .await;
    tmux.keys(&["j"]);
    tmux.wait("j: the next row selected", |screen| {
        selected(screen).as_deref() == Some("d-live") && screen.contains("output of d-live")
    })
    .await;
    tmux.keys(&["k"]);
    tmux.wait("k: the row above selected", |screen| {
        selected(screen).as_deref() == Some("c-live")
    })
    .await;
    tmux.keys(&["G"]);
    tmux.wait("G: the last row selected", |screen| {
        selected(screen).as_deref() == Some("b-signal9")
    })
    .await;

    // `p` pauses the selected agent, and again resumes it.
    tmux.select("c-live").await;
    tmux.keys(&["p"]);
    wait_for_state(&mut client, "c-live", pb::AgentState::Paused).await;
    tmux.wait("c-live paused", |screen| {
        row(screen, "c-live").is_some_and(|line| line.contains(" paused "))
    })
    .await;
    tmux.keys(&["p"]);
    wait_for_state(&mut client, "c-live", pb::AgentState::Running).await;
    tmux.wait("c-live resumed", |screen| screen.contains("c-live resumed"))
        .await;

    // `R` asks, `y` restarts: the agent that exited with code 3 runs again, among the live.
    tmux.select("a-code3").await;
    tmux.keys(&["R"]);
    tmux.wait("the restart question", |screen| {
        screen.contains("Restart a-code3? y to confirm")
    })
    .await;
    tmux.keys(&["y"]);
    wait_for(&mut client, "a-code3", "running again", |s| {
        s.state == pb::AgentState::Running as i32 && s.restart_count == 1
    })
    .await;
    tmux.wait("a-code3 among the live agents", |screen| {
        order(screen) == ["a-code3", "c-live", "d-live", "b-signal9"]
            && screen.contains("a-code3 restarted")
    })
    .await;

    // `d` asks, `y` removes the agent that ended; a running one the server refuses to
    // remove, and top says why.
    tmux.select("b-signal9").await;
    tmux.keys(&["d"]);
    tmux.wait("the remove question", |screen| {
        screen.contains("b-signal9? y to")
    })
    .await;
    tmux.keys(&["y"]);
    eventually("b-signal9 is removed", async || {
        let answer = client
            .status(pb::StatusRequest {
                agent_id: "b-signal9".into(),
            })
            .await;
        answer.is_err_and(|status| status.code() == tonic::Code::NotFound)
    })
    .await;
    tmux.wait("the table without b-signal9", |screen| {
        order(screen) == ["a-code3", "c-live", "d-live"] && screen.contains("b-signal9 removed")
    })
    .await;
    tmux.select("d-live").await;
    tmux.keys(&["d"]);
    tmux.wait("the remove question", |screen| {
        screen.contains("d-live? y to")
    })
    .await;
    tmux.keys(&["y"]);
    tmux.wait("the server's refusal", |screen| {
        screen.contains("cannot remove d-live:") && screen.contains("has not ended")
    })
    .await;
    assert_eq!(
        status(&mut client, "d-live").await.state,
        pb::AgentState::Running as i32
    );

    // `K` asks, `y` kills.
    tmux.keys(&["K"]);
    tmux.wait("the kill question", |screen| {
        screen.contains("d-live? y to")
    })
    .await;
    tmux.keys(&["y"]);
    wait_for_state(&mut client, "d-live", pb::AgentState::Killed).await;
    tmux.wait("d-live killed, after the live agents", |screen| {
        order(screen) == ["a-code3", "c-live", "d-live"]
            && row(screen, "d-live").is_some_and(|line| line.contains("signal 9"))
    })
    .await;

    tmux.keys(&["q"]);
    eventually("top quits on `q`", async || !tmux.session_alive()).await;
    kill_all(&mut client).await;
}
