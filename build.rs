//! Generates the gRPC code of containerd's snapshots service (`proto/`, vendored from
//! containerd 1.6.20) with tonic-prost-build, which runs `protoc` (Debian's
//! `protobuf-compiler`; the `google/protobuf` imports from `libprotobuf-dev`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        // The client is for tests, which call the service as containerd's CRI plugin would.
        .build_client(true)
        .compile_protos(
            &["proto/containerd/api/services/snapshots/v1/snapshots.proto"],
            &["proto", "/usr/include"],
        )?;
    Ok(())
}
