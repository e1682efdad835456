//! Azure OpenAI: the OpenAI shapes at Azure's paths, with the key in
//! `api-key`. A model mapped to a deployment (`models: {gpt-4o: my-deploy}`)
//! goes to `/openai/deployments/{deployment}/{operation}?api-version=...`
//! (the backend's `api_version`, default [`DEFAULT_API_VERSION`]); a model
//! without a deployment, and the Responses API, go to the `/openai/v1/...`
//! form, which names the deployment in the body's `model`. Bodies, usage and
//! streams are OpenAI's.

use bytes::Bytes;
use http::Uri;
use http::header::{HeaderName, HeaderValue};

use crate::operation::Operation;
use crate::provider::{Provider, Target, UpstreamRequest};
use crate::sse::StreamFacts;
use crate::usage::Usage;

pub struct Azure;

/// The `api-version` sent on the deployments form when the backend sets none.
pub const DEFAULT_API_VERSION: &str = "2024-10-21";

fn operation_path(op: Operation) -> Option<&'static str> {
    match op {
        Operation::Chat => Some("chat/completions"),
        Operation::Completions => Some("completions"),
        Operation::Embeddings => Some("embeddings"),
        Operation::Responses => Some("responses"),
        Operation::Native | Operation::Messages | Operation::CountTokens => None,
    }
}

impl Provider for Azure {
    fn name(&self) -> &'static str {
        "azure"
    }

    /// Every path depends on the model: see [`Provider::uri`].
    fn path(&self, _: Operation) -> Option<&'static str> {
        None
    }

    fn serves(&self, op: Operation) -> bool {
        operation_path(op).is_some()
    }

    fn uri(&self, target: &Target, op: Operation, model: &str) -> Option<Uri> {
        let path = operation_path(op)?;
        let base = &target.endpoint;
        let uri = match target.mapped_model(model) {
            Some(deployment) if op != Operation::Responses => {
                let version = target.api_version.as_deref().unwrap_or(DEFAULT_API_VERSION);
                format!("{base}/openai/deployments/{deployment}/{path}?api-version={version}")
            }
            _ => format!("{base}/openai/v1/{path}"),
        };
        uri.parse().ok()
    }

    fn credential_header(&self, secret: &str) -> Result<(HeaderName, HeaderValue), String> {
        let mut v =
            HeaderValue::from_str(secret).map_err(|_| "the credential is not a valid header value".to_string())?;
        v.set_sensitive(true);
        Ok((HeaderName::from_static("api-key"), v))
    }

    fn body(&self, request: &UpstreamRequest<'_>, target: &Target) -> Bytes {
        crate::openai::body(request, target.mapped_model(request.model))
    }

    fn usage(&self, op: Operation, body: &[u8]) -> Option<Usage> {
        crate::openai::usage(op, body)
    }

    fn stream_event(&self, op: Operation, event: Option<&[u8]>, data: &[u8], facts: &mut StreamFacts) {
        crate::openai::stream_event(op, event, data, facts)
    }

    fn health_path(&self) -> &'static str {
        "/openai/v1/models"
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::provider::Kind;

    #[test]
    fn deployments_get_their_path_and_api_version_and_others_the_v1_form() {
        let kind = Kind::parse("azure").unwrap();
        let models: BTreeMap<String, String> = [("gpt-4o".to_string(), "prod-4o".to_string())].into();
        let credential = kind.provider().credential_header("k").unwrap();
        assert_eq!(credential.0.as_str(), "api-key");
        let t = Target::new(kind, "https://acme.openai.azure.com", models, Some(credential));
        let uri = |op, model| Azure.uri(&t, op, model).unwrap().to_string();
        assert_eq!(
            uri(Operation::Chat, "gpt-4o"),
            "https://acme.openai.azure.com/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(uri(Operation::Embeddings, "other"), "https://acme.openai.azure.com/openai/v1/embeddings");
        assert_eq!(uri(Operation::Responses, "gpt-4o"), "https://acme.openai.azure.com/openai/v1/responses");
        let t = t.with_settings(Some("2025-04-01-preview".into()), None);
        assert!(
            Azure.uri(&t, Operation::Chat, "gpt-4o").unwrap().to_string().ends_with("api-version=2025-04-01-preview")
        );
        assert!(Azure.uri(&t, Operation::Messages, "gpt-4o").is_none());
        assert_eq!(t.health_uri.to_string(), "https://acme.openai.azure.com/openai/v1/models");
    }
}
