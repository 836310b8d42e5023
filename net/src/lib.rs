//! Cluster wire layer: certificates, TLS, gRPC service definitions, QUIC tensor streams.

pub mod certs;
pub mod client;
pub mod frames;
pub mod insecure;
pub mod peer;
pub mod tls;

/// Generated gRPC messages, clients and servers (`protocol/proto/hcx.proto`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("hcx.v1");
}
