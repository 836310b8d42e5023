//! TLS material for the cluster: a development CA and role certificates
//! (`hcx-cluster certs init`), loading them back as an [`Identity`], and
//! mutually authenticated rustls / quinn / tonic configurations built from it.
//!
//! Every rustls config uses the ring provider explicitly and TLS 1.3 only;
//! nothing relies on a process-wide default provider.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};

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
    /// `init_certs` would overwrite an existing file.
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
    /// A file of the certs directory is missing or unusable.
    #[error("certs dir {dir}: {file}: {problem} — run `hcx-cluster certs init --dir {dir}`", dir = .dir.display())]
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
    /// A node name cannot go in a certificate.
    #[error(
        "node name {name:?} cannot be certified: use 1 to 128 ASCII letters, digits, `.`, `_` or `-`"
    )]
    InvalidNodeName {
        /// The refused name.
        name: String,
    },
    /// A site name that cannot go into a certificate.
    #[error(
        "site name {name:?} cannot be certified: use 1 to 128 ASCII letters, digits, `.`, `_` or `-`"
    )]
    InvalidSiteName {
        /// The refused name.
        name: String,
    },
}

/// A node certificate names its node in a URI subject alternative name
/// with this prefix (`urn:hcx-cluster:node:gpu-9`).
pub const NODE_NAME_URI_PREFIX: &str = "urn:hcx-cluster:node:";

/// A node certificate may name the node's site (a federated run's
/// calibration data stays at its site) in a URI subject alternative name
/// with this prefix (`urn:hcx-cluster:site:a`). Coordinators take a node's
/// `site` label from here, not from what the node claims.
pub const SITE_URI_PREFIX: &str = "urn:hcx-cluster:site:";

/// Whether `name` can be a certified node (or site) name: 1 to 128 ASCII
/// letters, digits, `.`, `_` or `-`.
pub fn check_node_name(name: &str) -> Result<(), TlsError> {
    if hcx_protocol::job::valid_certified_name(name) {
        Ok(())
    } else {
        Err(TlsError::InvalidNodeName {
            name: name.to_string(),
        })
    }
}

/// Role a certificate is issued for; carried in the subject CN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Raft coordinator (server and client auth).
    Coordinator,
    /// Worker node (server and client auth).
    Node,
    /// CLI / API client (client auth only).
    Client,
}

impl Role {
    /// All roles, in file-generation order.
    pub const ALL: [Role; 3] = [Role::Coordinator, Role::Node, Role::Client];

    /// Subject common name of this role's certificate (`hcx-node`, ...).
    pub fn common_name(self) -> &'static str {
        match self {
            Role::Coordinator => "hcx-coordinator",
            Role::Node => "hcx-node",
            Role::Client => "hcx-client",
        }
    }

    /// File stem of this role's files (`node` for `node.pem` / `node.key`).
    pub fn file_stem(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Node => "node",
            Role::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.file_stem())
    }
}

/// Summary of what [`init_certs`] wrote.
#[derive(Debug, Clone)]
pub struct CertSet {
    /// The certs directory.
    pub dir: PathBuf,
    /// Every file written, CA first.
    pub files: Vec<PathBuf>,
    /// Hex SHA-256 of the CA certificate (DER), to compare across machines.
    pub ca_sha256: String,
    /// Subject alternative names of the coordinator and node certificates.
    pub server_names: Vec<String>,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> TlsError + 'a {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> TlsError + '_ {
    move |source| TlsError::Generate {
        what: what.to_string(),
        source,
    }
}

/// SANs for server-capable leaves: loopback names plus each of `hosts`.
fn server_sans(hosts: &[String]) -> Result<(Vec<String>, Vec<SanType>), TlsError> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for raw in hosts {
        let h = raw.trim().trim_start_matches('[').trim_end_matches(']');
        let bad = |reason: &str| TlsError::InvalidHost {
            host: raw.clone(),
            reason: reason.into(),
        };
        if h.is_empty() {
            return Err(bad("empty"));
        }
        if h.parse::<IpAddr>().is_err() {
            let ok_chars = h
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !ok_chars || h.starts_with(['-', '.']) || h.ends_with('-') || h.len() > 253 {
                return Err(bad("not an IP address or DNS name"));
            }
        }
        if !names.iter().any(|n| n.eq_ignore_ascii_case(h)) {
            names.push(h.to_string());
        }
    }
    let sans = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => {
                n.clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e| TlsError::InvalidHost {
                        host: n.clone(),
                        reason: format!("{e}"),
                    })
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((names, sans))
}

/// Validity window: from the start of last year to ten years ahead.
fn validity(params: &mut CertificateParams) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let year = 1970 + (secs / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
}

/// Writes `bytes` to a new file (mode 0600 when `private`), removing an old one if `force`.
fn write_file(path: &Path, bytes: &[u8], private: bool, force: bool) -> Result<(), TlsError> {
    if force && fs::symlink_metadata(path).is_ok() {
        fs::remove_file(path).map_err(io_err(path, "remove old file"))?;
    }
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(path).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => TlsError::Exists {
            path: path.to_path_buf(),
        },
        _ => TlsError::Io {
            path: path.to_path_buf(),
            op: "create",
            source: e,
        },
    })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err(path, "write"))
}

/// Creates a development cluster CA (`ca.pem`, `ca.key`) and role
/// certificates signed by it (`coordinator`, `node`, `client` `.pem`/`.key`)
/// in `dir`. Coordinator and node certificates have server+client auth and
/// SANs `localhost`, `127.0.0.1`, `::1` plus `hosts`; the client certificate
/// has client auth only. Keys are written 0600. Existing files are an error
/// unless `force`.
pub fn init_certs(dir: &Path, hosts: &[String], force: bool) -> Result<CertSet, TlsError> {
    let (server_names, sans) = server_sans(hosts)?;
    let mut outputs: Vec<(PathBuf, String, bool)> = Vec::new();
    let file = |name: String| dir.join(name);
    if !force {
        let mut names = vec!["ca.pem".to_string(), "ca.key".to_string()];
        for role in Role::ALL {
            names.push(format!("{}.pem", role.file_stem()));
            names.push(format!("{}.key", role.file_stem()));
        }
        if let Some(p) = names
            .into_iter()
            .map(file)
            .find(|p| fs::symlink_metadata(p).is_ok())
        {
            return Err(TlsError::Exists { path: p });
        }
    }

    let ca_key = KeyPair::generate().map_err(gen_err("CA key"))?;
    let ca_params = ca_params();
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(gen_err("CA certificate"))?;
    let ca_sha256 = hex::encode(Sha256::digest(ca_cert.der()));
    outputs.push((file("ca.pem".into()), ca_cert.pem(), false));
    outputs.push((file("ca.key".into()), ca_key.serialize_pem(), true));
    let issuer = Issuer::new(ca_params, ca_key);

    for role in Role::ALL {
        let what = format!("{role} certificate");
        let key = KeyPair::generate().map_err(gen_err(&what))?;
        let params = leaf_params(role, &sans);
        let cert = params.signed_by(&key, &issuer).map_err(gen_err(&what))?;
        outputs.push((file(format!("{}.pem", role.file_stem())), cert.pem(), false));
        outputs.push((
            file(format!("{}.key", role.file_stem())),
            key.serialize_pem(),
            true,
        ));
    }

    fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
    for (path, body, private) in &outputs {
        write_file(path, body.as_bytes(), *private, force)?;
    }
    let files = outputs.into_iter().map(|(p, _, _)| p).collect();
    Ok(CertSet {
        dir: dir.to_path_buf(),
        files,
        ca_sha256,
        server_names,
    })
}

/// The development CA's parameters; the same every time, so a CA key
/// loaded back from `ca.key` issues certificates that chain to `ca.pem`.
fn ca_params() -> CertificateParams {
    let mut ca_params = CertificateParams::default();
    validity(&mut ca_params);
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "hcx-cluster development CA");
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "hcx-cluster");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
}

/// A role certificate's parameters: CN is the role, coordinators and nodes
/// also serve (server auth, `sans`).
fn leaf_params(role: Role, sans: &[SanType]) -> CertificateParams {
    let mut params = CertificateParams::default();
    validity(&mut params);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, role.common_name());
    params
        .distinguished_name
        .push(DnType::OrganizationName, "hcx-cluster");
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if role != Role::Client {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
        params.subject_alt_names = sans.to_vec();
    }
    params
}

/// Issues a certificate for the node `name` with the CA in `dir` (made by
/// [`init_certs`]; needs `ca.key`): `node-NAME.pem` and `node-NAME.key`,
/// valid for the same host names as `node.pem` plus `hosts`, naming the
/// node (see [`NODE_NAME_URI_PREFIX`]) so coordinators can tell it from
/// other nodes, and its `site` when given (see [`SITE_URI_PREFIX`]).
/// Returns the certificate's path. Existing files are an error unless
/// `force`.
pub fn issue_node_cert(
    dir: &Path,
    name: &str,
    site: Option<&str>,
    hosts: &[String],
    force: bool,
) -> Result<PathBuf, TlsError> {
    check_node_name(name)?;
    if let Some(site) = site
        && check_node_name(site).is_err()
    {
        return Err(TlsError::InvalidSiteName {
            name: site.to_string(),
        });
    }
    let (_, mut sans) = server_sans(hosts)?;
    if let Some(site) = site {
        let uri = format!("{SITE_URI_PREFIX}{site}");
        sans.push(SanType::URI(uri.clone().try_into().map_err(|e| {
            TlsError::InvalidHost {
                host: uri,
                reason: format!("{e}"),
            }
        })?));
    }
    let uri = format!("{NODE_NAME_URI_PREFIX}{name}");
    sans.push(SanType::URI(uri.clone().try_into().map_err(|e| {
        TlsError::InvalidHost {
            host: uri,
            reason: format!("{e}"),
        }
    })?));
    let key_file = dir.join("ca.key");
    let ca_pem = fs::read_to_string(&key_file).map_err(|e| TlsError::Load {
        dir: dir.to_path_buf(),
        file: "ca.key".into(),
        problem: format!("cannot read: {e}"),
    })?;
    let ca_key = KeyPair::from_pem(&ca_pem).map_err(|e| TlsError::Load {
        dir: dir.to_path_buf(),
        file: "ca.key".into(),
        problem: format!("not a private key: {e}"),
    })?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let what = format!("certificate of node {name}");
    let key = KeyPair::generate().map_err(gen_err(&what))?;
    let cert = leaf_params(Role::Node, &sans)
        .signed_by(&key, &issuer)
        .map_err(gen_err(&what))?;
    let pem = dir.join(format!("node-{name}.pem"));
    let key_path = dir.join(format!("node-{name}.key"));
    if !force
        && let Some(p) = [&pem, &key_path]
            .into_iter()
            .find(|p| fs::symlink_metadata(p).is_ok())
    {
        return Err(TlsError::Exists { path: p.clone() });
    }
    write_file(&pem, cert.pem().as_bytes(), false, force)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), true, force)?;
    Ok(pem)
}

/// A role's certificate chain and key plus the cluster CA, parsed and as PEM.
pub struct Identity {
    role: Role,
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
            role: self.role,
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
            .field("role", &self.role)
            .field("ca_certs", &self.ca.len())
            .field("chain_certs", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads `ca.pem` and the role's `.pem`/`.key` from `dir`.
    pub fn load(dir: &Path, role: Role) -> Result<Identity, TlsError> {
        Identity::load_stem(dir, role, role.file_stem())
    }

    /// Loads the certificate of node `name`: `node-NAME.pem`/`.key` when
    /// `dir` has them (see [`issue_node_cert`]), else the shared `node.pem`.
    pub fn load_node(dir: &Path, name: &str) -> Result<Identity, TlsError> {
        let stem = format!("node-{name}");
        if check_node_name(name).is_ok() && dir.join(format!("{stem}.pem")).is_file() {
            Identity::load_stem(dir, Role::Node, &stem)
        } else {
            Identity::load(dir, Role::Node)
        }
    }

    /// The node name its certificate carries, if any (see [`peer_node_name`]).
    pub fn node_name(&self) -> Option<String> {
        self.chain.first().and_then(|c| peer_node_name(c.as_ref()))
    }

    fn load_stem(dir: &Path, role: Role, stem: &str) -> Result<Identity, TlsError> {
        let fail = |file: &str, problem: String| TlsError::Load {
            dir: dir.to_path_buf(),
            file: file.to_string(),
            problem,
        };
        let read = |file: &str| {
            fs::read(dir.join(file)).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => fail(file, "file not found".into()),
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
        let ca_pem = read("ca.pem")?;
        let ca = certs("ca.pem", &ca_pem)?;
        let cert_file = format!("{stem}.pem");
        let cert_pem = read(&cert_file)?;
        let chain = certs(&cert_file, &cert_pem)?;
        let key_file = format!("{stem}.key");
        let key_pem = read(&key_file)?;
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|e| fail(&key_file, format!("unparsable PEM: {e}")))?
            .ok_or_else(|| fail(&key_file, "no private key found".into()))?;
        Ok(Identity {
            role,
            ca,
            chain,
            key,
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    /// Role this identity was loaded for.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Cluster CA certificates (trust anchors).
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }

    /// This role's certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Raw `ca.pem` bytes.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// Raw certificate PEM bytes of this role.
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    /// Raw private key PEM bytes of this role.
    pub fn key_pem(&self) -> &[u8] {
        &self.key_pem
    }

    fn config_err(&self, what: &'static str) -> impl FnOnce(String) -> TlsError {
        let role = self.role;
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

/// The cluster role a peer certificate was issued for (its subject CN,
/// `hcx-coordinator`, `hcx-node` or `hcx-client`); `None` for anything else.
/// Only meaningful for certificates already verified against the cluster CA.
pub fn peer_role(cert_der: &[u8]) -> Option<Role> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Role::ALL.into_iter().find(|r| r.common_name() == cn)
}

/// The node name a peer certificate was issued for (a URI subject
/// alternative name `urn:hcx-cluster:node:NAME`, see [`issue_node_cert`]);
/// `None` for a certificate without one, such as the shared `node.pem`.
/// Only meaningful for certificates already verified against the cluster CA.
pub fn peer_node_name(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|g| match g {
        x509_parser::extensions::GeneralName::URI(u) => u
            .strip_prefix(NODE_NAME_URI_PREFIX)
            .filter(|n| check_node_name(n).is_ok())
            .map(str::to_string),
        _ => None,
    })
}

/// The site a peer certificate places its node at (a URI subject
/// alternative name `urn:hcx-cluster:site:NAME`); `None` when it names
/// none. Only meaningful for certificates already verified against the
/// cluster CA.
pub fn peer_site(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|g| match g {
        x509_parser::extensions::GeneralName::URI(u) => u
            .strip_prefix(SITE_URI_PREFIX)
            .filter(|n| check_node_name(n).is_ok())
            .map(str::to_string),
        _ => None,
    })
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

    fn init(dir: &Path) -> CertSet {
        init_certs(
            dir,
            &["hcx-node-1.example".to_string(), "10.1.2.3".to_string()],
            false,
        )
        .unwrap()
    }

    #[test]
    fn init_writes_files_with_private_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let set = init(tmp.path());
        assert_eq!(set.files.len(), 8);
        assert_eq!(set.ca_sha256.len(), 64);
        assert!(set.server_names.iter().any(|n| n == "10.1.2.3"));
        for name in ["ca", "coordinator", "node", "client"] {
            for ext in ["pem", "key"] {
                let p = tmp.path().join(format!("{name}.{ext}"));
                assert!(p.is_file(), "{} missing", p.display());
                #[cfg(unix)]
                if ext == "key" {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                    assert_eq!(mode, 0o600, "{}", p.display());
                }
            }
        }
        let err = init_certs(tmp.path(), &[], false).unwrap_err();
        assert!(matches!(err, TlsError::Exists { .. }));
        assert!(err.to_string().contains("ca.pem"), "{err}");
        let before = fs::read(tmp.path().join("ca.pem")).unwrap();
        let again = init_certs(tmp.path(), &[], true).unwrap();
        assert_ne!(again.ca_sha256, set.ca_sha256);
        assert_ne!(before, fs::read(tmp.path().join("ca.pem")).unwrap());
    }

    #[test]
    fn invalid_host_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let err = init_certs(tmp.path(), &["bad host!".into()], false).unwrap_err();
        assert!(matches!(err, TlsError::InvalidHost { .. }), "{err}");
        assert!(!tmp.path().join("ca.pem").exists());
    }

    #[test]
    fn load_roles_and_missing_dir() {
        let tmp = tempfile::tempdir().unwrap();
        init(tmp.path());
        for role in Role::ALL {
            let id = Identity::load(tmp.path(), role).unwrap();
            assert_eq!(id.role(), role);
            assert_eq!(id.ca_certs().len(), 1);
            assert_eq!(id.cert_chain().len(), 1);
            server_config(&id, &[b"h2"]).unwrap();
            client_config(&id, &[b"h2"]).unwrap();
            let _ = tonic_server_tls(&id);
            let _ = tonic_client_tls(&id);
        }
        let missing = tmp.path().join("nope");
        let err = Identity::load(&missing, Role::Node)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ca.pem") && err.contains("file not found"),
            "{err}"
        );
        assert!(err.contains(&format!(
            "run `hcx-cluster certs init --dir {}`",
            missing.display()
        )));
        fs::write(tmp.path().join("node.pem"), b"garbage").unwrap();
        let err = Identity::load(tmp.path(), Role::Node)
            .unwrap_err()
            .to_string();
        assert!(err.contains("node.pem: no certificate found"), "{err}");
    }

    #[test]
    fn peer_roles_come_from_the_certificates() {
        let dir = tempfile::tempdir().unwrap();
        init_certs(dir.path(), &[], false).unwrap();
        for role in Role::ALL {
            let id = Identity::load(dir.path(), role).unwrap();
            assert_eq!(peer_role(id.cert_chain()[0].as_ref()), Some(role));
        }
        assert_eq!(peer_role(b"not a certificate"), None);
    }

    #[test]
    fn node_certificates_can_name_their_node() {
        let dir = tempfile::tempdir().unwrap();
        init_certs(dir.path(), &[], false).unwrap();
        let shared = Identity::load(dir.path(), Role::Node).unwrap();
        assert_eq!(shared.node_name(), None);
        let pem = issue_node_cert(dir.path(), "gpu-9", None, &["10.0.0.9".into()], false).unwrap();
        assert_eq!(pem, dir.path().join("node-gpu-9.pem"));
        let named = Identity::load_node(dir.path(), "gpu-9").unwrap();
        assert_eq!(named.node_name().as_deref(), Some("gpu-9"));
        assert_eq!(peer_role(named.cert_chain()[0].as_ref()), Some(Role::Node));
        assert_eq!(peer_site(named.cert_chain()[0].as_ref()), None);
        // A site, when given, is in the certificate; a bad one is refused.
        issue_node_cert(dir.path(), "gpu-8", Some("site-a"), &[], false).unwrap();
        let placed = Identity::load_node(dir.path(), "gpu-8").unwrap();
        let leaf = placed.cert_chain()[0].as_ref();
        assert_eq!(peer_site(leaf).as_deref(), Some("site-a"));
        assert_eq!(peer_node_name(leaf).as_deref(), Some("gpu-8"));
        let err = issue_node_cert(dir.path(), "gpu-7", Some("a b"), &[], false).unwrap_err();
        assert!(matches!(err, TlsError::InvalidSiteName { .. }), "{err}");
        // A node without its own certificate uses the shared one.
        let other = Identity::load_node(dir.path(), "gpu-10").unwrap();
        assert_eq!(other.node_name(), None);
        // Again only with force; bad names never reach a certificate.
        let err = issue_node_cert(dir.path(), "gpu-9", None, &[], false).unwrap_err();
        assert!(matches!(err, TlsError::Exists { .. }), "{err}");
        issue_node_cert(dir.path(), "gpu-9", None, &[], true).unwrap();
        for bad in ["", "a b", "../x", &"n".repeat(129)] {
            let err = issue_node_cert(dir.path(), bad, None, &[], false).unwrap_err();
            assert!(matches!(err, TlsError::InvalidNodeName { .. }), "{err}");
        }
        let err = issue_node_cert(&dir.path().join("none"), "n1", None, &[], false).unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[tokio::test]
    async fn issued_node_certificates_chain_to_the_cluster_ca() {
        let dir = tempfile::tempdir().unwrap();
        init_certs(dir.path(), &[], false).unwrap();
        issue_node_cert(dir.path(), "n1", None, &[], false).unwrap();
        let coord = Identity::load(dir.path(), Role::Coordinator).unwrap();
        let n1 = Identity::load_node(dir.path(), "n1").unwrap();
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
        init_certs(dir.path(), &[], false).unwrap();
        issue_node_cert(dir.path(), "n1", None, &["10.1.2.3".into()], false).unwrap();
        let n1 = Identity::load_node(dir.path(), "n1").unwrap();
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

    /// Starts an echo server; returns its endpoint and address.
    fn echo_server(id: &Identity) -> (quinn::Endpoint, SocketAddr) {
        echo_server_at(id, "127.0.0.1:0")
    }

    /// [`echo_server`] bound to `bind`.
    fn echo_server_at(id: &Identity, bind: &str) -> (quinn::Endpoint, SocketAddr) {
        let ep = quinn::Endpoint::server(quinn_server_config(id).unwrap(), bind.parse().unwrap())
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
        // `certs init` without --host: the coordinator certificate names
        // only the loopback names, not 127.0.0.2.
        let plain = tempfile::tempdir().unwrap();
        init(plain.path());
        let node = Identity::load(plain.path(), Role::Node).unwrap();
        let coord = Identity::load(plain.path(), Role::Coordinator).unwrap();
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
        init_certs(named.path(), &["127.0.0.2".into()], false).unwrap();
        let node = Identity::load(named.path(), Role::Node).unwrap();
        let coord = Identity::load(named.path(), Role::Coordinator).unwrap();
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
        init(good.path());
        init(other.path());
        let coord = Identity::load(good.path(), Role::Coordinator).unwrap();
        let node = Identity::load(good.path(), Role::Node).unwrap();
        let (server, addr) = echo_server(&coord);

        let msg = b"tensor bytes \x00\x01\x02".repeat(1000);
        let out = echo(quinn_client_config(&node).unwrap(), addr, &msg)
            .await
            .unwrap();
        assert_eq!(out, msg);

        // Client certificate from a different CA (it trusts our CA, so only
        // the server-side check can refuse it).
        let mut stranger = Identity::load(other.path(), Role::Node).unwrap();
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
