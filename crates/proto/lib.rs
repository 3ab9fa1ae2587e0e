//! The `agentd.v1` gRPC API, generated at build time from `proto/agentd/v1/agentd.proto`.
//!
//! This crate holds generated code only: the messages, their proto3 JSON mapping (serde, from
//! pbjson) and the gRPC client and server; conversions to and from the supervisor's own types
//! live in `agentd-server`.

/// Messages, enums and the `AgentSupervisor` client and server of package `agentd.v1`.
pub mod v1 {
    tonic::include_proto!("agentd.v1");
    include!(concat!(env!("OUT_DIR"), "/agentd.v1.serde.rs"));
}

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("agentd_descriptor");
