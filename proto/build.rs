//! Compiles `rill/v1/*.proto` with protox (pure Rust; no system protoc), writes the
//! descriptor set for server reflection, and generates the tonic code.

use std::path::PathBuf;

/// The folder of the contract, relative to this crate.
const PROTO_DIR: &str = "rill/v1";

fn main() -> anyhow::Result<()> {
    // Every .proto in the folder, sorted so the output is reproducible. Watching the folder
    // too means an added or removed file reruns this script; neither protox nor
    // tonic-prost-build emits rerun-if-changed itself.
    println!("cargo:rerun-if-changed={PROTO_DIR}");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(PROTO_DIR)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "proto") {
            println!("cargo:rerun-if-changed={}", path.display());
            files.push(path);
        }
    }
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no .proto files in {PROTO_DIR}");

    // protox keeps the source comments, so reflection clients show the documentation.
    let fds = protox::compile(&files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("rill_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Every `bytes` field (including `optional` and `repeated` ones) becomes bytes::Bytes.
        .bytes(".")
        // Undecodable requests are INVALID_ARGUMENT, not INTERNAL (see src/codec.rs).
        .codec_path("crate::codec::StrictCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
