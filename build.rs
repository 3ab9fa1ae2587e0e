//! Compiles `proto/agentd/v1/*.proto` with protox (pure Rust, no system `protoc`) into the
//! tonic/prost code of `agentd-proto`, the proto3 JSON mapping of every message (pbjson), and
//! the descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/agentd/v1/agentd.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    let encoded = prost::Message::encode_to_vec(&descriptors);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("agentd_descriptor.bin"), &encoded)?;
    // Well-known types come from pbjson-types, which knows their JSON forms ("1.5s"), except
    // Timestamp: ours writes "Z" for UTC as the mapping asks (pbjson-types writes "+00:00").
    tonic_prost_build::configure()
        .compile_well_known_types(true)
        // A request that does not decode is INVALID_ARGUMENT, not prost's INTERNAL.
        .codec_path("crate::Codec")
        .extern_path(".google.protobuf.Timestamp", "crate::Timestamp")
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(descriptors)?;
    // Default values are written too, so `jq .restartCount` says 0 rather than null.
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .emit_fields()
        .build(&[".agentd"])?;
    Ok(())
}
