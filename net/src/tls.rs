//! TLS for the cluster: a machine's [`Identity`] (the folder `hcx-cluster
//! certs issue` wrote, see [`crate::certs`]), and mutually authenticated
//! rustls / quinn / tonic configurations built from it.
//!
//! Every rustls config uses the ring provider explicitly and TLS 1.3 only;
//! nothing relies on a process-wide default provider.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::certs::{CA_CERT_FILE, CA_KEY_FILE, CERT_FILE, CertFacts, KEY_FILE};

/// ALPN protocol spoken on cluster QUIC connections.
pub const QUIC_ALPN: &[u8] = b"hcx/1";

/// Errors from creating, loading or using cluster TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A filesystem operation on `path` failed.
    #[error("{path}: cannot {op}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// What was being done ("write", "create directory", ...).
        op: &'static str,
        /// Underlying error.
        source: io::Error,
    },
    /// Making certificates would overwrite an existing file.
    #[error(
        "{path} already exists; refusing to overwrite it (use --force to regenerate all certificates)"
    )]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A `--host` entry is neither an IP address nor a valid DNS name.
    #[error("invalid host {host:?} for certificate SAN: {reason}")]
    InvalidHost {
        /// The offending entry.
        host: String,
        /// Why it was refused.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("generating {what}: {source}")]
    Generate {
        /// Which certificate or key.
        what: String,
        /// Underlying rcgen error.
        source: rcgen::Error,
    },
    /// The unauthenticated `--insecure` TLS setup failed.
    #[error("--insecure {what}: {reason}")]
    Insecure {
        /// Which config.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A file of a certificate folder is missing or unusable.
    #[error("certs dir {dir}: {file}: {problem}", dir = .dir.display())]
    Load {
        /// The certs directory.
        dir: PathBuf,
        /// File name inside it.
        file: String,
        /// What is wrong.
        problem: String,
    },
    /// Building a TLS configuration from an identity failed.
    #[error("{role} identity: cannot build {what}: {reason}")]
    Config {
        /// Role of the identity used.
        role: Role,
        /// Which configuration.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Plaintext was requested on a non-loopback address.
    #[error("--insecure is only allowed on loopback addresses; {addr} is not loopback")]
    InsecureNotLoopback {
        /// The refused address.
        addr: SocketAddr,
    },
    /// A machine, site or label name that cannot go in a certificate.
    #[error(
        "name {name:?} cannot be certified: use 1 to 128 ASCII letters, digits, `.`, `_` or `-`"
    )]
    InvalidName {
        /// The refused name.
        name: String,
    },
    /// A `--label` that is not `KEY=VALUE` with certifiable parts.
    #[error("label {label:?}: {reason}")]
    InvalidLabel {
        /// The refused label.
        label: String,
        /// Why.
        reason: String,
    },
    /// A serial number that is not hex.
    #[error(
        "serial {serial:?} is not a certificate serial number (hex, as `certs issue` and `certs show` print it)"
    )]
    InvalidSerial {
        /// What was given.
        serial: String,
    },
    /// A machine's certificate folder holds the CA key.
    #[error("{}: the CA key must stay on the operator's machine; a machine's folder holds only what `certs issue` writes (ca.pem, cert.pem, key.pem)", .dir.join(CA_KEY_FILE).display())]
    CaKeyBeside {
        /// The folder.
        dir: PathBuf,
    },
    /// A certificate that does not name a cluster role and name.
    #[error("{}: not an hcx-cluster machine certificate (it names no role and name); make one with `hcx-cluster certs issue`", .path.display())]
    NotClusterCert {
        /// The certificate file.
        path: PathBuf,
    },
    /// A folder's certificate is for another role than the command needs.
    #[error("certs dir {}: its certificate is {found} {name:?}'s; this command needs a {want} certificate (`certs issue --role {want}`)", .dir.display())]
    WrongRole {
        /// The folder.
        dir: PathBuf,
        /// The certificate's role.
        found: Role,
        /// The certificate's name.
        name: String,
        /// The role needed.
        want: Role,
    },
}

/// Role a certificate is issued for; carried with the machine's name in a
/// URI subject alternative name (see [`crate::certs::URI_PREFIX`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Raft coordinator (server and client auth).
    Coordinator,
    /// Worker node (server and client auth).
    Node,
    /// CLI / API client (client auth only).
    Client,
}

impl Role {
    /// All roles.
    pub const ALL: [Role; 3] = [Role::Coordinator, Role::Node, Role::Client];

    /// The role named `text` (`coordinator`, `node`, `client`).
    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// Its name in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Node => "node",
            Role::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One machine's certificate chain and key plus the cluster CA, parsed and
/// as PEM, with what its certificate says (role, name, labels, serial).
pub struct Identity {
    facts: CertFacts,
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            facts: self.facts.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            ca_pem: self.ca_pem.clone(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("role", &self.facts.role)
            .field("name", &self.facts.name)
            .field("serial", &self.facts.serial)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads a machine's folder made by `certs issue`: `ca.pem`,
    /// `cert.pem`, `key.pem`. A folder that also holds the CA key is
    /// refused: the CA key belongs on the operator's machine only.
    pub fn load(dir: &Path) -> Result<Identity, TlsError> {
        let fail = |file: &str, problem: String| TlsError::Load {
            dir: dir.to_path_buf(),
            file: file.to_string(),
            problem,
        };
        if fs::symlink_metadata(dir.join(CA_KEY_FILE)).is_ok() {
            return Err(TlsError::CaKeyBeside {
                dir: dir.to_path_buf(),
            });
        }
        let read = |file: &str| {
            fs::read(dir.join(file)).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => fail(
                    file,
                    "file not found; a machine's folder is made by `hcx-cluster certs issue --dir`"
                        .into(),
                ),
                _ => fail(file, format!("cannot read: {e}")),
            })
        };
        let certs = |file: &str, pem: &[u8]| {
            let list = rustls_pemfile::certs(&mut &pem[..])
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail(file, format!("unparsable PEM: {e}")))?;
            if list.is_empty() {
                return Err(fail(file, "no certificate found".into()));
            }
            Ok(list)
        };
        let ca_pem = read(CA_CERT_FILE)?;
        let ca = certs(CA_CERT_FILE, &ca_pem)?;
        let cert_pem = read(CERT_FILE)?;
        let chain = certs(CERT_FILE, &cert_pem)?;
        let key_pem = read(KEY_FILE)?;
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|e| fail(KEY_FILE, format!("unparsable PEM: {e}")))?
            .ok_or_else(|| fail(KEY_FILE, "no private key found".into()))?;
        let facts = crate::certs::read_facts(chain[0].as_ref()).ok_or_else(|| {
            TlsError::NotClusterCert {
                path: dir.join(CERT_FILE),
            }
        })?;
        Ok(Identity {
            facts,
            ca,
            chain,
            key,
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    /// [`Identity::load`], refusing a certificate of another role than `want`.
    pub fn load_as(dir: &Path, want: Role) -> Result<Identity, TlsError> {
        let id = Identity::load(dir)?;
        if id.role() == want {
            Ok(id)
        } else {
            Err(TlsError::WrongRole {
                dir: dir.to_path_buf(),
                found: id.role(),
                name: id.facts.name.clone(),
                want,
            })
        }
    }

    /// Role its certificate was issued for.
    pub fn role(&self) -> Role {
        self.facts.role
    }

    /// The machine's name its certificate carries.
    pub fn name(&self) -> &str {
        &self.facts.name
    }

    /// The labels its certificate carries.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.facts.labels
    }

    /// Everything its certificate says.
    pub fn facts(&self) -> &CertFacts {
        &self.facts
    }

    /// Cluster CA certificates (trust anchors).
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }

    /// This machine's certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Raw `ca.pem` bytes.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// Raw certificate PEM bytes.
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    /// Raw private key PEM bytes.
    pub fn key_pem(&self) -> &[u8] {
        &self.key_pem
    }

    fn config_err(&self, what: &'static str) -> impl FnOnce(String) -> TlsError {
        let role = self.facts.role;
        move |reason| TlsError::Config { role, what, reason }
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in &self.ca {
            roots
                .add(cert.clone())
                .map_err(|e| self.config_err("trust store")(format!("bad CA certificate: {e}")))?;
        }
        Ok(Arc::new(roots))
    }
}

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// rustls server config (ring, TLS 1.3) presenting `id` and requiring a
/// client certificate signed by the cluster CA.
pub fn server_config(id: &Identity, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let err = |what| id.config_err(what);
    let provider = ring_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(id.roots()?, provider.clone())
        .build()
        .map_err(|e| err("client verifier")(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err("server config")(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| err("server config")(e.to_string()))?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// rustls client config (ring, TLS 1.3) trusting only the cluster CA and
/// presenting `id`'s certificate.
pub fn client_config(id: &Identity, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let err = |what| id.config_err(what);
    let mut cfg = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err("client config")(e.to_string()))?
        .with_root_certificates(id.roots()?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| err("client config")(e.to_string()))?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// QUIC transport tuned for bulk tensor transfer: 16 MiB stream and 64 MiB
/// connection windows, 2 s keep-alive, 10 s idle timeout (a peer killed
/// mid-transfer is noticed within 10 s).
pub fn bulk_transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20))
        .receive_window(quinn::VarInt::from_u32(64 << 20))
        .send_window(64 << 20)
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(256))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(256))
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
            10_000,
        ))));
    t
}

/// Socket buffer the data plane asks for on each side of its UDP socket
/// (16 MiB; Linux grants at most `net.core.rmem_max` / `wmem_max`).
pub const SOCKET_BUFFER_BYTES: usize = 16 << 20;

/// A QUIC endpoint bound to `addr` for the data plane, serving `server`
/// when given. Its UDP socket asks for [`SOCKET_BUFFER_BYTES`] each way: a
/// bulk sender outruns a receiver whose socket holds Linux's default 208
/// KiB, and every datagram dropped there is a loss that cuts the
/// congestion window (1 GiB on loopback: 4.2 s with the default, 2.6 s
/// with the larger buffer, in `cargo bench --bench cluster -- transfer`).
/// The kernel caps the request at `net.core.rmem_max` / `wmem_max`.
pub fn bulk_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> io::Result<quinn::Endpoint> {
    let socket = bulk_socket(addr)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| io::Error::other("no async runtime for the QUIC endpoint"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
}

/// The UDP socket of [`bulk_endpoint`]: bound to `addr`, its buffers
/// raised towards [`SOCKET_BUFFER_BYTES`].
fn bulk_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES)?;
    state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES)?;
    Ok(socket)
}

/// quinn server config (ALPN `hcx/1`, mutual TLS, bulk transport).
pub fn quinn_server_config(id: &Identity) -> Result<quinn::ServerConfig, TlsError> {
    let tls = server_config(id, &[QUIC_ALPN])?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| id.config_err("QUIC server config")(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(bulk_transport_config()));
    Ok(cfg)
}

/// quinn client config (ALPN `hcx/1`, mutual TLS, bulk transport).
pub fn quinn_client_config(id: &Identity) -> Result<quinn::ClientConfig, TlsError> {
    let tls = client_config(id, &[QUIC_ALPN])?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| id.config_err("QUIC client config")(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(bulk_transport_config()));
    Ok(cfg)
}

/// tonic server TLS: presents `id` and requires client certificates from the cluster CA.
pub fn tonic_server_tls(id: &Identity) -> tonic::transport::ServerTlsConfig {
    tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &id.cert_pem,
            &id.key_pem,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(&id.ca_pem))
}

/// tonic client TLS: trusts the cluster CA, presents `id`, and checks the
/// server certificate against the host each connection dials (an IP
/// address or DNS name in its SANs), so a certificate issued for another
/// machine is refused.
pub fn tonic_client_tls(id: &Identity) -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&id.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &id.cert_pem,
            &id.key_pem,
        ))
}

/// The name a QUIC client checks the server certificate against when it
/// dials `addr` (`host:port`): the host as written, an IP address or a DNS
/// name, without IPv6 brackets.
pub fn server_name(addr: &str) -> String {
    let host = match addr.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => addr,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// The cluster role of the certificate the other end of a QUIC connection
/// presented (verified against the cluster CA in the handshake); `None`
/// when it presented none or one of no cluster role.
pub fn connection_role(conn: &quinn::Connection) -> Option<Role> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    peer_role(certs.first()?.as_ref())
}

/// What the certificate the other end of a QUIC connection presented says
/// (`None` without one, or for one this cluster could not have issued).
pub fn connection_facts(conn: &quinn::Connection) -> Option<crate::certs::CertFacts> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    crate::certs::read_facts(certs.first()?.as_ref())
}

/// Checks that the other end of a QUIC connection presented a certificate
/// of role `want`; otherwise closes the connection and says what it
/// presented. (The handshake has already checked the CA, and for a client
/// the host it dialled; this checks that a node is not answering for a
/// coordinator or the other way round.)
pub fn require_connection_role(conn: &quinn::Connection, want: Role) -> Result<(), String> {
    match connection_role(conn) {
        Some(r) if r == want => Ok(()),
        other => {
            conn.close(1u32.into(), b"wrong certificate role");
            Err(format!(
                "presented a {} certificate, not a {want}'s",
                other.map_or("non-cluster".to_string(), |r| r.to_string())
            ))
        }
    }
}

/// The cluster role a peer certificate was issued for; `None` for one
/// that is not a machine certificate of the cluster (see
/// [`crate::certs::read_facts`]). Only meaningful for certificates already
/// verified against the cluster CA.
pub fn peer_role(cert_der: &[u8]) -> Option<Role> {
    crate::certs::read_facts(cert_der).map(|f| f.role)
}

/// Whether a certificate is valid for the IP address `ip` (an IP subject
/// alternative name equal to it): peers that dial this address check that.
pub fn cert_covers_ip(cert_der: &[u8], ip: std::net::IpAddr) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert_der) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    san.value.general_names.iter().any(|g| match g {
        x509_parser::extensions::GeneralName::IPAddress(b) => match (ip, b.len()) {
            (std::net::IpAddr::V4(v4), 4) => v4.octets()[..] == b[..],
            (std::net::IpAddr::V6(v6), 16) => v6.octets()[..] == b[..],
            _ => false,
        },
        _ => false,
    })
}

/// Allows plaintext (`--insecure`) only toward loopback: `host:port` must
/// be a loopback IP or `localhost`.
pub fn check_insecure_host(host_port: &str) -> Result<(), TlsError> {
    if let Ok(addr) = host_port.parse::<SocketAddr>() {
        return check_insecure_addr(&addr);
    }
    match host_port.rsplit_once(':') {
        Some(("localhost", port)) if port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(TlsError::Insecure {
            what: "address",
            reason: format!(
                "{host_port} is not a loopback address; plaintext is only allowed on loopback"
            ),
        }),
    }
}

/// Allows plaintext (`--insecure`) only on loopback addresses.
pub fn check_insecure_addr(addr: &SocketAddr) -> Result<(), TlsError> {
    if addr.ip().to_canonical().is_loopback() {
        Ok(())
    } else {
        Err(TlsError::InsecureNotLoopback { addr: *addr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::DevCerts;

    /// A development cluster whose servers are also valid for `hosts`,
    /// with nodes n1 (site a, 10.1.2.3) and n2.
    fn dev(dir: &Path, hosts: &[&str]) -> DevCerts {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let d = DevCerts::create(dir, &hosts).unwrap();
        d.add_node("n1", &["10.1.2.3".into()], &[("site", "a")])
            .unwrap();
        d.add_node("n2", &hosts, &[]).unwrap();
        d
    }

    #[test]
    fn identities_load_with_their_role_name_and_labels() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dev(tmp.path(), &[]);
        for (dir, role, name) in [
            (d.coordinator(), Role::Coordinator, "coordinator"),
            (d.client(), Role::Client, "operator"),
            (d.node("n1"), Role::Node, "n1"),
        ] {
            let id = Identity::load_as(&dir, role).unwrap();
            assert_eq!((id.role(), id.name()), (role, name));
            assert_eq!(id.ca_certs().len(), 1);
            assert_eq!(id.cert_chain().len(), 1);
            assert_eq!(peer_role(id.cert_chain()[0].as_ref()), Some(role));
            server_config(&id, &[b"h2"]).unwrap();
            client_config(&id, &[b"h2"]).unwrap();
            let _ = tonic_server_tls(&id);
            let _ = tonic_client_tls(&id);
        }
        let n1 = Identity::load(&d.node("n1")).unwrap();
        assert_eq!(n1.labels().get("site").map(String::as_str), Some("a"));
        assert_eq!(peer_role(b"not a certificate"), None);
        // A node's folder cannot serve as a coordinator's.
        let err = Identity::load_as(&d.node("n1"), Role::Coordinator).unwrap_err();
        assert!(matches!(err, TlsError::WrongRole { .. }), "{err}");
        assert!(err.to_string().contains("--role coordinator"), "{err}");
    }

    #[test]
    fn unusable_folders_say_what_is_wrong() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dev(tmp.path(), &[]);
        let missing = tmp.path().join("nope");
        let err = Identity::load(&missing).unwrap_err().to_string();
        assert!(
            err.contains("ca.pem") && err.contains("file not found") && err.contains("certs issue"),
            "{err}"
        );
        // The CA's own folder is not a machine's.
        let err = Identity::load(&d.ca()).unwrap_err();
        assert!(matches!(err, TlsError::CaKeyBeside { .. }), "{err}");
        let n2 = d.node("n2");
        fs::write(n2.join("cert.pem"), b"garbage").unwrap();
        let err = Identity::load(&n2).unwrap_err().to_string();
        assert!(err.contains("cert.pem: no certificate found"), "{err}");
        // A certificate of the right CA but no cluster role: the CA's own.
        fs::copy(n2.join("ca.pem"), n2.join("cert.pem")).unwrap();
        let err = Identity::load(&n2).unwrap_err();
        assert!(matches!(err, TlsError::NotClusterCert { .. }), "{err}");
    }

    #[tokio::test]
    async fn issued_certificates_chain_to_the_cluster_ca() {
        let dir = tempfile::tempdir().unwrap();
        let d = dev(dir.path(), &[]);
        let coord = Identity::load(&d.coordinator()).unwrap();
        let n1 = Identity::load(&d.node("n1")).unwrap();
        let (server, addr) = echo_server(&coord);
        let out = echo(quinn_client_config(&n1).unwrap(), addr, b"hi")
            .await
            .unwrap();
        assert_eq!(out, b"hi");
        server.close(0u32.into(), b"bye");
    }

    #[test]
    fn a_node_certificate_covers_the_addresses_it_was_issued_for() {
        let dir = tempfile::tempdir().unwrap();
        let d = dev(dir.path(), &[]);
        let n1 = Identity::load(&d.node("n1")).unwrap();
        let leaf = &n1.cert_chain()[0];
        for ip in ["10.1.2.3", "127.0.0.1", "::1"] {
            assert!(cert_covers_ip(leaf, ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.1.2.4", "127.0.0.2", "::2"] {
            assert!(!cert_covers_ip(leaf, ip.parse().unwrap()), "{ip}");
        }
        assert!(!cert_covers_ip(
            b"not a certificate",
            "10.1.2.3".parse().unwrap()
        ));
    }

    #[test]
    fn insecure_only_on_loopback() {
        assert!(check_insecure_addr(&"127.0.0.5:1".parse().unwrap()).is_ok());
        assert!(check_insecure_addr(&"[::1]:1".parse().unwrap()).is_ok());
        assert!(check_insecure_addr(&"[::ffff:127.0.0.1]:1".parse().unwrap()).is_ok());
        let err = check_insecure_addr(&"10.0.0.1:1".parse().unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("10.0.0.1:1 is not loopback"),
            "{err}"
        );
    }

    /// The data plane's socket gets the buffers it asks for, as far as the
    /// kernel's limits allow (Linux reports twice what it grants).
    #[test]
    fn the_bulk_socket_raises_its_buffers() {
        let limit = |f: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/core/{f}"))
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
        };
        let (Some(rmem), Some(wmem)) = (limit("rmem_max"), limit("wmem_max")) else {
            eprintln!("skipped: no /proc/sys/net/core limits on this system");
            return;
        };
        let socket = bulk_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let state = quinn::udp::UdpSocketState::new((&socket).into()).unwrap();
        let recv = state.recv_buffer_size((&socket).into()).unwrap();
        let send = state.send_buffer_size((&socket).into()).unwrap();
        assert!(
            recv >= rmem.min(SOCKET_BUFFER_BYTES),
            "receive buffer {recv}, rmem_max {rmem}"
        );
        assert!(
            send >= wmem.min(SOCKET_BUFFER_BYTES),
            "send buffer {send}, wmem_max {wmem}"
        );
        let default = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = state.recv_buffer_size((&default).into()).unwrap();
        if rmem > 2 * before {
            assert!(recv > before, "receive buffer {recv}, default {before}");
        }
    }

    /// Starts an echo server; returns its endpoint and address.
    fn echo_server(id: &Identity) -> (quinn::Endpoint, SocketAddr) {
        echo_server_at(id, "127.0.0.1:0")
    }

    /// [`echo_server`] bound to `bind`.
    fn echo_server_at(id: &Identity, bind: &str) -> (quinn::Endpoint, SocketAddr) {
        let ep = bulk_endpoint(
            bind.parse().unwrap(),
            Some(quinn_server_config(id).unwrap()),
        )
        .unwrap();
        let addr = ep.local_addr().unwrap();
        let accept = ep.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let Ok(data) = recv.read_to_end(1 << 20).await else {
                            return;
                        };
                        let _ = send.write_all(&data).await;
                        let _ = send.finish();
                    }
                });
            }
        });
        (ep, addr)
    }

    /// Connects with `cfg` and echoes `msg`; returns the echoed bytes or the error.
    async fn echo(
        cfg: quinn::ClientConfig,
        addr: SocketAddr,
        msg: &[u8],
    ) -> Result<Vec<u8>, String> {
        echo_named(cfg, addr, "localhost", msg).await
    }

    /// [`echo`], checking the server certificate against `name`.
    async fn echo_named(
        cfg: quinn::ClientConfig,
        addr: SocketAddr,
        name: &str,
        msg: &[u8],
    ) -> Result<Vec<u8>, String> {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(cfg);
        let fut = async {
            let conn = ep
                .connect(addr, name)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            // A refused client may see the handshake succeed and only then lose
            // the connection; report the connection's close reason in that case.
            let why = |e: &dyn std::fmt::Display| {
                conn.close_reason().map_or(e.to_string(), |r| r.to_string())
            };
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| why(&e))?;
            send.write_all(msg).await.map_err(|e| why(&e))?;
            send.finish().map_err(|e| why(&e))?;
            let out = recv.read_to_end(1 << 20).await.map_err(|e| why(&e))?;
            conn.close(0u32.into(), b"done");
            Ok(out)
        };
        let res = tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .map_err(|_| "timeout".to_string())?;
        ep.wait_idle().await;
        res
    }

    #[test]
    fn the_server_name_is_the_dialled_host() {
        assert_eq!(server_name("10.0.0.1:7101"), "10.0.0.1");
        assert_eq!(server_name("[::1]:7101"), "::1");
        assert_eq!(server_name("coord-1.example:7101"), "coord-1.example");
        assert_eq!(server_name("coord-1.example"), "coord-1.example");
    }

    #[tokio::test]
    async fn a_server_certificate_must_name_the_dialled_host() {
        // Issued without --host: the coordinator certificate names only
        // the loopback names, not 127.0.0.2.
        let plain = tempfile::tempdir().unwrap();
        let d = dev(plain.path(), &[]);
        let node = Identity::load(&d.node("n1")).unwrap();
        let coord = Identity::load(&d.coordinator()).unwrap();
        let (_server, addr) = echo_server_at(&coord, "127.0.0.2:0");
        let dialled = addr.to_string();
        let err = echo_named(
            quinn_client_config(&node).unwrap(),
            addr,
            &server_name(&dialled),
            b"x",
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("invalid peer certificate") && err.contains("127.0.0.2"),
            "{err}"
        );
        // Issued for that address, it is accepted.
        let named = tempfile::tempdir().unwrap();
        let d = dev(named.path(), &["127.0.0.2"]);
        let node = Identity::load(&d.node("n1")).unwrap();
        let coord = Identity::load(&d.coordinator()).unwrap();
        let (_server, addr) = echo_server_at(&coord, "127.0.0.2:0");
        let out = echo_named(
            quinn_client_config(&node).unwrap(),
            addr,
            &server_name(&addr.to_string()),
            b"x",
        )
        .await
        .unwrap();
        assert_eq!(out, b"x");
    }

    #[tokio::test]
    async fn quinn_mutual_tls_echo_and_refusals() {
        let good = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let good = dev(good.path(), &[]);
        let other = dev(other.path(), &[]);
        let coord = Identity::load(&good.coordinator()).unwrap();
        let node = Identity::load(&good.node("n1")).unwrap();
        let (server, addr) = echo_server(&coord);

        let msg = b"tensor bytes \x00\x01\x02".repeat(1000);
        let out = echo(quinn_client_config(&node).unwrap(), addr, &msg)
            .await
            .unwrap();
        assert_eq!(out, msg);

        // Client certificate from a different CA (it trusts our CA, so only
        // the server-side check can refuse it).
        let mut stranger = Identity::load(&other.node("n1")).unwrap();
        stranger.ca = node.ca.clone();
        let err = echo(quinn_client_config(&stranger).unwrap(), addr, &msg)
            .await
            .unwrap_err();
        assert!(err.contains("invalid peer certificate"), "{err}");

        // No client certificate at all.
        let mut anon = rustls::ClientConfig::builder_with_provider(ring_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(node.roots().unwrap())
            .with_no_client_auth();
        anon.alpn_protocols = vec![QUIC_ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(anon).unwrap();
        let err = echo(quinn::ClientConfig::new(Arc::new(quic)), addr, &msg)
            .await
            .unwrap_err();
        assert!(err.contains("peer sent no certificates"), "{err}");

        // The server still serves good clients afterwards.
        let out = echo(quinn_client_config(&node).unwrap(), addr, b"again")
            .await
            .unwrap();
        assert_eq!(out, b"again");
        server.close(0u32.into(), b"bye");
    }
}
