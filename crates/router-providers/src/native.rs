//! The router's own backend shape: `POST /v1/inference` with the client's
//! body forwarded as it came, usage in the answer's `usage` object. Serves
//! only the native door.

use bytes::Bytes;

use crate::operation::Operation;
use crate::provider::{Provider, Target, UpstreamRequest};
use crate::sse::StreamFacts;
use crate::usage::Usage;

pub struct Native;

impl Provider for Native {
    fn name(&self) -> &'static str {
        "native"
    }

    fn path(&self, op: Operation) -> Option<&'static str> {
        (op == Operation::Native).then_some("/v1/inference")
    }

    fn body(&self, request: &UpstreamRequest<'_>, _: &Target) -> Bytes {
        request.body.clone()
    }

    fn usage(&self, _: Operation, body: &[u8]) -> Option<Usage> {
        Usage::from_json_field(body)
    }

    fn stream_event(&self, _: Operation, _: Option<&[u8]>, data: &[u8], facts: &mut StreamFacts) {
        facts.openai_like(data);
    }
}
