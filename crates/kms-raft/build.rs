//! Compiles `proto/raft.proto` with protox (a Rust protobuf compiler from crates.io), so no
//! system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The manifest dir of this build, read when the script runs: `env!` would bake in the
    // checkout the script was first compiled in (a copied target dir then reads another
    // checkout's proto files).
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let proto_dir = std::path::Path::new(&manifest_dir).join("../../proto");
    let file = proto_dir.join("raft.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let descriptors = protox::compile([&file], [&proto_dir])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
