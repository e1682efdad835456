//! Serving TLS (`TLS_CERT_FILE`, `TLS_KEY_FILE`): rustls with ALPN for
//! HTTP/2 and HTTP/1.1, and the certificate reloaded when its files change.
//!
//! The certificate is read through a resolver that hands each new handshake
//! the current key pair; a watcher checks the files' modification times every
//! [`RELOAD_CHECK`] and swaps in a new pair once both files parse and match.
//! Connections already open keep the session they have: nothing is dropped.
//! A pair that does not load is logged and the old one stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How often the files are checked for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// The certificate chain and private key files (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Why the files could not be served.
#[derive(Debug, Clone)]
pub struct ServerTlsError(pub String);

impl std::fmt::Display for ServerTlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot serve TLS: {}", self.0)
    }
}

impl std::error::Error for ServerTlsError {}

/// The acceptor and the reloadable key pair behind it.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    resolver: Arc<Reloading>,
}

#[derive(Debug)]
struct Reloading {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
    stamps: std::sync::Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks the pair: the chain, the key, and that they match.
pub fn load_pair(files: &TlsFiles) -> Result<CertifiedKey, ServerTlsError> {
    let err = |what: &str, path: &PathBuf, e: String| ServerTlsError(format!("{what} {}: {e}", path.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert_file)
        .map_err(|e| err("TLS_CERT_FILE", &files.cert_file, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err("TLS_CERT_FILE", &files.cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(err("TLS_CERT_FILE", &files.cert_file, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|e| err("TLS_KEY_FILE", &files.key_file, e.to_string()))?;
    CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| ServerTlsError(format!("TLS_CERT_FILE and TLS_KEY_FILE do not make a pair: {e}")))
}

fn stamps(files: &TlsFiles) -> (Option<SystemTime>, Option<SystemTime>) {
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (modified(&files.cert_file), modified(&files.key_file))
}

impl ServerTls {
    pub fn load(files: TlsFiles) -> Result<Self, ServerTlsError> {
        let pair = load_pair(&files)?;
        let resolver = Arc::new(Reloading {
            stamps: std::sync::Mutex::new(stamps(&files)),
            files,
            current: ArcSwap::from_pointee(pair),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ServerTlsError(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self { acceptor: TlsAcceptor::from(Arc::new(config)), resolver })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reloads the pair if either file changed; `Ok(true)` when it did.
    pub fn reload_if_changed(&self) -> Result<bool, ServerTlsError> {
        let now = stamps(&self.resolver.files);
        {
            let seen = self.resolver.stamps.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return Ok(false);
            }
        }
        let pair = load_pair(&self.resolver.files)?;
        self.resolver.current.store(Arc::new(pair));
        *self.resolver.stamps.lock().unwrap_or_else(|p| p.into_inner()) = now;
        Ok(true)
    }

    /// Checks the files every [`RELOAD_CHECK`] until cancelled.
    pub async fn watch(self, cancel: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_CHECK) => {}
            }
            match self.reload_if_changed() {
                Ok(true) => {
                    failing = false;
                    tracing::info!(cert_file = %self.resolver.files.cert_file.display(), "TLS certificate reloaded");
                }
                Ok(false) => {}
                Err(e) => {
                    // Files are often written one after the other: say it
                    // once, keep serving the old pair, and try again.
                    if !failing {
                        tracing::error!(error = %e, "TLS certificate files changed but do not load; serving the previous certificate");
                    }
                    failing = true;
                }
            }
        }
    }
}
