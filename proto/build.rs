//! Compiles the protos with protox (no `protoc` needed) and generates tonic code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/helloworld/helloworld.proto",
        "proto/pylon/v1/testing.proto",
        "proto/pylon/v1/control.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
