//! Generates the Rust code for proto/quantfleet/inference/v1/*.proto with a pure-Rust protobuf compiler
//! (protox), so building needs nothing outside crates.io (no protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/quantfleet/inference/v1/inference.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
