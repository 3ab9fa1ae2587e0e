//! What an agent, or another local user, can reach of agentd: written as the attacks a hostile
//! trial tried. Each must fail for the attacker and leave agentd and its records whole.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use agentd_proto::v1 as pb;
use pb::AgentState;
use tonic::Code;

use crate::harness::*;

fn nobody() -> nix::unistd::User {
    nix::unistd::User::from_name("nobody")
        .expect("user database")
        .expect("a nobody user")
}

/// Runs a Python script as `nobody` (and its group) and returns what it printed.
fn python_as_nobody(script: &str) -> String {
    use std::os::unix::process::CommandExt;
    let nobody = nobody();
    let output = Command::new("python3")
        .args(["-c", script])
        .uid(nobody.uid.as_raw())
        .gid(nobody.gid.as_raw())
        .stdin(Stdio::null())
        .output()
        .expect("python3");
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[tokio::test]
async fn a_nobody_agent_gets_three_descriptors_a_clean_environment_and_no_privileges() {
    if !requires(Need::Root) {
        return;
    }
    // Started by clone3 into a cgroup, and by std's fork and exec without one.
    for cgroups in ["auto", "off"] {
        nobody_agent_gets_nothing_of_the_daemon(cgroups).await;
    }
}

async fn nobody_agent_gets_nothing_of_the_daemon(cgroups: &str) {
    let daemon = Daemon::builder()
        .options(&["--pass-env", "AGENTD_TEST_PASSED", "--cgroups", cgroups])
        .env(&[
            ("AGENTD_TEST_SECRET", "s3cret-of-the-daemon"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "authorization=Bearer s3cret-otlp",
            ),
            ("AGENTD_TEST_PASSED", "passed-on"),
        ])
        .start()
        .await;
    let mut client = daemon.client().await;
    // What the attacker had: the keeper's listening socket on descriptor 3.
    let script = "ls /proc/$$/fd; echo end; \
                  grep -E '^(NoNewPrivs|Cap(Inh|Prm|Eff|Bnd|Amb)):' /proc/$$/status; env";
    let request = pb::SpawnRequest {
        user: "nobody".into(),
        env: [("FROM_REQUEST".to_string(), "yes".to_string())].into(),
        ..spawn_request("intruder", sh(script))
    };
    spawn_with(&mut client, request).await;
    let ended = wait_for_state(&mut client, "intruder", AgentState::Completed).await;
    let output =
        std::fs::read_to_string(Path::new(&ended.agent_dir).join("stdout.log")).expect("output");
    let descriptors: Vec<&str> = output.lines().take_while(|line| *line != "end").collect();
    assert_eq!(descriptors, ["0", "1", "2"], "{output}");
    for line in output.lines().filter(|line| line.starts_with("Cap")) {
        assert!(line.ends_with("0000000000000000"), "{line}\n{output}");
    }
    assert!(output.contains("NoNewPrivs:\t1"), "{output}");
    let env: Vec<&str> = output.lines().filter(|line| line.contains('=')).collect();
    assert!(
        !output.contains("s3cret"),
        "a daemon secret reached the agent: {output}"
    );
    for wanted in [
        "USER=nobody",
        "LOGNAME=nobody",
        "AGENTD_TEST_PASSED=passed-on",
        "FROM_REQUEST=yes",
        "AGENTD_AGENT_ID=intruder",
    ] {
        assert!(env.contains(&wanted), "{wanted} missing: {env:?}");
    }
    let home = format!("HOME={}", nobody().dir.display());
    assert!(env.contains(&home.as_str()), "{env:?}");
    // The system's PATH, not agentd's own (which may name root's folders).
    assert!(
        env.contains(&"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        "{env:?}"
    );
}

#[tokio::test]
async fn the_keeper_refuses_a_peer_of_another_user() {
    if !requires(Need::Root) {
        return;
    }
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    spawn(&mut client, "kept", sh("exec sleep 300")).await;
    // As if the folders had been opened to everyone: the keeper still checks who calls.
    use std::os::unix::fs::PermissionsExt;
    let open = |path: &Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    open(daemon.dir.path(), 0o711);
    open(&daemon.data_dir, 0o711);
    let keeper = daemon.data_dir.join("keeper.sock");
    open(&keeper, 0o777);
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.connect({:?})\n\
         s.settimeout(10)\n\
         try:\n\
         \x20   s.sendall(b'\"hello\"\\n')\n\
         \x20   print('answer:', s.recv(65536))\n\
         except (BrokenPipeError, ConnectionResetError):\n\
         \x20   print('answer: closed')\n",
        keeper.display().to_string()
    );
    let answer = python_as_nobody(&script);
    assert!(
        answer.contains("answer: b''") || answer.contains("answer: closed"),
        "{answer}"
    );
    // agentd and its agent are unharmed.
    let kept = status(&mut client, "kept").await;
    assert_eq!(kept.state, AgentState::Running as i32);
    spawn(&mut client, "after", sh("exec sleep 300")).await;
    let keeper_log = std::fs::read_to_string(daemon.data_dir.join("keeper.log")).expect("log");
    assert!(
        keeper_log.contains("refused a peer with uid"),
        "{keeper_log}"
    );
    kill_all(&mut client).await;
}

#[tokio::test]
async fn agent_folders_and_files_are_their_users_alone() {
    if !requires(Need::Root) {
        return;
    }
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let request = pb::SpawnRequest {
        user: "nobody".into(),
        prompt: "the launch codes".into(),
        ..spawn_request("secretive", sh("exec sleep 300"))
    };
    let agent = spawn_with(&mut client, request).await;
    let dir = Path::new(&agent.agent_dir);
    let nobody = nobody();
    let meta = std::fs::metadata(dir).expect("folder");
    assert_eq!(
        (meta.mode() & 0o777, meta.uid()),
        (0o700, nobody.uid.as_raw())
    );
    for file in ["prompt.txt", "stdout.log", "stderr.log"] {
        let meta = std::fs::metadata(dir.join(file)).expect("file");
        assert_eq!(
            (meta.mode() & 0o777, meta.uid()),
            (0o600, nobody.uid.as_raw()),
            "{file}"
        );
    }
    kill_all(&mut client).await;
}

/// agentd's output on a start it refuses, after checking nothing of it runs.
fn refused_start(data_dir: &Path, socket: &Path, extra: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("agentd");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "it started: {stderr}");
    assert!(processes_under(data_dir).is_empty(), "nothing was started");
    stderr
}

#[test]
fn a_data_folder_or_socket_folder_others_control_is_refused() {
    if !requires(Need::Root) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agentd.sock");
    let nobody = nobody();

    // A data folder that nobody owns: nobody could swap `agents/` for a symbolic link.
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).expect("folder");
    std::os::unix::fs::chown(&theirs, Some(nobody.uid.as_raw()), None).expect("chown");
    let said = refused_start(&theirs, &socket, &[]);
    assert!(said.contains("belongs to uid"), "{said}");
    assert!(!theirs.join("agents").exists(), "nothing written into it");

    // One that anyone may write.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).expect("folder");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let said = refused_start(&open, &socket, &[]);
    assert!(said.contains("chmod go-w"), "{said}");

    // A socket folder anyone may write: the socket could be moved away and replaced.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("folder");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let said = refused_start(&dir.path().join("data"), &shared.join("agentd.sock"), &[]);
    assert!(said.contains("its group or others may write"), "{said}");

    // A regular file planted at the socket path stays as it was.
    let planted = dir.path().join("planted.sock");
    std::fs::write(&planted, "precious").expect("plant");
    let said = refused_start(&dir.path().join("data"), &planted, &[]);
    assert!(said.contains("is not a socket"), "{said}");
    assert_eq!(std::fs::read_to_string(&planted).expect("kept"), "precious");
}

#[tokio::test]
async fn an_agent_cannot_turn_its_own_folder_against_agentd_or_the_keeper() {
    if !requires(Need::Root) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let vault = daemon.dir.path().join("vault");
    std::fs::create_dir(&vault).expect("vault");
    let victim = vault.join("victim");
    std::fs::write(&victim, "root's own").expect("victim");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    // Each plants something where agentd or the keeper writes, then exits so that the
    // restart opens it: a link to a root-only file, a FIFO that would block the keeper.
    let plants = [
        (
            "linker",
            format!(
                "cd \"$AGENTD_AGENT_DIR\"; rm -f stdout.log; ln -s {0} stdout.log; \
                 ln -sf {0} error.log; exit 1",
                victim.display()
            ),
        ),
        (
            "piper",
            "cd \"$AGENTD_AGENT_DIR\"; rm -f stderr.log; mkfifo stderr.log; exit 1".to_string(),
        ),
    ];
    for (agent_id, script) in &plants {
        let request = pb::SpawnRequest {
            user: "nobody".into(),
            restart_policy: pb::RestartPolicy::Always as i32,
            max_restarts: 1,
            ..spawn_request(agent_id, sh(script))
        };
        spawn_with(&mut client, request).await;
    }
    for (agent_id, _) in &plants {
        let failed = wait_for_state(&mut client, agent_id, AgentState::Failed).await;
        assert!(
            failed.error.contains("not a regular file") || failed.error.contains("symbolic"),
            "{agent_id}: {}",
            failed.error
        );
    }
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "root's own"
    );
    let meta = std::fs::metadata(&victim).expect("victim");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    // The keeper still answers.
    spawn(&mut client, "after", sh("echo still here")).await;
    let after = wait_for_state(&mut client, "after", AgentState::Completed).await;
    let output = std::fs::read_to_string(Path::new(&after.agent_dir).join("stdout.log"));
    assert_eq!(output.expect("output"), "still here\n");
}

#[tokio::test]
async fn root_is_an_agent_user_only_when_allowed() {
    if !requires(Need::Root) {
        return;
    }
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    for (id, user) in [("as-root", "root"), ("as-zero", "0")] {
        let refused = client
            .spawn(pb::SpawnRequest {
                user: user.into(),
                ..spawn_request(id, sh("true"))
            })
            .await
            .expect_err("root is refused");
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("--allow-users"), "{refused:?}");
        let missing = client
            .status(pb::StatusRequest {
                agent_id: id.into(),
            })
            .await
            .expect_err("nothing stored");
        assert_eq!(missing.code(), Code::NotFound);
    }
    drop(daemon);

    let daemon = Daemon::builder()
        .options(&["--allow-users", "root,nobody"])
        .start()
        .await;
    let mut client = daemon.client().await;
    let request = pb::SpawnRequest {
        user: "root".into(),
        ..spawn_request(
            "as-root",
            sh("grep -E '^(CapEff|NoNewPrivs)' /proc/$$/status"),
        )
    };
    spawn_with(&mut client, request).await;
    let ended = wait_for_state(&mut client, "as-root", AgentState::Completed).await;
    let output =
        std::fs::read_to_string(Path::new(&ended.agent_dir).join("stdout.log")).expect("output");
    // Even as root, an agent with a `user` has no capability to use.
    assert!(output.contains("CapEff:\t0000000000000000"), "{output}");
    assert!(output.contains("NoNewPrivs:\t1"), "{output}");
    let refused = client
        .spawn(pb::SpawnRequest {
            user: "daemon".into(),
            ..spawn_request("as-daemon", sh("true"))
        })
        .await
        .expect_err("a user left out of the list");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // A group is one of the user's own, listed or not: not root's, not the password file's.
    for group in ["0", "shadow"] {
        let refused = client
            .spawn(pb::SpawnRequest {
                user: "nobody".into(),
                group: group.into(),
                ..spawn_request("as-group", sh("true"))
            })
            .await
            .expect_err("a group the user is not in");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("not a member"), "{refused:?}");
    }
}

#[tokio::test]
async fn the_socket_group_reaches_the_default_socket_path() {
    if !requires(Need::Root) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let data_dir = dir.path().join("data");
    let socket = data_dir.join("agentd.sock");
    let group = nix::unistd::Group::from_gid(nobody().gid)
        .expect("group database")
        .expect("nobody's group");
    let daemon = Daemon::builder()
        .dir(dir)
        .options(&[
            "--socket",
            socket.to_str().expect("path"),
            "--socket-group",
            &group.name,
        ])
        .start()
        .await;
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.connect({:?})\n\
         print('connected')\n",
        socket.display().to_string()
    );
    let said = python_as_nobody(&script);
    assert!(said.contains("connected"), "{said}");
    // It can pass through the data folder, not list it.
    let listing = python_as_nobody(&format!(
        "import os\ntry:\n    print(os.listdir({:?}))\nexcept PermissionError:\n    print('refused')\n",
        daemon.data_dir.display().to_string()
    ));
    assert!(listing.contains("refused"), "{listing}");
}

#[tokio::test]
async fn nul_bytes_and_invalid_utf8_are_invalid_arguments_and_nothing_is_stored() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    for (field, request) in [
        (
            "agent_name",
            pb::SpawnRequest {
                agent_name: "bad\0name".into(),
                ..spawn_request("nul-name", sh("true"))
            },
        ),
        (
            "model",
            pb::SpawnRequest {
                model: "gpt\0".into(),
                ..spawn_request("nul-model", sh("true"))
            },
        ),
    ] {
        let agent_id = request.agent_id.clone();
        let refused = client.spawn(request).await.expect_err("refused");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(field), "{refused:?}");
        let missing = client
            .status(pb::StatusRequest { agent_id })
            .await
            .expect_err("nothing stored");
        assert_eq!(missing.code(), Code::NotFound);
    }

    // A SpawnRequest whose agent_name (field 4) is not UTF-8, as a raw client could send.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawSpawn {
        #[prost(string, tag = "2")]
        agent_id: String,
        #[prost(bytes = "vec", tag = "4")]
        agent_name: Vec<u8>,
        #[prost(string, repeated, tag = "9")]
        command: Vec<String>,
    }
    let channel =
        tonic::transport::Endpoint::from_shared(format!("unix://{}", daemon.socket.display()))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let raw = RawSpawn {
        agent_id: "not-utf8".into(),
        agent_name: vec![b'a', 0xff, 0xfe],
        command: vec!["true".into()],
    };
    let refused = grpc
        .unary::<_, pb::SpawnResponse, _>(
            tonic::Request::new(raw),
            "/agentd.v1.AgentSupervisor/Spawn".parse().expect("path"),
            agentd_proto::Codec::default(),
        )
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("SpawnRequest"), "{refused:?}");
    let missing = client
        .status(pb::StatusRequest {
            agent_id: "not-utf8".into(),
        })
        .await
        .expect_err("nothing stored");
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn a_spawn_that_fails_in_the_child_leaves_no_cgroup() {
    if !requires(Need::Cgroups) {
        return;
    }
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let root = daemon
        .cgroup_root
        .clone()
        .expect("agentd manages cgroups on this host");
    // A folder is no program: execve fails in the child, after its cgroup was made.
    let refused = client
        .spawn(spawn_request("not-a-program", vec!["/tmp/".into()]))
        .await
        .expect_err("refused");
    assert_ne!(refused.code(), Code::Ok);
    let leftovers: Vec<_> = cgroup_dirs(&root)
        .into_iter()
        .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("not-a-program"))
        .collect();
    assert!(leftovers.is_empty(), "cgroups left behind: {leftovers:?}");
}

#[tokio::test]
async fn agentctl_prints_what_agents_control_without_terminal_escapes() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let request = pb::SpawnRequest {
        agent_name: "\u{1b}]0;pwned\u{7}name".into(),
        ..spawn_request(
            "escapist",
            sh("printf '\\033[2J\\033]0;owned\\007log line\\n'; exit 3"),
        )
    };
    spawn_with(&mut client, request).await;
    wait_for_state(&mut client, "escapist", AgentState::Failed).await;
    for args in [
        &["describe", "escapist"][..],
        &["watch", "--after", "0", "--replay-only"][..],
        &["status", "escapist"][..],
    ] {
        let output = Command::new(agentctl_path())
            .arg("--socket")
            .arg(&daemon.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("agentctl");
        let printed = [output.stdout, output.stderr].concat();
        assert!(
            !printed.iter().any(|&byte| byte == 0x1b || byte == 0x07),
            "{args:?} printed a terminal escape: {}",
            String::from_utf8_lossy(&printed)
        );
    }
}
