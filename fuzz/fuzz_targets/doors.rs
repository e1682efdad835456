//! A request body (and an X-Request-Id) at every door's parser: an answer
//! (a request or an error), never a panic; and the native door's quick
//! reading of its two fields never disagrees with serde's.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use router_core::auth::Principal;
use router_providers::Operation;

fuzz_target!(|data: &[u8]| {
    assert!(router_http::native::walk_agrees(data), "the native door's walk and serde disagree");
    let body = Bytes::copy_from_slice(data);
    let _ = router_http::native::parse(body.clone(), Principal::organization("o"));
    let mut headers = http::HeaderMap::new();
    if let Some(id) = data.get(..data.len().min(40)).and_then(|d| http::HeaderValue::from_bytes(d).ok()) {
        headers.insert("x-request-id", id);
    }
    for op in [Operation::Chat, Operation::Completions, Operation::Embeddings, Operation::Responses] {
        let _ = router_http::openai::parse(op, body.clone(), Principal::organization("o"), &headers);
    }
    for op in [Operation::Messages, Operation::CountTokens] {
        let _ = router_http::anthropic::parse(op, body.clone(), Principal::organization("o"), &headers);
    }
});
