//! Real providers' shapes end to end: the Anthropic door and backends, the
//! Responses API, Azure OpenAI, translation both ways (the official SDKs on
//! the client side), fallback across models, upstream Retry-After, and bad
//! input on the new doors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};
use test_support::python::sdk;
use test_support::*;

/// The upstream keys the router holds for its backends (never the clients').
const ANTHROPIC_SECRET: &str = "sk-ant-upstream-secret";
const OPENAI_SECRET: &str = "sk-openai-upstream-secret";
const AZURE_SECRET: &str = "azure-upstream-secret";

/// A router over `backends` (YAML entries) with one policy per
/// (model, backend ids, fallback models).
fn router(backends: &str, policies: &[(&str, &[&str], &[&str])], extra: &[(&str, &str)]) -> Router {
    router_with(backends, policies, extra, "")
}

/// [`router`] with more of the YAML file (`prices:`, ...).
fn router_with(
    backends: &str,
    policies: &[(&str, &[&str], &[&str])],
    extra: &[(&str, &str)],
    yaml_extra: &str,
) -> Router {
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = format!("{yaml_extra}backends:\n{backends}\npolicies:\n");
    for (model, ids, fallbacks) in policies {
        let members: Vec<String> = ids.iter().map(|id| format!("{{backend_id: {id}, weight: 1}}")).collect();
        yaml += &format!(
            "  - {{policy_id: p-{model}, organization_id: org-a, model: {model}, backends: [{}], failover_threshold: 5, fallback_models: [{}]}}\n",
            members.join(", "),
            fallbacks.join(", ")
        );
        yaml += &format!(
            "  - {{policy_id: pb-{model}, organization_id: org-b, model: {model}, backends: [{}], failover_threshold: 5}}\n",
            members.join(", ")
        );
    }
    let path = dir.path().join("router.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut b = RouterBuilder::new(&[])
        .env("ROUTER_CONFIG", path.to_str().unwrap())
        .env("DEFAULT_ROUTE", "false")
        .env("HEALTH_CHECK_INTERVAL_MS", "60000")
        .env("ANTHROPIC_KEY", ANTHROPIC_SECRET)
        .env("OPENAI_KEY", OPENAI_SECRET)
        .env("AZURE_KEY", AZURE_SECRET);
    for (k, v) in extra {
        b = b.env(k, v);
    }
    let r = b.start();
    // The temp dir holding the YAML file may go: the file was read at start.
    drop(dir);
    r
}

fn anthropic_backend(id: &str, m: &Mock) -> String {
    format!("  - {{backend_id: {id}, endpoint: {}, kind: anthropic, api_key_env: ANTHROPIC_KEY}}\n", m.url())
}

fn openai_backend(id: &str, m: &Mock) -> String {
    format!("  - {{backend_id: {id}, endpoint: {}, kind: openai, api_key_env: OPENAI_KEY}}\n", m.url())
}

async fn post(router: &Router, path: &str, headers: &[(&str, &str)], body: Value) -> Resp {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    send(Method::POST, &router.url(path), &h, body.to_string()).await
}

fn messages_body(model: &str) -> Value {
    json!({"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]})
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

async fn last_request(m: &Mock) -> Value {
    m.stats().await["last_request"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_sdk_on_an_anthropic_backend_and_through_translation() {
    let claude = Mock::start("claude-1", &[]);
    let gpt = Mock::start("gpt-1", &[]);
    let backends = anthropic_backend("claude-1", &claude) + &openai_backend("gpt-1", &gpt);
    let router = router(&backends, &[("claude-x", &["claude-1"], &[]), ("gpt-x", &["gpt-1"], &[])], &[]);
    router
        .admin_put(
            "/v1/admin/organizations/org-b/limits",
            json!({"rate_limit": {"requests_per_second": 0.001, "burst": 1}}),
        )
        .await;
    for (model, backend, shape) in [("claude-x", "claude-1", "anthropic"), ("gpt-x", "gpt-1", "openai")] {
        let env = [("MODEL", model), ("BACKEND", backend), ("SHAPE", shape), ("RATE_LIMITED_KEY", KEY_B)];
        for scenario in ["message", "stream", "tools"] {
            sdk("anthropic_sdk_check.py", &router, KEY_A, scenario, &env);
        }
    }
    let env = [("MODEL", "claude-x"), ("BACKEND", "claude-1"), ("SHAPE", "anthropic"), ("RATE_LIMITED_KEY", KEY_B)];
    sdk("anthropic_sdk_check.py", &router, KEY_A, "count_tokens", &env);
    sdk("anthropic_sdk_check.py", &router, KEY_A, "errors", &env);
    // The backends were called with the router's own credentials.
    let seen = last_request(&claude).await;
    assert_eq!(seen["headers"]["x-api-key"], ANTHROPIC_SECRET, "{seen}");
    assert_eq!(seen["headers"]["anthropic-version"], "2023-06-01");
    assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    let seen = last_request(&gpt).await;
    assert_eq!(
        (seen["path"].as_str(), seen["headers"]["authorization"].as_str()),
        (Some("/v1/chat/completions"), Some(&*format!("Bearer {OPENAI_SECRET}")))
    );
    // No client key reached a backend, and no upstream secret reached the log.
    let log = router.proc.lines().join("\n");
    for secret in [ANTHROPIC_SECRET, OPENAI_SECRET, KEY_A] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_on_the_responses_api_and_chat_to_an_anthropic_backend() {
    let claude = Mock::start("claude-1", &[]);
    let gpt = Mock::start("gpt-1", &[]);
    let backends = anthropic_backend("claude-1", &claude) + &openai_backend("gpt-1", &gpt);
    let router = router(&backends, &[("claude-x", &["claude-1"], &[]), ("gpt-x", &["gpt-1"], &[])], &[]);
    sdk("openai_sdk_check.py", &router, KEY_A, "responses", &[("MODEL", "gpt-x"), ("BACKEND", "gpt-1")]);
    assert_eq!(last_request(&gpt).await["path"], "/v1/responses");
    sdk("openai_sdk_check.py", &router, KEY_A, "chat_tools", &[("MODEL", "claude-x"), ("BACKEND", "claude-1")]);
    assert_eq!(last_request(&claude).await["path"], "/v1/messages");
    // The Responses API reached no Anthropic backend: none can take it.
    let r = post(
        &router,
        "/v1/responses",
        &[("authorization", &format!("Bearer {KEY_A}"))],
        json!({"model": "claude-x", "input": "hi"}),
    )
    .await;
    r.assert_error(503, "no_healthy_backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_headers_are_forwarded_and_the_beta_is_untouched() {
    let claude = Mock::start("claude-1", &[]);
    let router = router(&anthropic_backend("claude-1", &claude), &[("claude-x", &["claude-1"], &[])], &[]);
    let beta = "prompt-caching-2024-07-31,token-efficient-tools-2025-02-19";
    let r = post(
        &router,
        "/v1/messages",
        &[
            ("x-api-key", KEY_A),
            ("anthropic-version", "2023-01-01"),
            ("anthropic-beta", beta),
            ("x-request-id", "anth-1"),
        ],
        messages_body("claude-x"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-request-id").as_deref(), Some("anth-1"));
    let seen = last_request(&claude).await;
    assert_eq!(
        (seen["headers"]["anthropic-version"].as_str(), seen["headers"]["anthropic-beta"].as_str()),
        (Some("2023-01-01"), Some(beta))
    );
    let audit = wait_audit(&router, "anth-1", &[("x-api-key", KEY_A)]).await;
    assert_eq!(
        audit["usage"],
        json!({"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21, "cache_read_tokens": 4, "cache_write_tokens": 3})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_deployments_get_their_path_api_version_and_key() {
    let az = Mock::start("az-1", &[]);
    let backends = format!(
        "  - {{backend_id: az-1, endpoint: {}, kind: azure, api_key_env: AZURE_KEY, api_version: 2025-04-01-preview, models: {{gpt-4o: prod-4o}}}}\n",
        az.url()
    );
    let router = router(&backends, &[("gpt-4o", &["az-1"], &[]), ("o-mini", &["az-1"], &[])], &[]);
    let bearer = format!("Bearer {KEY_A}");
    let auth = [("authorization", bearer.as_str())];
    let r = post(&router, "/v1/chat/completions", &auth, chat_body("gpt-4o")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = last_request(&az).await;
    assert_eq!(seen["path"], "/openai/deployments/prod-4o/chat/completions");
    assert_eq!(seen["query"], "api-version=2025-04-01-preview");
    assert_eq!(seen["headers"]["api-key"], AZURE_SECRET);
    assert!(seen["headers"].get("authorization").is_none(), "the key goes as api-key only: {seen}");
    assert_eq!(az.stats().await["last_deployment"], "prod-4o");
    // A model without a deployment, and the Responses API: the v1 form.
    let r = post(&router, "/v1/chat/completions", &auth, chat_body("o-mini")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(last_request(&az).await["path"], "/openai/v1/chat/completions");
    let r = post(&router, "/v1/responses", &auth, json!({"model": "gpt-4o", "input": "hi"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = last_request(&az).await;
    assert_eq!((seen["path"].as_str(), seen["query"].as_str()), (Some("/openai/v1/responses"), None));
    assert_eq!(az.stats().await["last_model"], "prod-4o", "the deployment is named in the body");
    // The Azure health path answers with the key.
    router.wait_health_round().await;
    assert_eq!(router.backend_status("az-1").await, "healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_chain_crosses_models_and_kinds_and_is_audited() {
    let gpt = Mock::start("gpt-1", &[]);
    let claude = Mock::start("claude-1", &[]);
    gpt.faults(json!({"error_rate": 1.0, "error_status": 500})).await;
    let backends = openai_backend("gpt-1", &gpt) + &anthropic_backend("claude-1", &claude);
    let router = router(&backends, &[("big", &["gpt-1"], &["missing", "small"]), ("small", &["claude-1"], &[])], &[]);
    let bearer = format!("Bearer {KEY_A}");
    let r = post(
        &router,
        "/v1/chat/completions",
        &[("authorization", &bearer), ("x-request-id", "fb-1")],
        chat_body("big"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-backend-id").as_deref(), Some("claude-1"));
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "Hello from claude-1.",
        "translated from Anthropic's shape"
    );
    assert_eq!(claude.stats().await["last_model"], "small", "the model was rewritten for the hop");
    // A decision per hop (no backend), and the first attempt of the hop.
    let decisions: Vec<Value> = router.decisions("decision_type=FALLBACK_MODEL").await;
    let mine: Vec<&Value> = decisions.iter().filter(|d| d["request_id"] == "fb-1").collect();
    let hops: Vec<&str> =
        mine.iter().filter(|d| d["backend_id"].is_null()).map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(hops.len(), 2, "{mine:#?}");
    assert!(hops[1].contains("trying model missing") && hops[0].contains("trying model small"), "{hops:?}");
    assert!(mine.iter().any(|d| d["backend_id"] == "claude-1"), "{mine:?}");
    let audit = wait_audit(&router, "fb-1", &[("x-api-key", KEY_A)]).await;
    let attempts = audit["attempts"].as_array().unwrap();
    assert_eq!((attempts[0]["model"].as_str(), attempts[0]["status"].as_u64()), (Some("big"), Some(500)));
    assert_eq!(
        (attempts[1]["model"].as_str(), attempts[1]["decision_type"].as_str()),
        (Some("small"), Some("FALLBACK_MODEL"))
    );
    assert_eq!(audit["status"], 200);
    // A stream falls back before its first byte.
    let mut stream = chat_body("big");
    stream["stream"] = json!(true);
    let r = post(&router, "/v1/chat/completions", &[("authorization", &bearer)], stream).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("tok0") && r.text().trim_end().ends_with("[DONE]"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_cools_a_backend_down_without_marking_it_unhealthy() {
    let slow = Mock::start("limited", &[]);
    let ok = Mock::start("spare", &[]);
    slow.faults(json!({"error_rate": 1.0, "error_status": 429, "retry_after_secs": 4})).await;
    let backends = openai_backend("limited", &slow) + &openai_backend("spare", &ok);
    let router = router(&backends, &[("m", &["limited", "spare"], &[]), ("solo", &["limited"], &[])], &[]);
    let bearer = format!("Bearer {KEY_A}");
    let auth = [("authorization", bearer.as_str())];
    // Until `limited` is tried (the weighted pick may start with either).
    let tried = eventually(Duration::from_secs(10), || async {
        let r = post(&router, "/v1/chat/completions", &auth, chat_body("m")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        slow.requests().await > 0
    })
    .await;
    assert!(tried);
    let list = router.admin_get("/v1/admin/routing/backends").await.json();
    let limited = list["backends"].as_array().unwrap().iter().find(|b| b["backend_id"] == "limited").unwrap().clone();
    let cooldown = limited["cooldown_seconds"].as_f64().unwrap();
    assert!(cooldown > 0.0 && cooldown <= 4.0, "{limited}");
    assert_eq!((limited["status"].as_str(), limited["consecutive_failures"].as_u64()), (Some("healthy"), Some(0)));
    let text = router.metrics().await;
    assert_eq!(metric(&text, "api_router_backend_cooldowns_total", &[("backend_id", "limited")]), 1.0);
    assert!(metric(&text, "api_router_backend_cooldown_seconds", &[("backend_id", "limited")]) > 0.0);
    // Skipped while it cools down.
    let before = slow.requests().await;
    for _ in 0..5 {
        assert_eq!(post(&router, "/v1/chat/completions", &auth, chat_body("m")).await.status, 200);
    }
    assert_eq!(slow.requests().await, before, "a cooling backend is not tried");
    // With every backend cooling down: 429 and the shortest Retry-After.
    let r = post(&router, "/v1/chat/completions", &auth, chat_body("solo")).await;
    r.assert_error(429, "upstream_rate_limited");
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=4).contains(&wait), "retry-after {wait}");
    assert_eq!(slow.requests().await, before, "nothing was sent");
    // It ends by itself, and the backend is tried again.
    slow.faults(json!({"error_rate": 0.0})).await;
    let back = || async { post(&router, "/v1/chat/completions", &auth, chat_body("solo")).await.status == 200 };
    assert!(eventually(Duration::from_secs(10), back).await);
    assert!(slow.requests().await > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_tokens_count_the_same_through_every_door_and_kind() {
    let claude = Mock::start("claude-1", &[]);
    let gpt = Mock::start("gpt-1", &[]);
    let backends = anthropic_backend("claude-1", &claude) + &openai_backend("gpt-1", &gpt);
    // Per 1,000 tokens: uncached input 1, cache reads 0.1, cache writes 1.25, output 5.
    let price = "{input_per_1k: 1, output_per_1k: 5, cache_read_per_1k: 0.1, cache_write_per_1k: 1.25}";
    let prices = format!("prices:\n  claude-x: {price}\n  gpt-x: {price}\n");
    let policies: &[(&str, &[&str], &[&str])] = &[("claude-x", &["claude-1"], &[]), ("gpt-x", &["gpt-1"], &[])];
    let router = router_with(&backends, policies, &[], &prices);
    let budget = json!({"budget": {"amount": 1000, "period": "monthly"}});
    assert_eq!(router.admin_put("/v1/admin/organizations/org-a/limits", budget).await.status, 200);
    let spent = || async {
        router.admin_get("/v1/admin/organizations/org-a/usage").await.json()["budget"]["spent"].as_f64().unwrap()
    };
    let tokens = |text: &str| {
        ["prompt", "completion", "cache_read", "cache_write"]
            .map(|t| metric_or_zero(text, "api_router_tokens_total", &[("type", t)]))
    };
    let bearer = format!("Bearer {KEY_A}");
    // (uncached 5, reads 4, writes 3, output 9) and (uncached 8, reads 4, output 9).
    let claude_cost = (5.0 * 1.0 + 4.0 * 0.1 + 3.0 * 1.25 + 9.0 * 5.0) / 1000.0;
    let gpt_cost = (8.0 * 1.0 + 4.0 * 0.1 + 9.0 * 5.0) / 1000.0;
    for (model, want, cost) in
        [("claude-x", [12.0, 9.0, 4.0, 3.0], claude_cost), ("gpt-x", [12.0, 9.0, 4.0, 0.0], gpt_cost)]
    {
        for (path, body) in [("/v1/messages", messages_body(model)), ("/v1/chat/completions", chat_body(model))] {
            let (before, spent_before) = (tokens(&router.metrics().await), spent().await);
            let r = post(&router, path, &[("authorization", &bearer)], body).await;
            assert_eq!(r.status, 200, "{path} {model}: {}", r.text());
            let after = tokens(&router.metrics().await);
            let counted: Vec<f64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
            assert_eq!(counted, want, "{path} {model}");
            let settled =
                eventually(Duration::from_secs(5), || async { (spent().await - spent_before - cost).abs() < 1e-9 })
                    .await;
            assert!(settled, "{path} {model}: budget charged {} instead of {cost}", spent().await - spent_before);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_inside_a_stream_ends_in_the_doors_own_error_event() {
    let claude = Mock::start("claude-1", &[]);
    claude.faults(json!({"stream_error_after": 3})).await;
    let router = router(&anthropic_backend("claude-1", &claude), &[("claude-x", &["claude-1"], &[])], &[]);
    let bearer = format!("Bearer {KEY_A}");
    let mut body = chat_body("claude-x");
    body["stream"] = json!(true);
    let r = post(&router, "/v1/chat/completions", &[("authorization", &bearer), ("x-request-id", "err-1")], body).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    let last = text.trim_end().rsplit("data: ").next().unwrap();
    let error: Value = serde_json::from_str(last).unwrap();
    assert_eq!(error["error"]["message"], "Overloaded", "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    let audit = wait_audit(&router, "err-1", &[("x-api-key", KEY_A)]).await;
    assert_eq!(audit["status"], 502);
    assert!(audit["error"].as_str().unwrap().contains("reported an error"), "{audit}");
    // Passthrough: the Anthropic door forwards the event as it came.
    let mut body = messages_body("claude-x");
    body["stream"] = json!(true);
    let r = post(&router, "/v1/messages", &[("x-api-key", KEY_A)], body).await;
    let text = r.text();
    let (event, data) = text.trim_end().rsplit_once("\n").unwrap();
    assert!(event.ends_with("event: error"), "{text}");
    let error: Value = serde_json::from_str(data.trim_start_matches("data: ")).unwrap();
    assert_eq!(error, json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_the_backend_cannot_express_is_a_400_that_names_it() {
    let gpt = Mock::start("gpt-1", &[]);
    let router = router(&openai_backend("gpt-1", &gpt), &[("gpt-x", &["gpt-1"], &[])], &[]);
    let mut body = messages_body("gpt-x");
    body["top_k"] = json!(5);
    let r = post(&router, "/v1/messages", &[("x-api-key", KEY_A)], body).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let e = r.json();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(e["error"]["message"].as_str().unwrap().contains("`top_k`"), "{e}");
    assert_eq!(gpt.requests().await, 0);
}

/// Bad input on the new doors: the door's shape, the right 4xx, nothing sent
/// and nothing recorded.
async fn assert_refused(router: &Router, gpt: &Mock, path: &str, body: &str, status: u16, anthropic: bool, id: &str) {
    let h = [("x-api-key", KEY_A), ("content-type", "application/json"), ("x-request-id", id)];
    let r = send(Method::POST, &router.url(path), &h, body.to_string()).await;
    assert_eq!(r.status.as_u16(), status, "{path} {body:.60}: {}", r.text());
    let e = r.json();
    if anthropic {
        assert_eq!(e["type"], "error", "{e}");
        let kind = if status == 413 { "request_too_large" } else { "invalid_request_error" };
        assert_eq!(e["error"]["type"], kind, "{e}");
    } else {
        assert!(e["error"]["message"].is_string() && e["error"]["type"].is_string(), "{e}");
    }
    assert_eq!(gpt.requests().await, 0, "nothing reached a backend");
    let (lookup, _) = get_json(&router.url(&format!("/v1/audit/requests/{id}")), &[("x-api-key", KEY_A)]).await;
    assert_eq!(lookup, 404, "nothing was recorded for {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_anthropic_door() {
    let gpt = Mock::start("gpt-1", &[]);
    let router = router(&openai_backend("gpt-1", &gpt), &[("gpt-x", &["gpt-1"], &[])], &[("MAX_BODY_BYTES", "2048")]);
    let cases = [
        ("{\"model\": ", 400, "m-malformed"),
        (r#"{"model": "gpt-x", "max_tokens": 5, "messages": "hi"}"#, 400, "m-wrong-type"),
        (r#"{"model": "gpt-x", "messages": []}"#, 400, "m-no-max-tokens"),
        (r#"{"model": 7, "max_tokens": 5, "messages": []}"#, 400, "m-model-type"),
        (r#"{"model": "gpt-x", "max_tokens": 5, "messages": [], "stream": "yes"}"#, 400, "m-stream-type"),
    ];
    for (body, status, id) in cases {
        assert_refused(&router, &gpt, "/v1/messages", body, status, true, id).await;
    }
    let big = json!({"model": "gpt-x", "max_tokens": 5, "messages": [{"role": "user", "content": "x".repeat(4096)}]});
    assert_refused(&router, &gpt, "/v1/messages", &big.to_string(), 413, true, "m-oversize").await;
    assert_refused(&router, &gpt, "/v1/messages/count_tokens", "[1]", 400, true, "ct-not-object").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_responses_door() {
    let gpt = Mock::start("gpt-1", &[]);
    let router = router(&openai_backend("gpt-1", &gpt), &[("gpt-x", &["gpt-1"], &[])], &[("MAX_BODY_BYTES", "2048")]);
    for (body, status, id) in [
        ("{not json", 400, "r-malformed"),
        (r#"{"input": "hi"}"#, 400, "r-no-model"),
        (r#"{"model": ["gpt-x"], "input": "hi"}"#, 400, "r-model-type"),
        (r#"{"model": "gpt-x", "input": "hi", "stream": 1}"#, 400, "r-stream-type"),
    ] {
        assert_refused(&router, &gpt, "/v1/responses", body, status, false, id).await;
    }
    let big = json!({"model": "gpt-x", "input": "x".repeat(4096)});
    assert_refused(&router, &gpt, "/v1/responses", &big.to_string(), 413, false, "r-oversize").await;
}
