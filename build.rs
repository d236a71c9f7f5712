//! Generates the gRPC code of containerd's snapshots API (`proto/`, vendored from containerd
//! 1.6.20) with tonic-prost-build. The definitions are parsed by protox, a protobuf compiler
//! in Rust with the well-known types built in, rather than by `protoc`, so that building
//! imgfs needs nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        ["containerd/api/services/snapshots/v1/snapshots.proto"],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        // The client is for tests, which call the service as containerd's CRI plugin would.
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
