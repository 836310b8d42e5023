//! Compiles the control-plane protos (pure Rust: protox, no protoc).
fn main() {
    let proto = "../protocol/proto/hcx.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = match protox::compile([proto], ["../protocol/proto"]) {
        Ok(f) => f,
        Err(e) => panic!("{proto}: {e}"),
    };
    if let Err(e) = tonic_prost_build::configure().compile_fds(fds) {
        panic!("generating gRPC code from {proto}: {e}");
    }
}
