//! Compiles proto/deadbolt/v1/*.proto with protox (pure Rust, no protoc) and
//! generates prost messages plus tonic clients and servers. Also writes the
//! file descriptor set (imports included) for gRPC reflection.

use std::path::PathBuf;

use prost::Message;

const FILES: &[&str] = &[
    "deadbolt/v1/common.proto",
    "deadbolt/v1/poisoner.proto",
    "deadbolt/v1/trainer.proto",
    "deadbolt/v1/analyzer.proto",
    "deadbolt/v1/pruner.proto",
    "deadbolt/v1/gateway.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    for f in FILES {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(FILES, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("deadbolt_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
