//! Compiles `proto/gradflow.proto` with a vendored `protoc`, so no system install is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let proto = proto_dir.join("gradflow.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure().bytes(".").compile_protos(&[proto], &[proto_dir])?;
    Ok(())
}
