//! Sandboxes between the API and core: the policy both ways, a proxy's counts, what the host
//! offers.

use agentd_core::{AgentRecord, Network, Sandbox, SandboxRequest, SandboxSupport};
use agentd_proto::v1 as pb;
use tonic::Status;

pub(super) fn request(sandbox: pb::Sandbox) -> Result<SandboxRequest, Status> {
    let network = match pb::NetworkMode::try_from(sandbox.network) {
        Ok(pb::NetworkMode::Unspecified) => None,
        Ok(pb::NetworkMode::Host) => Some(Network::Host),
        Ok(pb::NetworkMode::None) => Some(Network::None),
        Ok(pb::NetworkMode::Proxy) => Some(Network::Proxy),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "invalid `sandbox.network`: {} is not a NetworkMode (give HOST, NONE or PROXY)",
                sandbox.network
            )));
        }
    };
    Ok(SandboxRequest {
        network,
        allow_hosts: sandbox.allow_hosts,
        read_paths: sandbox.read_paths,
        write_paths: sandbox.write_paths,
        allow_namespaces: sandbox.allow_namespaces,
    })
}

pub(super) fn message(sandbox: &Sandbox) -> pb::Sandbox {
    let path = |path: &std::path::PathBuf| path.to_string_lossy().into_owned();
    pb::Sandbox {
        network: match sandbox.network {
            Network::Host => pb::NetworkMode::Host,
            Network::None => pb::NetworkMode::None,
            Network::Proxy => pb::NetworkMode::Proxy,
        }
        .into(),
        allow_hosts: sandbox
            .allow_hosts
            .iter()
            .map(ToString::to_string)
            .collect(),
        read_paths: sandbox.read_paths.iter().map(path).collect(),
        write_paths: sandbox.write_paths.iter().map(path).collect(),
        allow_namespaces: sandbox.allow_namespaces,
    }
}

/// A `PROXY` agent's counts; none for an agent without a proxy.
pub(super) fn egress(record: &AgentRecord) -> Option<pb::Egress> {
    record
        .spec
        .sandbox
        .as_ref()
        .filter(|sandbox| sandbox.network == Network::Proxy)
        .map(|_| pb::Egress {
            allowed: record.egress.allowed,
            denied: record.egress.denied,
            bytes_up: record.egress.bytes_up,
            bytes_down: record.egress.bytes_down,
        })
}

/// What the kernel refused a sandboxed agent; none for an agent without a sandbox.
pub(super) fn denials(record: &AgentRecord) -> Option<pb::SandboxDenials> {
    record.spec.sandbox.as_ref().map(|_| pb::SandboxDenials {
        files: record.denials.files,
        syscalls: record.denials.syscalls,
    })
}

pub(super) fn support(support: &SandboxSupport) -> pb::SandboxSupport {
    pb::SandboxSupport {
        landlock_abi: support.landlock_abi,
        seccomp: support.seccomp,
        network_namespaces: support.network_namespaces,
        user_namespaces: support.user_namespaces,
        privileged: support.privileged,
        detail: support.describe(),
        syscall_denials_counted: support.syscall_denials,
        file_denials_counted: support.file_denials,
    }
}
