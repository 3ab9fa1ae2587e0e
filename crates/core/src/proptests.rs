//! Property tests over everything that reads untrusted input: spawn request validation, the
//! status file an agent writes, stored records, and `/proc`. None may panic, and every
//! rejection of a request is `Invalid` or `Unsupported` (INVALID_ARGUMENT or
//! FAILED_PRECONDITION). A fixed case budget and no failure files: CI runs the same amount.

use std::time::Duration;

use proptest::prelude::*;

use crate::error::Error;
use crate::health::{HealthAction, HealthPolicy};
use crate::lifecycle::{Backoff, LifecyclePolicy, ParentExit, RestartPolicy};
use crate::sandbox::SandboxRequest;
use crate::spec::{Resources, SpawnRequest};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text that is often hostile: separators, dots, NULs, control characters, long runs.
fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(
            prop_oneof![
                Just('/'),
                Just('.'),
                Just('\0'),
                Just('\n'),
                Just('@'),
                Just('-'),
                Just('é'),
                proptest::char::range('a', 'z'),
                any::<char>(),
            ],
            0..max
        )
        .prop_map(|chars| chars.into_iter().collect()),
        Just(String::new()),
        Just("..".to_string()),
        Just("a".repeat(300)),
    ]
}

fn duration() -> impl Strategy<Value = Option<Duration>> {
    prop_oneof![
        Just(None),
        any::<u64>().prop_map(|ms| Some(Duration::from_millis(ms))),
        (0u64..10).prop_map(|s| Some(Duration::from_secs(s))),
    ]
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![proptest::num::f64::ANY, -10.0..200.0f64]
}

fn action() -> impl Strategy<Value = HealthAction> {
    prop_oneof![
        Just(HealthAction::Report),
        Just(HealthAction::Stop),
        Just(HealthAction::Restart)
    ]
}

/// Hosts and paths, valid often enough that the later checks are reached too.
fn sandbox() -> BoxedStrategy<Option<SandboxRequest>> {
    let hosts =
        proptest::collection::vec(prop_oneof![text(20), "[*a-z.]{1,12}(:[0-9]{1,6})?"], 0..3);
    let reads = proptest::collection::vec(prop_oneof![text(20), Just("/usr".to_string())], 0..2);
    let writes = proptest::collection::vec(text(20), 0..2);
    proptest::option::of((hosts, reads, writes).prop_map(
        |(allow_hosts, read_paths, write_paths)| SandboxRequest {
            allow_hosts,
            read_paths,
            write_paths,
            ..SandboxRequest::default()
        },
    ))
    .boxed()
}

prop_compose! {
    fn spawn_request()(
        // Ids and commands valid often enough that the later checks are reached too.
        ids in (prop_oneof![text(40), "[a-z][a-z0-9_.-]{0,20}"], text(40), text(40)),
        names in (text(20), text(20), text(20)),
        prompt in text(50),
        load_percentage in number(),
        command in prop_oneof![
            proptest::collection::vec(text(20), 0..4),
            proptest::collection::vec("[a-z]{1,8}", 1..3),
        ],
        env in proptest::collection::btree_map(text(12), text(12), 0..4),
        working_dir in prop_oneof![text(30), Just("/tmp".to_string()), Just("../..".to_string())],
        labels in proptest::collection::btree_map(text(12), text(12), 0..3),
        stop_signal in prop_oneof![text(10), Just("SIGINT".to_string()), Just("KILL".to_string())],
        graces in (duration(), duration()),
        health in (duration(), action(), proptest::option::of(number()), action(),
                   proptest::option::of(number()), any::<u32>(), action()),
        lifecycle in (0..3u8, duration(), duration(), number(), proptest::option::of(any::<u32>()),
                      duration(), duration(), any::<bool>()),
        resources in (proptest::option::of(number()), proptest::option::of(number()),
                      proptest::option::of(number()), proptest::option::of(any::<u32>()),
                      proptest::collection::vec(any::<u32>(), 0..3), proptest::option::of(any::<i32>()),
                      proptest::option::of(any::<u32>())),
        // With the sandbox in one argument: each argument costs the generated code stack.
        confinement in ((text(10), text(10)), sandbox()),
    ) -> SpawnRequest {
        let default_backoff = Backoff::default();
        SpawnRequest {
            agent_id: ids.0,
            parent_agent_id: ids.1,
            request_id: ids.2,
            agent_name: names.0,
            agent_type: names.1,
            model: names.2,
            prompt,
            load_percentage,
            command,
            env,
            working_dir,
            labels,
            stop_signal,
            first_grace: graces.0,
            second_grace: graces.1,
            health_policy: HealthPolicy {
                heartbeat_timeout: health.0,
                on_stall: health.1,
                memory_limit_mb: health.2,
                on_memory_limit: health.3,
                cpu_limit_percent: health.4,
                cpu_limit_samples: health.5,
                on_cpu_limit: health.6,
            },
            lifecycle: LifecyclePolicy {
                restart: [RestartPolicy::Never, RestartPolicy::OnFailure, RestartPolicy::Always]
                    [usize::from(lifecycle.0)],
                backoff: Backoff {
                    initial: lifecycle.1.unwrap_or(default_backoff.initial),
                    max: lifecycle.2.unwrap_or(default_backoff.max),
                    multiplier: lifecycle.3,
                    reset_after: default_backoff.reset_after,
                },
                max_restarts: lifecycle.4,
                max_runtime: lifecycle.5,
                startup_timeout: lifecycle.6,
                on_parent_exit: if lifecycle.7 { ParentExit::Stop } else { ParentExit::Keep },
            },
            resources: Resources {
                memory_max_mb: resources.0,
                memory_high_mb: resources.1,
                cpu_max_cores: resources.2,
                pids_max: resources.3,
                cpus: resources.4,
                nice: resources.5,
                open_files_max: resources.6,
            },
            user: confinement.0.0,
            group: confinement.0.1,
            sandbox: confinement.1,
            budget: None,
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_spawn_request_is_accepted_or_rejected_as_a_request_error(request in spawn_request()) {
        let id = request.agent_id.clone();
        match request.validate() {
            Ok((spec, _)) => {
                // What passes names a folder inside the data folder.
                prop_assert!(!spec.agent_id.is_empty() && !spec.agent_id.contains('/'));
                prop_assert!(spec.agent_id != "." && spec.agent_id != "..");
                prop_assert!(!spec.command.is_empty());
                prop_assert_eq!(spec.agent_id, id);
            }
            Err(Error::Invalid { .. } | Error::Unsupported { .. }) => {}
            Err(other) => prop_assert!(false, "not a request error: {other:?}"),
        }
    }

    #[test]
    fn the_status_file_parser_takes_any_text(text in prop_oneof![
        any::<String>(),
        (proptest::num::f64::ANY, text(20)).prop_map(|(p, m)| {
            format!("{{\"progress\": {p}, \"message\": {}}}", serde_json::Value::String(m))
        }),
    ]) {
        if let Ok(progress) = crate::sampler::parse_progress(&text) {
            prop_assert!((0.0..=100.0).contains(&progress.progress));
        }
    }

    #[test]
    fn stored_records_decode_or_fail_cleanly(bytes in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        (0usize..400, any::<u8>()).prop_map(|(at, byte)| {
            // A real record with one byte changed.
            let mut json = FIXTURE.to_vec();
            if !json.is_empty() {
                let at = at % json.len();
                json[at] = byte;
            }
            json
        }),
    ]) {
        match crate::store::decode("k", &bytes) {
            Ok(_) | Err(Error::Record { .. }) => {}
            Err(other) => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn proc_stat_parsing_takes_any_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        name in proptest::collection::vec(any::<u8>(), 0..16),
        numbers in proptest::collection::vec(0..i32::MAX as u64, 50),
    ) {
        let _ = crate::process::parse_proc_stat(&bytes);
        // A well-formed line with any name (spaces, parentheses, bytes that are not UTF-8).
        let mut line = b"42 (".to_vec();
        line.extend_from_slice(&name);
        line.extend_from_slice(b") S");
        for n in &numbers {
            line.extend_from_slice(format!(" {n}").as_bytes());
        }
        line.push(b'\n');
        let parsed = crate::process::parse_proc_stat(&line);
        prop_assert!(parsed.is_some(), "{:?}", String::from_utf8_lossy(&line));
    }
}

const FIXTURE: &[u8] = include_bytes!("../fixtures/agent-record-v1.json");

#[test]
fn the_fixture_record_decodes() {
    assert!(crate::store::decode("k", FIXTURE).is_ok());
}
