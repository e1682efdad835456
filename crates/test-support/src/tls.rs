//! Certificates made at test time (rcgen): a private CA, a server certificate
//! it signed for `localhost` and `127.0.0.1`, an expired one, one for another
//! name, and a client certificate, all written as PEM files to a temp dir.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// A private PKI in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    /// The CA certificate (what a client trusts).
    pub ca: PathBuf,
    /// A certificate for `localhost` and `127.0.0.1`, and its key.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Another certificate for the same names, from the same CA (a renewal).
    pub renewed_cert: PathBuf,
    pub renewed_key: PathBuf,
    /// The same names, but expired.
    pub expired_cert: PathBuf,
    pub expired_key: PathBuf,
    /// Valid, but for `other.example` only.
    pub wrong_name_cert: PathBuf,
    pub wrong_name_key: PathBuf,
    /// A client certificate the CA signed, and its key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA nobody trusts, and a server certificate it signed.
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params("api-router test CA").self_signed(&ca_key).unwrap();
        let ca = write("ca.pem", ca_cert.pem());
        let issuer = Issuer::new(ca_params("api-router test CA"), ca_key);

        let leaf = |names: &[&str], expired: bool| {
            let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
            p.distinguished_name.push(DnType::CommonName, names[0]);
            if expired {
                p.not_before = rcgen::date_time_ymd(2020, 1, 1);
                p.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (c, k) = leaf(&["localhost", "127.0.0.1"], false);
        let (server_cert, server_key) = (write("server.pem", c), write("server.key", k));
        let (c, k) = leaf(&["localhost", "127.0.0.1"], false);
        let (renewed_cert, renewed_key) = (write("renewed.pem", c), write("renewed.key", k));
        let (c, k) = leaf(&["localhost", "127.0.0.1"], true);
        let (expired_cert, expired_key) = (write("expired.pem", c), write("expired.key", k));
        let (c, k) = leaf(&["other.example"], false);
        let (wrong_name_cert, wrong_name_key) = (write("wrong.pem", c), write("wrong.key", k));
        let (c, k) = leaf(&["client.api-router.test"], false);
        let (client_cert, client_key) = (write("client.pem", c), write("client.key", k));

        let rogue_key = KeyPair::generate().unwrap();
        let rogue_issuer = Issuer::new(ca_params("rogue CA"), rogue_key);
        let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &rogue_issuer).unwrap();
        let (rogue_cert, rogue_key) = (write("rogue.pem", cert.pem()), write("rogue.key", key.serialize_pem()));

        Pki {
            dir,
            ca,
            server_cert,
            server_key,
            renewed_cert,
            renewed_key,
            expired_cert,
            expired_key,
            wrong_name_cert,
            wrong_name_key,
            client_cert,
            client_key,
            rogue_cert,
            rogue_key,
        }
    }
}

/// The DER of the first certificate in a PEM file.
pub fn cert_der(path: &std::path::Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_file_iter(path).unwrap().next().unwrap().unwrap().to_vec()
}

/// A TLS connection to `addr` (as `localhost`) trusting only `ca`; returns
/// the stream and the certificate the server presented.
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
) -> (tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Vec<u8>) {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (stream, leaf)
}
