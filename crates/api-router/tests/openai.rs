//! The OpenAI-compatible door: the official Python SDK end to end, streaming
//! passthrough, failover before the first byte, a stream broken midway, a
//! client that leaves, and bad input in OpenAI's error shape.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::Method;
use serde_json::json;
use test_support::*;

fn sdk(router: &Router, scenario: &str, env: &[(&str, &str)]) {
    test_support::python::sdk("openai_sdk_check.py", router, KEY_A, scenario, env);
}

fn openai_router(mocks: &[&Mock]) -> Router {
    RouterBuilder::new(&[]).openai(mocks).env("HEALTH_CHECK_INTERVAL_MS", "60000").start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_chat_and_completions() {
    let m1 = Mock::start("backend-1", &[]);
    let router = openai_router(&[&m1]);
    sdk(&router, "chat", &[]);
    let text = router.metrics().await;
    assert_eq!(metric(&text, "api_router_tokens_total", &[("type", "prompt")]), 24.0);
    assert_eq!(metric(&text, "api_router_tokens_total", &[("type", "completion")]), 18.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_streaming_with_usage() {
    let m1 = Mock::start("backend-1", &[]);
    let router = openai_router(&[&m1]);
    sdk(&router, "stream", &[]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric_or_zero(&router.metrics().await, "api_router_tokens_total", &[("type", "completion")]) == 5.0
        })
        .await,
        "stream usage reached the token counter"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_embeddings_and_models() {
    let m1 = Mock::start("backend-1", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("router.yaml");
    std::fs::write(
        &config,
        format!(
            "backends:\n  - backend_id: backend-1\n    endpoint: {}\n    kind: openai\n    models: {{gpt-4o: llama-3-8b}}\n",
            m1.url()
        ),
    )
    .unwrap();
    let router = RouterBuilder::new(&[]).env("ROUTER_CONFIG", config.to_str().unwrap()).start();
    sdk(&router, "embeddings", &[]);
    sdk(&router, "models", &[]);
    // The alias was mapped to the backend's own model name.
    assert_eq!(m1.stats().await["last_model"], "llama-3-8b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_raises_typed_errors_for_401_429_and_402() {
    let m1 = Mock::start("backend-1", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("router.yaml");
    std::fs::write(&config, "prices:\n  gpt-4o: {input_per_1k: 1, output_per_1k: 1, request_cost: 1.0}\n").unwrap();
    let router = RouterBuilder::new(&[])
        .openai(&[&m1])
        .env("ROUTER_CONFIG", config.to_str().unwrap())
        .env("API_KEYS", &format!("{KEY_A}=org-a,{KEY_B}=org-b,key-org-c=org-c"))
        .start();
    for (org, l) in [
        ("org-b", json!({"rate_limit": {"requests_per_second": 0.001, "burst": 1}})),
        ("org-c", json!({"budget": {"amount": 0.5, "period": "daily"}})),
    ] {
        assert_eq!(router.admin_put(&format!("/v1/admin/organizations/{org}/limits"), l).await.status, 200);
    }
    sdk(&router, "errors", &[("RATE_LIMITED_KEY", KEY_B), ("BROKE_KEY", "key-org-c")]);
}

/// Sends a streaming chat request; returns (status, headers, frames with
/// their arrival time since the request was sent).
async fn stream_frames(router: &Router, request_id: &str) -> (u16, hyper::HeaderMap, Vec<(Duration, String)>) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let body = json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let req = hyper::Request::post(router.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY_A}"))
        .header("x-request-id", request_id)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let t0 = Instant::now();
    let resp = client.request(req).await.unwrap();
    let (parts, mut body) = resp.into_parts();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            frames.push((t0.elapsed(), String::from_utf8_lossy(&data).into_owned()));
        }
    }
    (parts.status.as_u16(), parts.headers, frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_is_forwarded_as_it_arrives() {
    let m1 = Mock::start("backend-1", &[]);
    m1.faults(json!({"stream_chunks": 10, "stream_delay_ms": 200})).await;
    let router = openai_router(&[&m1]);
    let (status, headers, frames) = stream_frames(&router, "stream-timing-1").await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("content-type").unwrap(), "text/event-stream");
    // The first chunk comes long before the last (1.8 s later), not with it.
    assert!(frames[0].0 < Duration::from_secs(1), "first chunk after {:?}", frames[0].0);
    let content: Vec<&(Duration, String)> = frames.iter().filter(|(_, f)| f.contains(r#""content":"tok"#)).collect();
    assert_eq!(content.len(), 10, "{frames:?}");
    // Spread out, not all at the end: the 10th arrives ~1.8 s after the 1st.
    let spread = content[9].0 - content[0].0;
    assert!(spread >= Duration::from_millis(1500), "chunks arrived within {spread:?}");
    assert!(content[4].0 - content[0].0 >= Duration::from_millis(700));
    assert!(frames.last().unwrap().1.contains("[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primary_fails_over_before_the_first_byte() {
    let mut m1 = Mock::start("backend-1", &[]);
    let m2 = Mock::start("backend-2", &[]);
    let router = openai_router(&[&m1, &m2]);
    let p = policy("org-a", "gpt-4o", &[("backend-1", 1), ("backend-2", 0)], 5);
    assert_eq!(router.admin_post("/v1/admin/routing/policies", p).await.status, 200);
    router.wait_health_round().await;
    m1.kill();
    let (status, headers, frames) = stream_frames(&router, "stream-failover-1").await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("x-backend-id").unwrap(), "backend-2");
    assert!(frames.iter().any(|(_, f)| f.contains("[DONE]")));
    let d = router.decisions("decision_type=FAILOVER").await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["backend_id"], "backend-2");
    assert_eq!(d[0]["request_id"], "stream-failover-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_broken_midway_ends_with_an_error_event_and_no_retry() {
    let m1 = Mock::start("backend-1", &[]);
    let m2 = Mock::start("backend-2", &[]);
    // A delay between chunks, so the first ones reach the router before the cut.
    m1.faults(json!({"stream_chunks": 10, "stream_delay_ms": 50, "cut_stream_after": 3})).await;
    let router = openai_router(&[&m1, &m2]);
    let p = policy("org-a", "gpt-4o", &[("backend-1", 1), ("backend-2", 0)], 5);
    assert_eq!(router.admin_post("/v1/admin/routing/policies", p).await.status, 200);
    let (status, _, frames) = stream_frames(&router, "stream-cut-1").await;
    assert_eq!(status, 200);
    let all: String = frames.iter().map(|(_, f)| f.as_str()).collect();
    assert_eq!(all.matches(r#""content":"tok"#).count(), 3, "{all}");
    assert!(all.contains("event: error"), "{all}");
    assert!(all.contains("stream_interrupted"));
    assert!(!all.contains("[DONE]"));
    assert_eq!(m2.requests().await, 0, "no retry after the first byte");
    let record = wait_audit(&router, "stream-cut-1", &[("x-api-key", KEY_A)]).await;
    assert_eq!(record["status"], 502);
    assert!(record["error"].as_str().unwrap().contains("stream broken midway"));
    assert_eq!(record["usage"]["completion_tokens"], 3, "the partial response is recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_the_upstream_and_is_audited() {
    let m1 = Mock::start("backend-1", &[]);
    m1.faults(json!({"stream_chunks": 10, "stream_delay_ms": 200})).await;
    let router = openai_router(&[&m1]);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let body = json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let req = hyper::Request::post(router.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY_A}"))
        .header("x-request-id", "stream-leave-1")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let mut body = client.request(req).await.unwrap().into_body();
    for _ in 0..2 {
        body.frame().await.unwrap().unwrap();
    }
    drop(body);
    drop(client);
    // The mock would stream for seconds more: closed well before that.
    assert!(
        eventually(Duration::from_secs(3), || async { m1.stats().await["disconnects"] == 1 }).await,
        "upstream not closed within 3 s"
    );
    let record = wait_audit(&router, "stream-leave-1", &[("x-api-key", KEY_A)]).await;
    assert_eq!(record["status"], 499);
    assert!(record["error"].as_str().unwrap().contains("client disconnected"));
}

async fn post_openai(router: &Router, path: &str, body: impl Into<bytes::Bytes>) -> Resp {
    send(Method::POST, &router.url(path), &[("authorization", &format!("Bearer {KEY_A}"))], body).await
}

fn assert_openai_error(r: &Resp, status: u16, code: &str, kind: &str) {
    assert_eq!(r.status.as_u16(), status, "{}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["code"], code, "{e}");
    assert_eq!(e["type"], kind, "{e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(e.get("param").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_messages_is_400() {
    let m1 = Mock::start("backend-1", &[]);
    let router = openai_router(&[&m1]);
    let r = post_openai(&router, "/v1/chat/completions", json!({"model": "gpt-4o"}).to_string()).await;
    assert_openai_error(&r, 400, "invalid_request", "invalid_request_error");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("messages"));
    assert_eq!(m1.requests().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_that_is_not_a_boolean_is_400() {
    let m1 = Mock::start("backend-1", &[]);
    let router = openai_router(&[&m1]);
    let body = json!({"model": "gpt-4o", "stream": "yes", "messages": []}).to_string();
    let r = post_openai(&router, "/v1/chat/completions", body).await;
    assert_openai_error(&r, 400, "invalid_request", "invalid_request_error");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("stream"));
    assert_eq!(m1.requests().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_options_that_are_not_an_object_are_400() {
    let m1 = Mock::start("backend-1", &[]);
    let router = openai_router(&[&m1]);
    let body = json!({"model": "gpt-4o", "stream": true, "stream_options": "usage", "messages": []}).to_string();
    let r = post_openai(&router, "/v1/chat/completions", body).await;
    assert_openai_error(&r, 400, "invalid_request", "invalid_request_error");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("stream_options"));
    assert_eq!(m1.requests().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_model_is_404() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[]).openai(&[&m1]).env("DEFAULT_ROUTE", "false").start();
    let body = json!({"model": "no-such-model", "messages": []}).to_string();
    let r = post_openai(&router, "/v1/chat/completions", body).await;
    assert_openai_error(&r, 404, "model_not_found", "invalid_request_error");
    assert_eq!(m1.requests().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_413() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[]).openai(&[&m1]).env("MAX_BODY_BYTES", "1024").start();
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(4000)}]}).to_string();
    let r = post_openai(&router, "/v1/chat/completions", body).await;
    assert_openai_error(&r, 413, "payload_too_large", "invalid_request_error");
    assert_eq!(m1.requests().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_error_is_passed_through_in_openai_shape() {
    let m1 = Mock::start("backend-1", &["--error-rate", "1", "--error-status", "400"]);
    let router = openai_router(&[&m1]);
    let body = json!({"model": "gpt-4o", "messages": []}).to_string();
    let r = post_openai(&router, "/v1/chat/completions", body).await;
    assert_openai_error(&r, 400, "injected_fault", "invalid_request_error");
    assert_eq!(r.header("x-backend-id").as_deref(), Some("backend-1"));
    assert_eq!(m1.requests().await, 1, "not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_and_openai_doors_each_use_their_own_backend_kind() {
    let native = Mock::start("native-1", &[]);
    let oa = Mock::start("openai-1", &[]);
    let router = RouterBuilder::new(&[])
        .env("BACKEND_ENDPOINTS", &format!("{},{}", native.endpoint(), oa.openai_endpoint()))
        .start();
    for _ in 0..10 {
        let r = router.infer(KEY_A, json!({"model": "gpt-4o"})).await;
        assert_eq!(r.header("x-backend-id").as_deref(), Some("native-1"));
        let r =
            post_openai(&router, "/v1/chat/completions", json!({"model": "gpt-4o", "messages": []}).to_string()).await;
        assert_eq!(r.header("x-backend-id").as_deref(), Some("openai-1"));
    }
    // The admin API never shows credentials; it does show the kind.
    let listed = router.admin_get("/v1/admin/routing/backends").await.text();
    assert!(!listed.to_lowercase().contains("bearer"));
}
