//! Where a backend's upstream credential is read from. The secret itself is
//! never part of the configuration state, the admin API or the logs.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CredentialRef {
    /// The name of an environment variable.
    Env(String),
    /// A file holding the secret.
    File(PathBuf),
}

impl CredentialRef {
    /// Reads the secret (trimmed). The error never contains the secret.
    pub fn resolve(&self) -> Result<String, String> {
        let secret = match self {
            CredentialRef::Env(name) => {
                std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?
            }
            CredentialRef::File(path) => {
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
            }
        };
        let secret = secret.trim().to_string();
        if secret.is_empty() { Err("the credential is empty".into()) } else { Ok(secret) }
    }
}
