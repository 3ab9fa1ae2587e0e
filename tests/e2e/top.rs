//! `agentctl top` in a real terminal (tmux): it shows the agents, a key sorts them, and `s`
//! then `y` stops the selected one. It talks to agentd over TCP (`--addr`).

use std::process::Command;

use agentd_proto::v1 as pb;

use crate::harness::*;

/// One tmux server per test (its own socket name), killed when the test ends.
struct Tmux {
    server: String,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let tmux = Tmux {
            server: format!("agentd-top-{}", std::process::id()),
        };
        let started = tmux
            .run(&[
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "160",
                "-y",
                "40",
                command,
            ])
            .status
            .success();
        assert!(started, "tmux new-session");
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

    fn session_alive(&self) -> bool {
        self.run(&["has-session", "-t", "top"]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The rows of the agent table, in order: the first word of each line that names an agent.
fn order(screen: &str, agents: &[&str]) -> Vec<String> {
    screen
        .lines()
        .filter_map(|line| {
            let first = line
                .trim_start_matches(['▶', ' '])
                .split_whitespace()
                .next()?;
            agents.contains(&first).then(|| first.to_string())
        })
        .collect()
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
    let tmux = Tmux::start(&format!(
        "{} --addr {address} top",
        agentctl_path().display()
    ));
    let screen = tmux
        .wait("the three agents by id", |screen| {
            order(screen, &agents) == agents && screen.contains("live")
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
        screen
            .lines()
            .any(|line| line.contains("a-small") && line.contains("$0.0015"))
    })
    .await;

    // `m` sorts by memory, largest first (the selection stays on its agent); `g` goes to the
    // top row, and the output pane follows the selected agent.
    tmux.keys(&["m"]);
    tmux.wait("the agents by memory", |screen| {
        order(screen, &agents) == ["c-large", "b-medium", "a-small"] && screen.contains("memory↓")
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
