//! Sandboxed agents, written as the escapes a hostile agent would try: its files, agentd's
//! sockets and other agents' folders, the network around the proxy, system calls that would
//! change the host, and a sub-agent asking for more than its parent. None needs the agent's
//! cooperation: each probe is an ordinary program doing what it should not.

use std::collections::HashMap;
use std::path::Path;

use agentd_proto::v1 as pb;
use pb::AgentState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::harness::*;

/// The system's Python: the one on agentd's PATH may live under /root, out of a sandbox.
const PYTHON: &str = "/usr/bin/python3";

/// A probe prints `name=ok ...` or `name=denied ...` per attempt.
const PROBE: &str = r#"
import os, socket, sys
def attempt(name, f):
    try:
        print(f"{name}=ok {f()!r}"[:300])
    except Exception as e:
        print(f"{name}=denied {type(e).__name__} {e}"[:300])
    sys.stdout.flush()
"#;

fn python(script: &str) -> Vec<String> {
    vec![PYTHON.into(), "-c".into(), format!("{PROBE}\n{script}")]
}

/// The probe's answers by name.
fn answers(status: &pb::AgentStatus) -> HashMap<String, String> {
    let output = std::fs::read_to_string(Path::new(&status.agent_dir).join("stdout.log"))
        .expect("stdout.log");
    let errors = std::fs::read_to_string(Path::new(&status.agent_dir).join("stderr.log"))
        .unwrap_or_default();
    let answers: HashMap<String, String> = output
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, answer)| (name.to_string(), answer.to_string()))
        .collect();
    assert!(!answers.is_empty(), "no answers: {output}\n{errors}");
    answers
}

fn ok(answers: &HashMap<String, String>, name: &str) -> String {
    let answer = answers
        .get(name)
        .unwrap_or_else(|| panic!("no `{name}` in {answers:#?}"));
    assert!(answer.starts_with("ok"), "`{name}` should work: {answer}");
    answer.clone()
}

fn denied(answers: &HashMap<String, String>, name: &str) {
    let answer = answers
        .get(name)
        .unwrap_or_else(|| panic!("no `{name}` in {answers:#?}"));
    assert!(
        answer.starts_with("denied"),
        "`{name}` should be refused: {answer}"
    );
}

fn sandbox() -> pb::Sandbox {
    pb::Sandbox::default()
}

/// What GetSummary says this host offers for sandboxes.
async fn support(client: &mut Client) -> pb::SandboxSupport {
    client
        .get_summary(pb::GetSummaryRequest::default())
        .await
        .expect("summary")
        .into_inner()
        .sandbox
        .expect("sandbox support")
}

/// Asks the kernel's audit (over netlink, as `auditctl -e` does) whether it is on, and turns
/// it on or off.
const AUDIT: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 9)
s.bind((0, 0))
s.send(struct.pack("IHHII", 16, 1000, 1, 1, 0))
print(struct.unpack("II", s.recv(8192)[16:24])[1])
if len(sys.argv) > 1:
    status = struct.pack("8I", 1, int(sys.argv[1]), 0, 0, 0, 0, 0, 0)
    s.send(struct.pack("IHHII", 16 + len(status), 1001, 5, 2, 0) + status)
    sys.exit(struct.unpack("i", s.recv(8192)[16:20])[0] != 0)
"#;

/// The kernel's audit on (Landlock reports denials only then) while it lives, as it was
/// after.
struct AuditOn(String);

impl AuditOn {
    fn new() -> AuditOn {
        let run = |args: &[&str]| {
            let out = std::process::Command::new(PYTHON)
                .args(["-c", AUDIT])
                .args(args)
                .output()
                .expect("python");
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        AuditOn(run(&["1"]))
    }
}

impl Drop for AuditOn {
    fn drop(&mut self) {
        let _ = std::process::Command::new(PYTHON)
            .args(["-c", AUDIT, &self.0])
            .output();
    }
}

#[tokio::test]
async fn a_sandboxed_agent_reads_and_writes_only_what_it_was_given() {
    if !requires(Need::Root) {
        return;
    }
    let _audit = AuditOn::new();
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    // Another agent, unsandboxed, whose prompt and output are its own.
    let victim = spawn_with(
        &mut client,
        pb::SpawnRequest {
            prompt: "the victim's secret prompt".into(),
            ..spawn_request("victim", sh("sleep 30"))
        },
    )
    .await;
    // Outside /tmp (which a sandboxed agent has its own of): a planted secret, a folder it
    // may read, and one it may write.
    let host = tempfile::Builder::new()
        .prefix("agentd-sandbox-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let secret = host.path().join("secret.txt");
    std::fs::write(&secret, "the host's secret").expect("secret");
    let given = tempfile::tempdir_in("/var/tmp").expect("given");
    std::fs::write(given.path().join("notes.txt"), "given to read").expect("notes");
    let writable = tempfile::tempdir_in("/var/tmp").expect("writable");
    let data_dir = daemon.dir.path();
    let script = r#"
E = os.environ
attempt("read_secret", lambda: open(E["SECRET"]).read())
attempt("read_given", lambda: open(E["GIVEN"] + "/notes.txt").read())
attempt("write_given", lambda: open(E["GIVEN"] + "/notes.txt", "a").write("x"))
attempt("write_outside", lambda: open(E["OUTSIDE"] + "/planted", "w").write("x"))
attempt("write_etc", lambda: open("/etc/agentd-sandbox-planted", "w").write("x"))
attempt("write_usr", lambda: open("/usr/lib/agentd-sandbox-planted", "w").write("x"))
attempt("write_own", lambda: open(E["AGENTD_AGENT_DIR"] + "/mine", "w").write("x"))
attempt("write_writable", lambda: open(E["WRITABLE"] + "/made", "w").write("x"))
attempt("write_tmp", lambda: open("/tmp/scratch", "w").write("x"))
attempt("read_shadow", lambda: open("/etc/shadow").read())
attempt("read_passwd", lambda: open("/etc/passwd").read()[:5])
attempt("read_victim_prompt", lambda: open(E["VICTIM"] + "/prompt.txt").read())
attempt("read_victim_output", lambda: open(E["VICTIM"] + "/stdout.log").read())
attempt("list_agents", lambda: os.listdir(E["AGENTS"]))
attempt("read_store", lambda: os.listdir(E["DATA"] + "/store"))
attempt("agentd_socket", lambda: socket.socket(socket.AF_UNIX).connect(E["SOCKET"]))
attempt("keeper_socket", lambda: socket.socket(socket.AF_UNIX).connect(E["KEEPER"]))
attempt("root_home", lambda: os.listdir("/root"))
attempt("via_proc_root", lambda: os.listdir("/proc/1/root/"))
attempt("home", lambda: E["HOME"])
"#;
    let env = [
        ("SECRET", secret.display().to_string()),
        ("GIVEN", given.path().display().to_string()),
        ("OUTSIDE", host.path().display().to_string()),
        ("WRITABLE", writable.path().display().to_string()),
        ("VICTIM", victim.agent_dir.clone()),
        ("AGENTS", data_dir.join("agents").display().to_string()),
        ("DATA", data_dir.display().to_string()),
        ("SOCKET", data_dir.join("agentd.sock").display().to_string()),
        ("KEEPER", data_dir.join("keeper.sock").display().to_string()),
    ];
    let request = pb::SpawnRequest {
        env: env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        sandbox: Some(pb::Sandbox {
            read_paths: vec![given.path().display().to_string()],
            write_paths: vec![writable.path().display().to_string()],
            ..sandbox()
        }),
        ..spawn_request("boxed", python(script))
    };
    spawn_with(&mut client, request).await;
    let ended = wait_for_state(&mut client, "boxed", AgentState::Completed).await;
    let answers = answers(&ended);
    for name in [
        "read_secret",
        "write_given",
        "write_outside",
        "write_etc",
        "write_usr",
        "read_victim_prompt",
        "read_victim_output",
        "read_store",
        "agentd_socket",
        "keeper_socket",
        "via_proc_root",
    ] {
        denied(&answers, name);
    }
    assert_eq!(ok(&answers, "read_given"), "ok 'given to read'");
    for name in ["write_own", "write_writable", "write_tmp", "read_passwd"] {
        ok(&answers, name);
    }
    // Covered, or refused: never the host's hashes.
    let shadow = &answers["read_shadow"];
    assert!(!shadow.contains("root:"), "{shadow}");
    // Only its own folder is in view under agents/.
    let listed = &answers["list_agents"];
    assert!(!listed.contains("victim"), "{listed}");
    let root = &answers["root_home"];
    assert!(root == "ok []" || root.starts_with("denied"), "{root}");
    assert_eq!(ok(&answers, "home"), format!("ok '{}'", ended.agent_dir));
    // Nothing it tried reached the host.
    assert!(!host.path().join("planted").exists());
    assert!(!Path::new("/etc/agentd-sandbox-planted").exists());
    assert!(!Path::new("/usr/lib/agentd-sandbox-planted").exists());
    assert!(!Path::new("/tmp/scratch").exists() || !is_agents(Path::new("/tmp/scratch")));
    assert!(writable.path().join("made").exists());
    assert_eq!(
        std::fs::read_to_string(given.path().join("notes.txt")).expect("notes"),
        "given to read"
    );
    // With the kernel's audit on, Landlock reported its refusals (ABI 7 and later), and
    // agentd counted them for this agent.
    let support = support(&mut client).await;
    assert_eq!(
        support.file_denials_counted,
        support.landlock_abi >= 7,
        "{support:?}"
    );
    if support.file_denials_counted {
        let counted = wait_for(&mut client, "boxed", "counted its refused files", |s| {
            s.denials.is_some_and(|d| d.files >= 3)
        })
        .await;
        assert_eq!(counted.denials.map(|d| d.syscalls), Some(0));
    }
    assert_eq!(status(&mut client, "victim").await.denials, None);
    kill_all(&mut client).await;
}

/// Whether a file in the host's /tmp holds what the agent wrote in its own.
fn is_agents(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| text == "x")
}

/// A loopback HTTP server that answers every request with `body`, and its port.
async fn upstream(body: &'static str) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buffer = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    port
}

/// Python that reaches `host:port` through the proxy with CONNECT and says what it got.
const THROUGH_PROXY: &str = r#"
import urllib.request
P = int(os.environ["PORT"])
def via_proxy(host, port=P):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    line = head.split(b"\r\n")[0].decode()
    if not line.startswith("HTTP/1.1 200"):
        raise PermissionError(line)
    s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n\r\n", 1)[-1].decode()
"#;

#[tokio::test]
async fn a_proxy_agent_reaches_allowed_hosts_only_and_every_refusal_is_an_event() {
    if !requires(Need::Root) {
        return;
    }
    let port = upstream("hello from upstream").await;
    let daemon = Daemon::builder()
        .options(&[
            "--egress-resolve",
            "allowed.test=127.0.0.1,denied.test=127.0.0.1,later.test=127.0.0.1",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .start()
        .await;
    let mut client = daemon.client().await;
    let mut events = client
        .watch_agents(pb::WatchAgentsRequest {
            agent_ids: vec!["net".into()],
            kinds: vec![
                pb::EventKind::EgressDenied as i32,
                pb::EventKind::Exited as i32,
                pb::EventKind::Failed as i32,
            ],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let script = r#"
attempt("allowed", lambda: via_proxy("allowed.test"))
attempt("plain_http", lambda: urllib.request.urlopen(f"http://allowed.test:{P}/", timeout=10).read().decode())
attempt("denied", lambda: via_proxy("denied.test"))
attempt("loopback_name", lambda: via_proxy("localhost"))
attempt("ip_literal", lambda: via_proxy("127.0.0.1"))
attempt("direct", lambda: socket.create_connection(("127.0.0.1", P), timeout=5))
attempt("resolve", lambda: socket.getaddrinfo("example.com", 443))
import time
deadline = time.time() + 60
while True:
    try:
        print("later=ok " + via_proxy("later.test"))
        break
    except Exception as e:
        if time.time() > deadline:
            print(f"later=denied {e}")
            break
        time.sleep(0.05)
"#;
    let request = pb::SpawnRequest {
        env: [("PORT".to_string(), port.to_string())].into(),
        sandbox: Some(pb::Sandbox {
            network: pb::NetworkMode::Proxy as i32,
            allow_hosts: vec![format!("allowed.test:{port}"), "localhost".into()],
            ..sandbox()
        }),
        ..spawn_request("net", python(&format!("{THROUGH_PROXY}\n{script}")))
    };
    spawn_with(&mut client, request).await;
    // Each refusal is an event naming the host and port; the agent keeps trying later.test
    // until UpdateSandbox allows it.
    let mut refused = Vec::new();
    loop {
        let event = next_event(&mut events).await;
        assert_eq!(event.kind, pb::EventKind::EgressDenied as i32, "{event:?}");
        let denied = event.denied.expect("the refused connection");
        refused.push(denied.host.clone());
        if denied.host == "later.test" {
            assert_eq!(denied.port, u32::from(port));
            break;
        }
    }
    for host in ["denied.test", "localhost", "127.0.0.1"] {
        assert!(refused.contains(&host.to_string()), "{refused:?}");
    }
    let updated = client
        .update_sandbox(pb::UpdateSandboxRequest {
            agent_id: "net".into(),
            allow_hosts: vec![format!("allowed.test:{port}"), "later.test".into()],
        })
        .await
        .expect("UpdateSandbox")
        .into_inner()
        .status
        .expect("status");
    let allowed = updated.sandbox.expect("sandbox").allow_hosts;
    assert!(allowed.contains(&"later.test".to_string()), "{allowed:?}");
    // The same change over REST, repeated: the answer shows the hosts.
    let answer = daemon
        .http()
        .post(
            "/v1/agents/net:sandbox",
            serde_json::json!({ "allowHosts": allowed }),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let shown = &answer.json()["status"]["sandbox"]["allowHosts"];
    assert!(shown.to_string().contains("later.test"), "{shown}");
    let ended = wait_for_state(&mut client, "net", AgentState::Completed).await;
    let answers = answers(&ended);
    assert_eq!(ok(&answers, "allowed"), "ok 'hello from upstream'");
    assert_eq!(ok(&answers, "plain_http"), "ok 'hello from upstream'");
    assert_eq!(answers["later"], "ok hello from upstream");
    for name in ["denied", "loopback_name", "ip_literal", "direct", "resolve"] {
        denied(&answers, name);
    }
    assert!(answers["denied"].contains("403"), "{answers:?}");
    let egress = ended.egress.expect("egress counts");
    assert!(egress.allowed >= 3, "{egress:?}");
    assert!(egress.denied >= 4, "{egress:?}");
    assert!(egress.bytes_down > 0 && egress.bytes_up > 0, "{egress:?}");
}

#[tokio::test]
async fn a_network_none_agent_has_only_its_own_loopback() {
    if !requires(Need::Root) {
        return;
    }
    let port = upstream("unreachable").await;
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let script = r#"
P = int(os.environ["PORT"])
attempt("host_loopback", lambda: socket.create_connection(("127.0.0.1", P), timeout=5))
attempt("proxy", lambda: socket.create_connection(("127.0.0.1", 3128), timeout=5))
attempt("resolve", lambda: socket.getaddrinfo("example.com", 443))
attempt("proxy_env", lambda: os.environ.get("HTTPS_PROXY", "none"))
def own_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname(), timeout=5)
    return "connected"
attempt("own_loopback", own_loopback)
"#;
    let request = pb::SpawnRequest {
        env: [("PORT".to_string(), port.to_string())].into(),
        sandbox: Some(pb::Sandbox {
            network: pb::NetworkMode::None as i32,
            ..sandbox()
        }),
        ..spawn_request("offline", python(script))
    };
    spawn_with(&mut client, request).await;
    let ended = wait_for_state(&mut client, "offline", AgentState::Completed).await;
    let answers = answers(&ended);
    for name in ["host_loopback", "proxy", "resolve"] {
        denied(&answers, name);
    }
    assert_eq!(ok(&answers, "proxy_env"), "ok 'none'");
    assert_eq!(ok(&answers, "own_loopback"), "ok 'connected'");
    assert!(ended.egress.is_none(), "no proxy, no counts");
}

#[tokio::test]
async fn a_sandboxed_agent_cannot_change_the_host_or_touch_other_processes() {
    if !requires(Need::Root) {
        return;
    }
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let mut events = client
        .watch_agents(pb::WatchAgentsRequest {
            agent_ids: vec!["prober".into()],
            kinds: vec![pb::EventKind::SandboxDenied as i32],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let sibling = spawn_with(
        &mut client,
        pb::SpawnRequest {
            sandbox: Some(sandbox()),
            ..spawn_request("sibling", sh("sleep 30"))
        },
    )
    .await;
    let script = r#"
import ctypes, errno, subprocess
libc = ctypes.CDLL(None, use_errno=True)
def call(name, f):
    ctypes.set_errno(0)
    result = f()
    code = ctypes.get_errno()
    print(f"{name}=" + ("ok" if result >= 0 else "denied " + errno.errorcode.get(code, str(code))))
SIBLING, AGENTD = int(os.environ["SIBLING"]), int(os.environ["AGENTD"])
call("mount", lambda: libc.mount(b"none", b"/mnt", b"tmpfs", 0, None))
call("unshare_user", lambda: libc.unshare(0x10000000))
call("unshare_net", lambda: libc.unshare(0x40000000))
call("ptrace_sibling", lambda: libc.ptrace(16, SIBLING, None, None))
call("kill_sibling", lambda: libc.kill(SIBLING, 0))
call("kill_agentd", lambda: libc.kill(AGENTD, 0))
call("bpf", lambda: libc.syscall(321, 0, None, 0))
call("keyctl", lambda: libc.syscall(250, 0, 0, 0, 0, 0))
call("perf_event_open", lambda: libc.syscall(298, None, 0, -1, -1, 0))
call("kexec_load", lambda: libc.syscall(246, 0, 0, None, 0))
call("init_module", lambda: libc.syscall(175, None, 0, b""))
call("x32_mount", lambda: libc.syscall(0x40000000 | 165, b"none", b"/mnt", b"tmpfs", 0, None))
call("fork", lambda: os.waitpid(os.fork(), 0)[0] if True else 0)
setuid = subprocess.run(["/usr/bin/mount", "-t", "tmpfs", "none", "/mnt"], capture_output=True)
print(f"setuid_mount={'ok' if setuid.returncode == 0 else 'denied ' + str(setuid.returncode)}")
status = open("/proc/self/status").read()
caps = [line for line in status.splitlines() if line.startswith(("Cap", "NoNewPrivs", "Seccomp:"))]
print("caps=ok " + " ".join(caps))
"#;
    let request = pb::SpawnRequest {
        env: [
            ("SIBLING".to_string(), sibling.pid.to_string()),
            ("AGENTD".to_string(), daemon.pid().to_string()),
        ]
        .into(),
        sandbox: Some(sandbox()),
        ..spawn_request("prober", python(script))
    };
    spawn_with(&mut client, request).await;
    let ended = wait_for_state(&mut client, "prober", AgentState::Completed).await;
    let answers = answers(&ended);
    for name in [
        "mount",
        "unshare_user",
        "unshare_net",
        "ptrace_sibling",
        "kill_sibling",
        "kill_agentd",
        "bpf",
        "keyctl",
        "perf_event_open",
        "kexec_load",
        "init_module",
        "x32_mount",
        "setuid_mount",
    ] {
        denied(&answers, name);
    }
    // Its own children are its own.
    ok(&answers, "fork");
    let caps = &answers["caps"];
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            caps.contains(&format!("{set}:\t0000000000000000")),
            "{caps}"
        );
    }
    assert!(caps.contains("NoNewPrivs:\t1"), "{caps}");
    assert!(caps.contains("Seccomp:\t2"), "{caps}");
    // The sibling lives on.
    assert_eq!(
        status(&mut client, "sibling").await.state,
        AgentState::Running as i32
    );
    // The kernel reported every refused call (the ten above, and the setuid program's),
    // and agentd counted them for the prober and told its watchers which.
    let support = support(&mut client).await;
    assert!(support.syscall_denials_counted, "{support:?}");
    wait_for(&mut client, "prober", "counted its refused calls", |s| {
        s.denials.is_some_and(|d| d.syscalls >= 10)
    })
    .await;
    let mut named = Vec::new();
    while !named.iter().any(|m: &String| m.ends_with(": mount")) {
        let event = next_event(&mut events).await;
        assert_eq!(event.kind, pb::EventKind::SandboxDenied as i32, "{event:?}");
        named.push(event.message);
    }
    assert!(
        named.iter().all(|m| m.starts_with("system call refused: ")),
        "{named:?}"
    );
    assert_eq!(
        status(&mut client, "sibling")
            .await
            .denials
            .map(|d| d.syscalls),
        Some(0)
    );
    kill_all(&mut client).await;
}

#[tokio::test]
async fn a_sub_agent_never_gets_more_than_its_parent() {
    if !requires(Need::Root) {
        return;
    }
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let given = tempfile::tempdir_in("/var/tmp").expect("given");
    let elsewhere = tempfile::tempdir_in("/var/tmp").expect("elsewhere");
    spawn_with(
        &mut client,
        pb::SpawnRequest {
            sandbox: Some(pb::Sandbox {
                allow_hosts: vec!["*.example.com".into(), "api.example.org:443".into()],
                read_paths: vec![given.path().display().to_string()],
                ..sandbox()
            }),
            ..spawn_request("parent", sh("sleep 30"))
        },
    )
    .await;
    let child = |agent_id: &str, sandbox: Option<pb::Sandbox>| pb::SpawnRequest {
        parent_agent_id: "parent".into(),
        sandbox,
        ..spawn_request(agent_id, sh("sleep 30"))
    };
    let wider = [
        (
            pb::Sandbox {
                allow_hosts: vec!["evil.test".into()],
                ..sandbox()
            },
            "allow_hosts: `evil.test`",
        ),
        (
            pb::Sandbox {
                allow_hosts: vec!["api.example.org".into()],
                ..sandbox()
            },
            "allow_hosts: `api.example.org`",
        ),
        (
            pb::Sandbox {
                network: pb::NetworkMode::Host as i32,
                ..sandbox()
            },
            "network HOST is wider",
        ),
        (
            pb::Sandbox {
                read_paths: vec![elsewhere.path().display().to_string()],
                ..sandbox()
            },
            "read_paths: its parent may not read",
        ),
        (
            pb::Sandbox {
                write_paths: vec![given.path().display().to_string()],
                ..sandbox()
            },
            "write_paths: its parent may not write",
        ),
        (
            pb::Sandbox {
                allow_namespaces: true,
                ..sandbox()
            },
            "allow_namespaces",
        ),
    ];
    for (index, (sandbox, named)) in wider.into_iter().enumerate() {
        let error = client
            .spawn(child(&format!("wider-{index}"), Some(sandbox)))
            .await
            .expect_err("wider than its parent");
        assert_eq!(error.code(), Code::PermissionDenied, "{error:?}");
        assert!(error.message().contains(named), "{}", error.message());
        assert!(error.message().contains("parent"), "{}", error.message());
    }
    // Narrower is fine, and no sandbox at all means its parent's.
    let narrower = spawn_with(
        &mut client,
        child(
            "narrower",
            Some(pb::Sandbox {
                network: pb::NetworkMode::Proxy as i32,
                allow_hosts: vec!["docs.example.com".into()],
                ..sandbox()
            }),
        ),
    )
    .await;
    assert_eq!(
        narrower.sandbox.expect("sandbox").allow_hosts,
        ["docs.example.com"]
    );
    let inherited = spawn_with(&mut client, child("inherited", None)).await;
    let inherited = inherited.sandbox.expect("its parent's sandbox");
    assert_eq!(
        inherited.allow_hosts,
        ["*.example.com", "api.example.org:443"]
    );
    // A grandchild may not widen what its parent was narrowed to.
    let error = client
        .spawn(pb::SpawnRequest {
            parent_agent_id: "narrower".into(),
            sandbox: Some(pb::Sandbox {
                allow_hosts: vec!["www.example.com".into()],
                ..sandbox()
            }),
            ..spawn_request("grandchild", sh("sleep 30"))
        })
        .await
        .expect_err("wider than its parent");
    assert_eq!(error.code(), Code::PermissionDenied, "{error:?}");
    // UpdateSandbox may not widen a child either.
    let error = client
        .update_sandbox(pb::UpdateSandboxRequest {
            agent_id: "narrower".into(),
            allow_hosts: vec!["evil.test".into()],
        })
        .await
        .expect_err("wider than its parent");
    assert_eq!(error.code(), Code::PermissionDenied, "{error:?}");
    kill_all(&mut client).await;
}

#[tokio::test]
async fn no_agent_may_be_given_agentds_own_files_and_bad_policies_are_refused() {
    if !requires(Need::Root) {
        return;
    }
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let data = daemon.dir.path().display().to_string();
    let refused = [
        (
            pb::Sandbox {
                read_paths: vec!["/".into()],
                ..sandbox()
            },
            Code::PermissionDenied,
            "agentd's own",
        ),
        (
            pb::Sandbox {
                write_paths: vec![data.clone()],
                ..sandbox()
            },
            Code::PermissionDenied,
            "agentd's own",
        ),
        (
            pb::Sandbox {
                read_paths: vec!["relative/path".into()],
                ..sandbox()
            },
            Code::InvalidArgument,
            "not an absolute path",
        ),
        (
            pb::Sandbox {
                read_paths: vec!["/no/such/folder".into()],
                ..sandbox()
            },
            Code::InvalidArgument,
            "/no/such/folder",
        ),
        (
            pb::Sandbox {
                allow_hosts: vec!["10.0.0.1".into()],
                ..sandbox()
            },
            Code::InvalidArgument,
            "allow_hosts",
        ),
        (
            pb::Sandbox {
                network: pb::NetworkMode::None as i32,
                allow_hosts: vec!["example.com".into()],
                ..sandbox()
            },
            Code::InvalidArgument,
            "network PROXY",
        ),
        (
            pb::Sandbox {
                network: 42,
                ..sandbox()
            },
            Code::InvalidArgument,
            "NetworkMode",
        ),
    ];
    for (sandbox, code, named) in refused {
        let error = client
            .spawn(pb::SpawnRequest {
                sandbox: Some(sandbox.clone()),
                ..spawn_request("refused", sh("true"))
            })
            .await
            .expect_err(&format!("{sandbox:?}"));
        assert_eq!(error.code(), code, "{error:?}");
        assert!(error.message().contains(named), "{}", error.message());
    }
    let listed = client
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.agents.is_empty(), "nothing stored: {listed:?}");
    // What the host offers is in the summary.
    let summary = client
        .get_summary(pb::GetSummaryRequest {})
        .await
        .expect("summary")
        .into_inner();
    let support = summary.sandbox.expect("sandbox support");
    assert!(support.landlock_abi >= 1, "{support:?}");
    assert!(support.privileged && support.seccomp, "{support:?}");
}

#[tokio::test]
async fn default_sandbox_confines_agents_that_name_none() {
    if !requires(Need::Root) {
        return;
    }
    let daemon = Daemon::builder()
        .options(&["--default-sandbox"])
        .start()
        .await;
    let mut client = daemon.client().await;
    let script = r#"
attempt("agentd_socket", lambda: socket.socket(socket.AF_UNIX).connect(os.environ["SOCKET"]))
attempt("proxy", lambda: os.environ["HTTPS_PROXY"])
"#;
    let socket = daemon.dir.path().join("agentd.sock").display().to_string();
    let status = spawn_with(
        &mut client,
        pb::SpawnRequest {
            env: [("SOCKET".to_string(), socket)].into(),
            ..spawn_request("defaulted", python(script))
        },
    )
    .await;
    let sandbox = status.sandbox.expect("the default sandbox");
    assert_eq!(sandbox.network, pb::NetworkMode::Proxy as i32);
    assert!(sandbox.allow_hosts.is_empty());
    let ended = wait_for_state(&mut client, "defaulted", AgentState::Completed).await;
    let answers = answers(&ended);
    denied(&answers, "agentd_socket");
    assert_eq!(ok(&answers, "proxy"), "ok 'http://127.0.0.1:3128'");
}

#[tokio::test]
async fn after_a_daemon_restart_an_adopted_agent_still_has_its_proxy() {
    if !requires(Need::Root) {
        return;
    }
    let port = upstream("still here").await;
    let options = ["--egress-resolve", "allowed.test=127.0.0.1"];
    let daemon = Daemon::builder().options(&options).start().await;
    let mut client = daemon.client().await;
    // It waits for the word, then goes out: by then the daemon that made its proxy is gone.
    let script = r#"
import time
go = os.environ["AGENTD_AGENT_DIR"] + "/go"
deadline = time.time() + 60
while not os.path.exists(go) and time.time() < deadline:
    time.sleep(0.02)
attempt("allowed", lambda: via_proxy("allowed.test"))
"#;
    let request = pb::SpawnRequest {
        env: [("PORT".to_string(), port.to_string())].into(),
        sandbox: Some(pb::Sandbox {
            allow_hosts: vec!["allowed.test".into()],
            ..sandbox()
        }),
        ..spawn_request("survivor", python(&format!("{THROUGH_PROXY}\n{script}")))
    };
    let spawned = spawn_with(&mut client, request).await;
    let daemon = Daemon::builder()
        .options(&options)
        .dir(daemon.crash())
        .start()
        .await;
    let mut client = daemon.client().await;
    let adopted = status(&mut client, "survivor").await;
    assert!(adopted.adopted, "{adopted:?}");
    std::fs::write(Path::new(&spawned.agent_dir).join("go"), "").expect("the word");
    let ended = wait_for(&mut client, "survivor", "no longer running", |status| {
        status.state != AgentState::Running as i32
    })
    .await;
    let answers = answers(&ended);
    assert_eq!(ok(&answers, "allowed"), "ok 'still here'");
}
