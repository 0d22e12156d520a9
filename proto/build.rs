//! Compiles `rill/v1/*.proto` with protox (pure Rust; no system protoc), writes the
//! descriptor set for server reflection, and generates the tonic code.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let files = [
        "rill/v1/records.proto",
        "rill/v1/log.proto",
        "rill/v1/groups.proto",
        "rill/v1/admin.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("rill_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .bytes(".")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
