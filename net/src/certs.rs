//! Making the cluster's certificates: a CA that stays on the operator's
//! machine (`hcx-cluster certs init`), and one certificate per machine
//! signed by it (`hcx-cluster certs issue`), which names the machine's
//! role, its name and its labels. What a certificate says is read back
//! with [`read_facts`].
//!
//! An issued folder holds exactly what one machine needs: `ca.pem` (to
//! check its peers), `cert.pem` and `key.pem`. The CA key is never written
//! there, and a machine refuses to start from a folder that holds one.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};

use crate::tls::{Role, TlsError};

/// The CA certificate's file, in the CA folder and in every issued folder.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key's file; only ever in the CA folder.
pub const CA_KEY_FILE: &str = "ca.key";
/// An issued folder's certificate.
pub const CERT_FILE: &str = "cert.pem";
/// An issued folder's private key.
pub const KEY_FILE: &str = "key.pem";

/// A certificate names its role and name in one URI subject alternative
/// name: `urn:hcx-cluster:node:gpu-9`.
pub const URI_PREFIX: &str = "urn:hcx-cluster:";
/// A certificate carries each label in a URI subject alternative name
/// `urn:hcx-cluster:label:KEY=VALUE` (`site` is the label a federated
/// job's calibration data follows).
pub const LABEL_URI_PREFIX: &str = "urn:hcx-cluster:label:";

/// Whether `name` can be a certified name (of a machine, a site, a label
/// key or value): 1 to 128 ASCII letters, digits, `.`, `_` or `-`.
pub fn check_name(name: &str) -> Result<(), TlsError> {
    if hcx_protocol::job::valid_certified_name(name) {
        Ok(())
    } else {
        Err(TlsError::InvalidName {
            name: name.to_string(),
        })
    }
}

/// Parses a `KEY=VALUE` label as given to `certs issue --label`.
pub fn parse_label(text: &str) -> Result<(String, String), TlsError> {
    let bad = |reason: &str| TlsError::InvalidLabel {
        label: text.to_string(),
        reason: reason.to_string(),
    };
    let (k, v) = text.split_once('=').ok_or_else(|| bad("not KEY=VALUE"))?;
    for part in [k, v] {
        if !hcx_protocol::job::valid_certified_name(part) {
            return Err(bad(
                "keys and values are 1 to 128 ASCII letters, digits, `.`, `_` or `-`",
            ));
        }
    }
    Ok((k.to_string(), v.to_string()))
}

/// A certificate serial number as the CLI prints and takes it: lowercase
/// hex without separators or leading zero bytes.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    hex::encode(&raw[start..])
}

/// Reads a serial number typed by an operator (hex, `:` separators and
/// case allowed) into the form [`serial_hex`] prints.
pub fn parse_serial(text: &str) -> Result<String, TlsError> {
    let digits: String = text.trim().chars().filter(|c| *c != ':').collect();
    let bad = || TlsError::InvalidSerial {
        serial: text.to_string(),
    };
    if digits.is_empty() || digits.len() > 40 {
        return Err(bad());
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let raw = hex::decode(padded.to_ascii_lowercase()).map_err(|_| bad())?;
    let s = serial_hex(&raw);
    if s.is_empty() { Err(bad()) } else { Ok(s) }
}

/// What a cluster certificate says about the machine holding it. Only
/// meaningful for a certificate already verified against the cluster CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// The role it was issued for.
    pub role: Role,
    /// The machine's name (a node's `--name`).
    pub name: String,
    /// Its labels (`site`, `gpu`, ...).
    pub labels: BTreeMap<String, String>,
    /// Its serial number (see [`serial_hex`]), which `certs revoke` names.
    pub serial: String,
    /// The DNS names and IP addresses it may serve on.
    pub hosts: Vec<String>,
    /// The end of its validity, as Unix seconds.
    pub not_after: i64,
}

/// Reads role, name, labels and serial from a DER certificate made by
/// [`issue`]; `None` for anything else (no role and name, an unknown
/// role, a name or label that could not have been issued).
pub fn read_facts(cert_der: &[u8]) -> Option<CertFacts> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut who: Option<(Role, String)> = None;
    let mut labels = BTreeMap::new();
    let mut hosts = Vec::new();
    for g in &san.value.general_names {
        match g {
            GeneralName::URI(u) => {
                if let Some(label) = u.strip_prefix(LABEL_URI_PREFIX) {
                    let (k, v) = parse_label(label).ok()?;
                    labels.insert(k, v);
                } else if let Some(rest) = u.strip_prefix(URI_PREFIX) {
                    let (role, name) = rest.split_once(':')?;
                    let role = Role::parse(role)?;
                    check_name(name).ok()?;
                    if who.replace((role, name.to_string())).is_some() {
                        return None;
                    }
                }
            }
            GeneralName::DNSName(d) => hosts.push(d.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => hosts.push(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                16 => hosts.push(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                _ => {}
            },
            _ => {}
        }
    }
    let (role, name) = who?;
    Some(CertFacts {
        role,
        name,
        labels,
        serial: serial_hex(cert.raw_serial()),
        hosts,
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// What [`init_ca`] wrote.
#[derive(Debug, Clone)]
pub struct CaInfo {
    /// The CA folder.
    pub dir: PathBuf,
    /// `ca.pem` and `ca.key`.
    pub files: Vec<PathBuf>,
    /// Hex SHA-256 of the CA certificate (DER), to compare across machines.
    pub sha256: String,
}

/// Makes a new cluster CA in `dir`: `ca.pem` and `ca.key` (0600). It
/// issues every machine's certificate and should stay on the operator's
/// machine. Existing files are an error unless `force`.
pub fn init_ca(dir: &Path, force: bool) -> Result<CaInfo, TlsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if !force && let Some(p) = [&cert_path, &key_path].into_iter().find(|p| exists(p)) {
        return Err(TlsError::Exists { path: p.clone() });
    }
    let key = KeyPair::generate().map_err(gen_err("CA key"))?;
    let cert = ca_params()
        .self_signed(&key)
        .map_err(gen_err("CA certificate"))?;
    fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
    write_file(&cert_path, cert.pem().as_bytes(), false, force)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), true, force)?;
    Ok(CaInfo {
        dir: dir.to_path_buf(),
        files: vec![cert_path, key_path],
        sha256: hex::encode(Sha256::digest(cert.der())),
    })
}

/// One machine's certificate, as `certs issue` asks for it.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// What the machine is.
    pub role: Role,
    /// Its name: a node's name, a coordinator's or an operator's.
    pub name: String,
    /// DNS names or IP addresses it serves on, beside the loopback names
    /// (`localhost`, `127.0.0.1`, `::1`) every server certificate has.
    /// Clients dial these; a client certificate takes none.
    pub hosts: Vec<String>,
    /// Its labels; coordinators take a node's labels from here.
    pub labels: BTreeMap<String, String>,
}

/// What [`issue`] wrote.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The machine's folder.
    pub dir: PathBuf,
    /// `ca.pem`, `cert.pem`, `key.pem`.
    pub files: Vec<PathBuf>,
    /// What the certificate says.
    pub facts: CertFacts,
}

/// Issues one machine's certificate with the CA in `ca_dir` and writes
/// what that machine needs into `out_dir` (its `--certs`): `ca.pem`,
/// `cert.pem`, `key.pem` (0600). The CA key stays in `ca_dir`; `out_dir`
/// may not be `ca_dir` or hold a CA key. Existing files are an error
/// unless `force`.
pub fn issue(
    ca_dir: &Path,
    out_dir: &Path,
    req: &IssueRequest,
    force: bool,
) -> Result<Issued, TlsError> {
    check_name(&req.name)?;
    for (k, v) in &req.labels {
        parse_label(&format!("{k}={v}"))?;
    }
    if req.role == Role::Client && !req.hosts.is_empty() {
        return Err(TlsError::InvalidHost {
            host: req.hosts[0].clone(),
            reason: "a client certificate serves nothing, so it takes no --host".into(),
        });
    }
    if exists(&out_dir.join(CA_KEY_FILE)) {
        return Err(TlsError::CaKeyBeside {
            dir: out_dir.to_path_buf(),
        });
    }
    let ca_cert_pem = read_ca_file(ca_dir, CA_CERT_FILE)?;
    let ca_key_pem = read_ca_file(ca_dir, CA_KEY_FILE)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::Load {
        dir: ca_dir.to_path_buf(),
        file: CA_KEY_FILE.into(),
        problem: format!("not a private key: {e}"),
    })?;
    let issuer = Issuer::new(ca_params(), ca_key);

    let mut sans = if req.role == Role::Client {
        Vec::new()
    } else {
        server_sans(&req.hosts)?
    };
    let mut uris = vec![format!("{URI_PREFIX}{}:{}", req.role, req.name)];
    uris.extend(
        req.labels
            .iter()
            .map(|(k, v)| format!("{LABEL_URI_PREFIX}{k}={v}")),
    );
    for uri in uris {
        sans.push(SanType::URI(uri.clone().try_into().map_err(|e| {
            TlsError::InvalidHost {
                host: uri,
                reason: format!("{e}"),
            }
        })?));
    }
    let what = format!("certificate of {} {}", req.role, req.name);
    let key = KeyPair::generate().map_err(gen_err(&what))?;
    let mut params = leaf_params(req.role, &req.name, sans);
    params.serial_number = Some(new_serial(&key));
    let cert = params.signed_by(&key, &issuer).map_err(gen_err(&what))?;
    let facts = read_facts(cert.der()).ok_or_else(|| TlsError::Generate {
        what: what.clone(),
        source: rcgen::Error::CouldNotParseCertificate,
    })?;

    let files: Vec<PathBuf> = [CA_CERT_FILE, CERT_FILE, KEY_FILE]
        .iter()
        .map(|f| out_dir.join(f))
        .collect();
    if !force && let Some(p) = files.iter().find(|p| exists(p)) {
        return Err(TlsError::Exists { path: p.clone() });
    }
    fs::create_dir_all(out_dir).map_err(io_err(out_dir, "create directory"))?;
    write_file(&files[0], ca_cert_pem.as_bytes(), false, force)?;
    write_file(&files[1], cert.pem().as_bytes(), false, force)?;
    write_file(&files[2], key.serialize_pem().as_bytes(), true, force)?;
    Ok(Issued {
        dir: out_dir.to_path_buf(),
        files,
        facts,
    })
}

/// A development cluster's certificates under one folder, for tests, the
/// embedded cluster of `run --nodes` and scripts on one machine: the CA in
/// `ca/`, one coordinator certificate shared by the coordinators in
/// `coordinator/`, an operator's in `client/`, and each node's in
/// `node-NAME/`.
#[derive(Debug, Clone)]
pub struct DevCerts {
    /// The folder holding them all.
    pub root: PathBuf,
}

impl DevCerts {
    /// Makes the CA, the coordinator certificate (valid for `hosts` and
    /// loopback) and the client certificate under `root`, which must not
    /// hold them yet.
    pub fn create(root: &Path, hosts: &[String]) -> Result<DevCerts, TlsError> {
        let dev = DevCerts {
            root: root.to_path_buf(),
        };
        init_ca(&dev.ca(), false)?;
        for (role, name, hosts) in [
            (Role::Coordinator, "coordinator", hosts.to_vec()),
            (Role::Client, "operator", Vec::new()),
        ] {
            let req = IssueRequest {
                role,
                name: name.into(),
                hosts,
                labels: BTreeMap::new(),
            };
            issue(&dev.ca(), &dev.root.join(role.to_string()), &req, false)?;
        }
        Ok(dev)
    }

    /// Issues node `name`'s certificate (valid for `hosts`, with `labels`)
    /// into [`DevCerts::node`]`(name)`.
    pub fn add_node(
        &self,
        name: &str,
        hosts: &[String],
        labels: &[(&str, &str)],
    ) -> Result<Issued, TlsError> {
        let req = IssueRequest {
            role: Role::Node,
            name: name.into(),
            hosts: hosts.to_vec(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        issue(&self.ca(), &self.node(name), &req, false)
    }

    /// The CA folder (holds `ca.key`).
    pub fn ca(&self) -> PathBuf {
        self.root.join("ca")
    }

    /// The coordinators' folder.
    pub fn coordinator(&self) -> PathBuf {
        self.root.join("coordinator")
    }

    /// The operator's (client) folder.
    pub fn client(&self) -> PathBuf {
        self.root.join("client")
    }

    /// Node `name`'s folder.
    pub fn node(&self, name: &str) -> PathBuf {
        self.root.join(format!("node-{name}"))
    }
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn read_ca_file(ca_dir: &Path, file: &str) -> Result<String, TlsError> {
    fs::read_to_string(ca_dir.join(file)).map_err(|e| TlsError::Load {
        dir: ca_dir.to_path_buf(),
        file: file.into(),
        problem: match e.kind() {
            io::ErrorKind::NotFound => {
                "file not found (is this the folder `certs init` made?)".into()
            }
            _ => format!("cannot read: {e}"),
        },
    })
}

/// A random positive serial: 16 bytes of the SHA-256 of the new key's
/// public half and the clock, top bit clear.
fn new_serial(key: &KeyPair) -> SerialNumber {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut h = Sha256::new();
    h.update(key.public_key_pem().as_bytes());
    h.update(nanos.to_le_bytes());
    let mut bytes = h.finalize()[..16].to_vec();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

pub(crate) fn io_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(io::Error) -> TlsError + 'a {
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
fn server_sans(hosts: &[String]) -> Result<Vec<SanType>, TlsError> {
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
    names
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
        .collect()
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
    if force && exists(path) {
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

/// The cluster CA's parameters; the same every time, so a CA key loaded
/// back from `ca.key` issues certificates that chain to `ca.pem`.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    validity(&mut params);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "hcx-cluster CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "hcx-cluster");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A machine certificate's parameters: CN is its name, coordinators and
/// nodes also serve (server auth).
fn leaf_params(role: Role, name: &str, sans: Vec<SanType>) -> CertificateParams {
    let mut params = CertificateParams::default();
    validity(&mut params);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "hcx-cluster");
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, role.to_string());
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if role != Role::Client {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    params.subject_alt_names = sans;
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node_req(name: &str, labels: &[(&str, &str)]) -> IssueRequest {
        IssueRequest {
            role: Role::Node,
            name: name.into(),
            hosts: vec!["10.1.2.3".into(), "gpu-9.example".into()],
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn init_makes_only_the_ca_and_refuses_to_overwrite_it() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = init_ca(tmp.path(), false).unwrap();
        assert_eq!(ca.sha256.len(), 64);
        let mut names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["ca.key", "ca.pem"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(tmp.path().join("ca.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let err = init_ca(tmp.path(), false).unwrap_err();
        assert!(matches!(err, TlsError::Exists { .. }), "{err}");
        let again = init_ca(tmp.path(), true).unwrap();
        assert_ne!(again.sha256, ca.sha256);
    }

    #[test]
    fn an_issued_folder_holds_one_machine_and_no_ca_key() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("ca");
        init_ca(&ca_dir, false).unwrap();
        let out = tmp.path().join("gpu-9");
        let got = issue(
            &ca_dir,
            &out,
            &node_req("gpu-9", &[("site", "a"), ("gpu", "h100")]),
            false,
        )
        .unwrap();
        let mut names: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["ca.pem", "cert.pem", "key.pem"]);
        let ca_key = fs::read_to_string(ca_dir.join("ca.key")).unwrap();
        for f in &got.files {
            let body = fs::read_to_string(f).unwrap();
            assert!(
                !body.contains(ca_key.trim()),
                "{} holds the CA key",
                f.display()
            );
        }
        assert_eq!(
            fs::read(out.join("ca.pem")).unwrap(),
            fs::read(ca_dir.join("ca.pem")).unwrap()
        );
        let f = &got.facts;
        assert_eq!((f.role, f.name.as_str()), (Role::Node, "gpu-9"));
        assert_eq!(f.labels.get("site").map(String::as_str), Some("a"));
        assert_eq!(f.labels.get("gpu").map(String::as_str), Some("h100"));
        assert!(f.hosts.iter().any(|h| h == "10.1.2.3"), "{:?}", f.hosts);
        assert!(f.hosts.iter().any(|h| h == "gpu-9.example"));
        assert!(f.hosts.iter().any(|h| h == "127.0.0.1"));
        assert_eq!(f.serial.len(), 32, "{}", f.serial);
        // Read back from the file, the certificate says the same.
        let pem = fs::read(out.join("cert.pem")).unwrap();
        let der = rustls_pemfile::certs(&mut &pem[..])
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(read_facts(der.as_ref()).as_ref(), Some(f));
        // Two certificates for one name still have different serials.
        let other = issue(&ca_dir, &out, &node_req("gpu-9", &[]), true).unwrap();
        assert_ne!(other.facts.serial, f.serial);
    }

    #[test]
    fn issue_refuses_what_it_cannot_certify() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("ca");
        init_ca(&ca_dir, false).unwrap();
        let out = tmp.path().join("m");
        for bad in ["", "a b", "../x", &"n".repeat(129)] {
            let err = issue(&ca_dir, &out, &node_req(bad, &[]), false).unwrap_err();
            assert!(matches!(err, TlsError::InvalidName { .. }), "{err}");
        }
        let err = issue(&ca_dir, &out, &node_req("n1", &[("site", "a b")]), false).unwrap_err();
        assert!(matches!(err, TlsError::InvalidLabel { .. }), "{err}");
        let mut req = node_req("n1", &[]);
        req.hosts = vec!["bad host!".into()];
        let err = issue(&ca_dir, &out, &req, false).unwrap_err();
        assert!(matches!(err, TlsError::InvalidHost { .. }), "{err}");
        let client = IssueRequest {
            role: Role::Client,
            ..node_req("ops", &[])
        };
        let err = issue(&ca_dir, &out, &client, false).unwrap_err();
        assert!(err.to_string().contains("takes no --host"), "{err}");
        // Into the CA's own folder: the CA key would sit beside the machine's.
        let err = issue(&ca_dir, &ca_dir, &node_req("n1", &[]), false).unwrap_err();
        assert!(matches!(err, TlsError::CaKeyBeside { .. }), "{err}");
        // Without a CA.
        let err = issue(&tmp.path().join("none"), &out, &node_req("n1", &[]), false).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
        assert!(!out.exists());
        // Not twice without force.
        issue(&ca_dir, &out, &node_req("n1", &[]), false).unwrap();
        let err = issue(&ca_dir, &out, &node_req("n1", &[]), false).unwrap_err();
        assert!(matches!(err, TlsError::Exists { .. }), "{err}");
    }

    #[test]
    fn a_client_certificate_serves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dev = DevCerts::create(tmp.path(), &[]).unwrap();
        let pem = fs::read(dev.client().join("cert.pem")).unwrap();
        let der = rustls_pemfile::certs(&mut &pem[..])
            .next()
            .unwrap()
            .unwrap();
        let f = read_facts(der.as_ref()).unwrap();
        assert_eq!((f.role, f.name.as_str()), (Role::Client, "operator"));
        assert!(f.hosts.is_empty(), "{:?}", f.hosts);
        assert_eq!(read_facts(b"not a certificate"), None);
    }

    #[test]
    fn serials_read_as_typed() {
        assert_eq!(parse_serial("4A:0b:FF").unwrap(), "4a0bff");
        assert_eq!(parse_serial("004a0bff").unwrap(), "4a0bff");
        assert_eq!(parse_serial("abc").unwrap(), "0abc");
        for bad in ["", "xyz", "00", &"1".repeat(41)] {
            assert!(parse_serial(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn labels_parse_back(k in "[a-z0-9_.-]{1,20}", v in "[A-Za-z0-9_.-]{1,20}") {
            prop_assert_eq!(parse_label(&format!("{k}={v}")).unwrap(), (k, v));
        }

        #[test]
        fn label_parsing_never_panics(s in "\\PC{0,40}") {
            let _ = parse_label(&s);
        }

        #[test]
        fn serials_round_trip(raw in proptest::collection::vec(any::<u8>(), 1..20)) {
            let hex = serial_hex(&raw);
            prop_assume!(!hex.is_empty());
            prop_assert_eq!(parse_serial(&hex).unwrap(), hex.clone());
        }
    }
}
