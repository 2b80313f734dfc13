//! Generates Rust code for every `.proto` file under `proto/` with a vendored
//! `protoc`, so a fresh machine needs no system protobuf compiler.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new("proto");
    let mut files = Vec::new();
    collect(root, &mut files)?;
    files.sort();

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.bytes(["."]);
    // The server API's messages are also its HTTP/JSON bodies: one
    // definition (docs/server-api.md). Field names as in the .proto file;
    // bytes as base64; missing fields take their defaults; unknown ones are
    // refused.
    config.type_attribute(
        ".rim.server.v1",
        "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default, deny_unknown_fields)]",
    );
    config.field_attribute(".rim.server.v1.PushBody.content", "#[serde(with = \"crate::json_bytes\")]");
    tonic_prost_build::configure().build_server(true).build_client(true).compile_with_config(
        config,
        &files,
        // The vendored protoc's own includes hold google/protobuf/*.proto
        // (gim's `UserIntService.Auth` returns `google.protobuf.Empty`).
        &[root.to_path_buf(), protoc_bin_vendored::include_path()?],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

/// Every `.proto` file below `dir`, recursively.
fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
