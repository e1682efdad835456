//! TLS to backends (rustls with the ring provider; no OpenSSL).
//!
//! Trust is the webpki root set plus, when given, an extra CA bundle for every
//! backend (`BACKEND_CA_FILE`) and one per backend (`tls.ca_file`). A backend
//! can present a client certificate (`tls.client_cert_file` and
//! `tls.client_key_file`, mTLS) and check another name than its host
//! (`tls.server_name`, also sent as SNI).
//!
//! Files are read when the configuration is accepted: a file that cannot be
//! read or parsed is a [`TlsError`] naming the setting and the file, which
//! stops the process at start-up and rejects an update at run time.
//!
//! A failed handshake becomes a short reason ([`reason`]) such as
//! `certificate not trusted`; no key material is ever logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};

/// A backend's own TLS settings; all optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    /// Extra CA certificates (PEM) trusted for this backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The client certificate chain (PEM) presented to the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
    /// The name checked in the backend's certificate and sent as SNI,
    /// instead of the endpoint's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// A TLS file or setting that cannot be used: which setting, which file, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    pub setting: String,
    pub file: Option<PathBuf>,
    pub reason: String,
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{} ({}): {}", self.setting, file.display(), self.reason),
            None => write!(f, "{}: {}", self.setting, self.reason),
        }
    }
}

impl std::error::Error for TlsError {}

fn file_error(setting: &str, file: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError { setting: setting.to_string(), file: Some(file.to_path_buf()), reason: reason.to_string() }
}

/// Every certificate of a PEM file; at least one.
pub fn load_certs(setting: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(setting, path, pem_reason(e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(setting, path, pem_reason(e)))?;
    if certs.is_empty() {
        return Err(file_error(setting, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn pem_reason(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => format!("cannot read the file: {io}"),
        other => format!("not valid PEM: {other:?}"),
    }
}

impl TlsSpec {
    /// Nothing set: the shared default transport serves this backend.
    pub fn is_default(&self) -> bool {
        *self == TlsSpec::default()
    }

    /// Checks every file and the name, as the client configuration would.
    pub fn validate(&self) -> Result<(), TlsError> {
        self.client_config(&[]).map(drop)
    }

    /// The rustls client configuration: roots, extra CAs, client certificate.
    pub fn client_config(&self, global_ca: &[CertificateDer<'static>]) -> Result<ClientConfig, TlsError> {
        let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        let extra = match &self.ca_file {
            Some(path) => load_certs("tls.ca_file", path)?,
            None => Vec::new(),
        };
        for cert in global_ca.iter().chain(&extra) {
            roots.add(cert.clone()).map_err(|e| TlsError {
                setting: "tls.ca_file".into(),
                file: self.ca_file.clone(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        if let Some(name) = &self.server_name {
            ServerName::try_from(name.as_str()).map_err(|_| TlsError {
                setting: "tls.server_name".into(),
                file: None,
                reason: format!("{name:?} is not a DNS name or IP address"),
            })?;
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError { setting: "tls".into(), file: None, reason: e.to_string() })?
            .with_root_certificates(roots);
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => {
                let chain = load_certs("tls.client_cert_file", cert)?;
                let key_der = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| file_error("tls.client_key_file", key, pem_reason(e)))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| file_error("tls.client_key_file", key, format!("does not match the certificate: {e}")))
            }
            (None, None) => Ok(builder.with_no_client_auth()),
            _ => Err(TlsError {
                setting: "tls.client_cert_file".into(),
                file: None,
                reason: "tls.client_cert_file and tls.client_key_file are set together".into(),
            }),
        }
    }
}

/// A short reason if `e` (or anything in its chain) is a TLS failure.
pub fn reason(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    typed_reason(e).or_else(|| {
        // HTTP/2 keeps only the text of an I/O error (io::Error is not
        // Clone), so a TLS alert after the handshake arrives as rustls's
        // message: read it back.
        let mut text = e.to_string();
        let mut cur = e.source();
        while let Some(err) = cur {
            text.push_str(": ");
            text.push_str(&err.to_string());
            cur = err.source();
        }
        reason_from_text(&text)
    })
}

fn typed_reason(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(describe(r));
        }
        // io::Error's `source` skips the error it wraps: look inside.
        if let Some(inner) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref())
            && let Some(r) = typed_reason(inner)
        {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// rustls's messages for the failures [`describe`] names.
fn reason_from_text(text: &str) -> Option<String> {
    if let Some((_, alert)) = text.split_once("received fatal alert: ") {
        let alert = alert.split(|c: char| !c.is_ascii_alphanumeric()).next().unwrap_or_default();
        return Some(match alert {
            "CertificateRequired" | "BadCertificate" | "UnknownCA" | "CertificateUnknown" | "AccessDenied" => {
                "client certificate refused".into()
            }
            other => format!("the backend sent alert {other}"),
        });
    }
    let (_, rest) = text.split_once("invalid peer certificate: ")?;
    Some(
        match rest.split(|c: char| !c.is_ascii_alphanumeric()).next().unwrap_or_default() {
            "UnknownIssuer" | "BadSignature" => "certificate not trusted",
            "Expired" => "certificate expired",
            "NotValidYet" => "certificate not yet valid",
            "NotValidForName" => "certificate not valid for this name",
            "Revoked" => "certificate revoked",
            _ => "invalid certificate",
        }
        .into(),
    )
}

fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "certificate not trusted".into(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "certificate expired".into(),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate not yet valid".into()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "certificate not valid for this name".into()
            }
            CertificateError::Revoked => "certificate revoked".into(),
            _ => "invalid certificate".into(),
        },
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::AccessDenied,
        ) => "client certificate refused".into(),
        rustls::Error::AlertReceived(a) => format!("the backend sent alert {a:?}"),
        rustls::Error::NoApplicationProtocol => "no common application protocol".into(),
        rustls::Error::PeerIncompatible(_) | rustls::Error::PeerMisbehaved(_) => "handshake failed".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_and_bad_files_name_the_setting_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = TlsSpec { ca_file: Some(missing.clone()), ..Default::default() }.validate().unwrap_err();
        assert_eq!((e.setting.as_str(), e.file.as_deref()), ("tls.ca_file", Some(missing.as_path())));
        assert!(e.to_string().contains("missing.pem"), "{e}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let e = TlsSpec { ca_file: Some(garbage), ..Default::default() }.validate().unwrap_err();
        assert!(e.reason.contains("no PEM certificate"), "{e}");

        let e =
            TlsSpec { client_cert_file: Some(dir.path().join("c.pem")), ..Default::default() }.validate().unwrap_err();
        assert!(e.reason.contains("together"), "{e}");
        let e = TlsSpec { server_name: Some("not a name!".into()), ..Default::default() }.validate().unwrap_err();
        assert_eq!(e.setting, "tls.server_name");
    }

    #[test]
    fn valid_files_make_a_config_and_a_mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["other.test".into()]).unwrap();
        let write = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let cert = write("cert.pem", ca.cert.pem());
        let key = write("key.pem", ca.signing_key.serialize_pem());
        let other_key = write("other.pem", other.signing_key.serialize_pem());
        let spec = TlsSpec {
            ca_file: Some(cert.clone()),
            client_cert_file: Some(cert.clone()),
            client_key_file: Some(key),
            server_name: Some("backend.internal".into()),
        };
        spec.validate().unwrap();
        let bad = TlsSpec { client_key_file: Some(other_key), ..spec };
        assert_eq!(bad.validate().unwrap_err().setting, "tls.client_key_file");
    }

    #[test]
    fn tls_errors_are_found_inside_io_errors() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert_eq!(reason(&io).as_deref(), Some("certificate not trusted"));
        let alert = std::io::Error::other(rustls::Error::AlertReceived(AlertDescription::CertificateRequired));
        assert_eq!(reason(&alert).as_deref(), Some("client certificate refused"));
        assert_eq!(reason(&std::io::Error::other("plain")), None);
        // As HTTP/2 reports it: the text only.
        let text =
            std::io::Error::other(rustls::Error::AlertReceived(AlertDescription::CertificateRequired).to_string());
        assert_eq!(reason(&text).as_deref(), Some("client certificate refused"));
        let text =
            std::io::Error::other(rustls::Error::InvalidCertificate(CertificateError::NotValidForName).to_string());
        assert_eq!(reason(&text).as_deref(), Some("certificate not valid for this name"));
    }
}
