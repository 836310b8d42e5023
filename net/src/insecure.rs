//! `--insecure` mode, for loopback only: gRPC in plaintext, and QUIC (which
//! cannot run without TLS) encrypted but unauthenticated — the server
//! presents a throwaway self-signed certificate and clients accept any
//! certificate (the handshake signature is still checked). Callers refuse
//! this mode on non-loopback addresses with
//! [`check_insecure_addr`](crate::tls::check_insecure_addr).

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use crate::tls::{QUIC_ALPN, TlsError, bulk_transport_config};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_err(what: &'static str, e: impl std::fmt::Display) -> TlsError {
    TlsError::Insecure {
        what,
        reason: e.to_string(),
    }
}

/// A QUIC server config with a fresh self-signed certificate and no client
/// authentication.
pub fn quinn_server_config() -> Result<quinn::ServerConfig, TlsError> {
    let key = rcgen::KeyPair::generate().map_err(|source| TlsError::Generate {
        what: "insecure server key".into(),
        source,
    })?;
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string()]).map_err(|source| {
            TlsError::Generate {
                what: "insecure server certificate".into(),
                source,
            }
        })?;
    let cert = params
        .self_signed(&key)
        .map_err(|source| TlsError::Generate {
            what: "insecure server certificate".into(),
            source,
        })?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_err("server config", e))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der)
        .map_err(|e| config_err("server config", e))?;
    tls.alpn_protocols = vec![QUIC_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| config_err("QUIC server config", e))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(bulk_transport_config()));
    Ok(cfg)
}

/// Accepts any server certificate; checks only the handshake signature.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A QUIC client config that accepts any server certificate and presents none.
pub fn quinn_client_config() -> Result<quinn::ClientConfig, TlsError> {
    let p = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_err("client config", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(p)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![QUIC_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| config_err("QUIC client config", e))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(bulk_transport_config()));
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn insecure_quic_connects_on_loopback() {
        let server = quinn::Endpoint::server(
            quinn_server_config().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (mut s, mut r) = conn.accept_bi().await.unwrap();
            let got = r.read_to_end(1024).await.unwrap();
            s.write_all(&got).await.unwrap();
            s.finish().unwrap();
            let _ = s.stopped().await;
        });
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(quinn_client_config().unwrap());
        let conn = client.connect(addr, "localhost").unwrap().await.unwrap();
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        s.write_all(b"hello").await.unwrap();
        s.finish().unwrap();
        assert_eq!(r.read_to_end(1024).await.unwrap(), b"hello");
        accept.await.unwrap();
    }
}
