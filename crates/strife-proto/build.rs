//! Compiles `proto/` (and the part of etcd's API in `etcd/`) with protox (pure Rust), so no `protoc` is needed.
use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [root.join("strife/bank/v1/bank.proto"), root.join("strife/gateway/v1/gateway.proto")];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("strife_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;

    // etcd's API (the part discovery uses): a client only, and not in the
    // descriptor set that Strife's servers reflect.
    let etcd_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("etcd");
    let etcd = etcd_root.join("etcd.proto");
    println!("cargo:rerun-if-changed={}", etcd.display());
    let etcd_fds = protox::compile([&etcd], [&etcd_root])?;
    tonic_prost_build::configure().build_server(false).compile_fds(etcd_fds)?;
    Ok(())
}
