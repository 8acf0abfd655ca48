//! The cluster CA and node certificates (rcgen), and the files they live in.
//!
//! Layout: a CA directory holds `ca.crt` and `ca.key`; a node directory holds
//! `node.crt` and `node.key`. Private keys are written with mode 0600 and are
//! never overwritten unless the caller passes `force`.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use specter_gossip::NodeId;

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of a node certificate inside a node directory.
pub const NODE_CERT_FILE: &str = "node.crt";
/// File name of a node private key inside a node directory.
pub const NODE_KEY_FILE: &str = "node.key";

/// How long a CA stays valid: long, because rotating it means re-issuing every
/// node certificate.
const CA_VALIDITY_DAYS: i64 = 3_650;
/// How long a node certificate stays valid.
const NODE_VALIDITY_DAYS: i64 = 825;

/// Errors from the certificate commands; no file is left half-written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A key or certificate file exists and `force` was not given.
    #[error("{0} already exists (pass --force to overwrite)")]
    Exists(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// rcgen could not make or parse a key or certificate.
    #[error("{context}: {source}")]
    Cert {
        /// What was being done.
        context: String,
        /// The cause.
        source: rcgen::Error,
    },
    /// A certificate did not parse as X.509.
    #[error("{0}: not a valid X.509 certificate")]
    BadCert(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn cert_err(context: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let context = context.into();
    move |source| PkiError::Cert { context, source }
}

/// The [`NodeId`] a certificate proves: the first 8 bytes of SHA-256 of its
/// SubjectPublicKeyInfo.
pub fn node_id_of(cert_der: &[u8]) -> Result<NodeId, PkiError> {
    Ok(node_id_of_spki(&spki_of(cert_der)?))
}

/// The [`NodeId`] of a DER SubjectPublicKeyInfo.
pub fn node_id_of_spki(spki: &[u8]) -> NodeId {
    NodeId::from_digest(&Sha256::digest(spki).into())
}

/// The DER SubjectPublicKeyInfo of a certificate.
pub fn spki_of(cert_der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::BadCert(e.to_string()))?;
    Ok(cert.tbs_certificate.subject_pki.raw.to_vec())
}

/// Writes `contents` to `path`, refusing to replace an existing file unless
/// `force`; `private` files get mode 0600.
pub fn write_file(path: &Path, contents: &str, private: bool, force: bool) -> Result<(), PkiError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    if private {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists(path.to_path_buf())
        } else {
            PkiError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })?;
    if private {
        // `mode` only applies on creation; tighten a forced overwrite too.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
    }
    f.write_all(contents.as_bytes()).map_err(io_err(path))
}

fn refuse_existing(paths: &[&Path], force: bool) -> Result<(), PkiError> {
    if !force {
        if let Some(p) = paths.iter().find(|p| p.exists()) {
            return Err(PkiError::Exists(p.to_path_buf()));
        }
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// A CA certificate and key in PEM.
pub struct CaPem {
    /// Certificate.
    pub cert: String,
    /// Private key (PKCS#8).
    pub key: String,
}

/// Makes a new cluster CA.
pub fn make_ca(common_name: &str) -> Result<CaPem, PkiError> {
    let key = KeyPair::generate().map_err(cert_err("generating the CA key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Specter cluster");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_VALIDITY_DAYS);
    let cert = params
        .self_signed(&key)
        .map_err(cert_err("signing the CA certificate"))?;
    Ok(CaPem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// `specter ca init`: writes `ca.crt` and `ca.key` into `dir`.
pub fn init_ca(dir: &Path, force: bool) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
    refuse_existing(&[&cert_path, &key_path], force)?;
    let ca = make_ca("Specter cluster CA")?;
    write_file(&key_path, &ca.key, true, force)?;
    write_file(&cert_path, &ca.cert, false, force)
}

/// A node certificate and key in PEM, with the id they prove.
pub struct NodePem {
    /// Certificate (signed by the CA).
    pub cert: String,
    /// Private key (PKCS#8).
    pub key: String,
    /// The id derived from the certificate's public key.
    pub id: NodeId,
}

/// Issues a node certificate for `name` (and `ips`) signed by the CA.
pub fn make_node_cert(ca: &CaPem, name: &str, ips: &[IpAddr]) -> Result<NodePem, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key).map_err(cert_err("reading the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)
        .map_err(cert_err("reading the CA certificate"))?;
    let key = KeyPair::generate().map_err(cert_err("generating the node key"))?;
    let mut params = CertificateParams::new(vec![name.to_string()])
        .map_err(cert_err(format!("node name {name:?}")))?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Nodes both accept and dial node connections.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, NODE_VALIDITY_DAYS);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(cert_err("signing the node certificate"))?;
    Ok(NodePem {
        id: node_id_of(cert.der())?,
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// File name of an edge (public ingress) certificate.
pub const EDGE_CERT_FILE: &str = "edge.crt";
/// File name of an edge private key.
pub const EDGE_KEY_FILE: &str = "edge.key";

/// `specter ca issue-edge`: a wildcard certificate for `*.domain` (and
/// `domain`) signed by the cluster CA, for tests and demos; production
/// operators use a publicly trusted one.
pub fn issue_edge(ca_dir: &Path, domain: &str, out: &Path, force: bool) -> Result<(), PkiError> {
    let read = |p: PathBuf| fs::read_to_string(&p).map_err(io_err(&p));
    let ca = CaPem {
        cert: read(ca_dir.join(CA_CERT_FILE))?,
        key: read(ca_dir.join(CA_KEY_FILE))?,
    };
    fs::create_dir_all(out).map_err(io_err(out))?;
    let (cert_path, key_path) = (out.join(EDGE_CERT_FILE), out.join(EDGE_KEY_FILE));
    refuse_existing(&[&cert_path, &key_path], force)?;
    let edge = make_edge_cert(&ca, domain)?;
    write_file(&key_path, &edge.key, true, force)?;
    write_file(&cert_path, &edge.cert, false, force)
}

/// A wildcard server certificate for `*.domain` and `domain`.
pub fn make_edge_cert(ca: &CaPem, domain: &str) -> Result<CaPem, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key).map_err(cert_err("reading the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)
        .map_err(cert_err("reading the CA certificate"))?;
    let key = KeyPair::generate().map_err(cert_err("generating the edge key"))?;
    let mut params = CertificateParams::new(vec![format!("*.{domain}"), domain.to_string()])
        .map_err(cert_err(format!("domain {domain:?}")))?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("*.{domain}"));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params, NODE_VALIDITY_DAYS);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(cert_err("signing the edge certificate"))?;
    Ok(CaPem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// `specter ca issue-node`: writes `node.crt` and `node.key` into `out`.
pub fn issue_node(
    ca_dir: &Path,
    name: &str,
    ips: &[IpAddr],
    out: &Path,
    force: bool,
) -> Result<NodeId, PkiError> {
    let read = |p: PathBuf| fs::read_to_string(&p).map_err(io_err(&p));
    let ca = CaPem {
        cert: read(ca_dir.join(CA_CERT_FILE))?,
        key: read(ca_dir.join(CA_KEY_FILE))?,
    };
    fs::create_dir_all(out).map_err(io_err(out))?;
    let (cert_path, key_path) = (out.join(NODE_CERT_FILE), out.join(NODE_KEY_FILE));
    refuse_existing(&[&cert_path, &key_path], force)?;
    let node = make_node_cert(&ca, name, ips)?;
    write_file(&key_path, &node.key, true, force)?;
    write_file(&cert_path, &node.cert, false, force)?;
    Ok(node.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn issued_files_are_private_and_not_overwritten_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, false).unwrap();
        let mode = fs::metadata(ca.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(init_ca(&ca, false), Err(PkiError::Exists(_))));

        let out = dir.path().join("n1");
        let id = issue_node(
            &ca,
            "n1.example",
            &["127.0.0.2".parse().unwrap()],
            &out,
            false,
        )
        .unwrap();
        let pem = fs::read_to_string(out.join(NODE_CERT_FILE)).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'_>| c.to_vec())
            .unwrap();
        assert_eq!(node_id_of(&der).unwrap(), id);
        let mode = fs::metadata(out.join(NODE_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            issue_node(&ca, "n1.example", &[], &out, false),
            Err(PkiError::Exists(_))
        ));
        let again = issue_node(&ca, "n1.example", &[], &out, true).unwrap();
        assert_ne!(again, id, "a new key gives a new id");
    }
}
