//! Compiles the `.proto` files with `protox` (pure Rust): no system `protoc` needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(
        ["patchbay/v1/agent.proto", "patchbay/v1/control.proto"],
        ["proto"],
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
