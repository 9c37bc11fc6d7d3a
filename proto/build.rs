//! Compiles the `.proto` files with `protox` (pure Rust): no system `protoc` needed.
//! Also writes the encoded `FileDescriptorSet` (with source info, i.e. the comments) to
//! `OUT_DIR/patchbay_v1.binpb`: served by gRPC reflection, and read by the tests that
//! regenerate `docs/api.md` and compare the API against `proto/baseline/`.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(
        ["patchbay/v1/agent.proto", "patchbay/v1/control.proto"],
        ["proto"],
    )?;
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR unset")?);
    std::fs::write(out.join("patchbay_v1.binpb"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
