//! `docs/openapi.yaml` matches the service: every path and method exists, is
//! requested here, and answers with the status expected of that request (one
//! the spec lists) and a body that validates against the spec's schema for it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::collections::BTreeSet;

use hyper::Method;
use serde_json::{Value, json};
use test_support::*;

fn spec() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(|r| r.as_str()) {
        Some(r) => {
            let path = r.trim_start_matches("#/");
            path.split('/').fold(root, |v, k| &v[k])
        }
        None => schema,
    }
}

/// A small JSON Schema check: $ref, type (one or a list), enum, required,
/// properties, items.
fn validate(root: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(root, schema);
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        });
        if !ok {
            return Err(format!("{at}: expected {types:?}, got {v}"));
        }
    }
    if let Some(e) = schema.get("enum").and_then(|e| e.as_array()).filter(|e| !e.contains(v)) {
        return Err(format!("{at}: {v} not in {e:?}"));
    }
    if let Some(obj) = v.as_object() {
        for r in schema.get("required").and_then(|r| r.as_array()).into_iter().flatten() {
            let k = r.as_str().unwrap();
            if !obj.contains_key(k) {
                return Err(format!("{at}: missing required `{k}`"));
            }
        }
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (k, s) in props {
                if let Some(x) = obj.get(k) {
                    validate(root, s, x, &format!("{at}.{k}"))?;
                }
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            validate(root, items, x, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_paths_exist_and_answers_match_the_schemas() {
    let spec = spec();
    let native = Mock::start("backend-1", &[]);
    let oa = Mock::start("openai-1", &[]);
    let claude = Mock::start("anthropic-1", &[]);
    let router = RouterBuilder::new(&[])
        .env("BACKEND_ENDPOINTS", &endpoints_of_every_kind(&native, &oa, &claude))
        .env("KAFKA_BROKERS", &format!("127.0.0.1:{}", free_port()))
        .start();
    let admin = format!("Bearer {ADMIN_TOKEN}");
    let bearer = format!("Bearer {KEY_A}");
    let r = router.infer(KEY_A, json!({"request_id": "openapi-1", "model": "gpt-4o", "payload": "x"})).await;
    assert_eq!(r.status, 200);
    wait_audit(&router, "openapi-1", &[("x-api-key", KEY_A)]).await;
    let policy = policy("org-a", "gpt-4o", &[("backend-1", 1)], 3).to_string();
    let made = router.admin_post("/v1/admin/keys", json!({"organization_id": "org-a"})).await;
    assert_eq!(made.status, 201, "{}", made.text());
    let key_id = made.json()["key_id"].as_str().unwrap().to_string();
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).to_string();

    // (method, path template, concrete path, headers, body)
    type Call<'a> = (&'a str, &'a str, String, Vec<(&'a str, &'a str)>, String);
    let calls: Vec<Call> = vec![
        ("post", "/v1/inference", "/v1/inference".into(), vec![("x-api-key", KEY_A)], r#"{"model":"gpt-4o"}"#.into()),
        ("post", "/v1/chat/completions", "/v1/chat/completions".into(), vec![("authorization", &bearer)], chat.clone()),
        (
            "post",
            "/v1/completions",
            "/v1/completions".into(),
            vec![("authorization", &bearer)],
            r#"{"model":"gpt-4o","prompt":"hi"}"#.into(),
        ),
        (
            "post",
            "/v1/embeddings",
            "/v1/embeddings".into(),
            vec![("authorization", &bearer)],
            r#"{"model":"gpt-4o","input":"hi"}"#.into(),
        ),
        (
            "post",
            "/v1/responses",
            "/v1/responses".into(),
            vec![("authorization", &bearer)],
            r#"{"model":"gpt-4o","input":"hi"}"#.into(),
        ),
        (
            "post",
            "/v1/messages",
            "/v1/messages".into(),
            vec![("x-api-key", KEY_A)],
            r#"{"model":"claude-x","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#.into(),
        ),
        (
            "post",
            "/v1/messages/count_tokens",
            "/v1/messages/count_tokens".into(),
            vec![("x-api-key", KEY_A)],
            r#"{"model":"claude-x","messages":[{"role":"user","content":"hi"}]}"#.into(),
        ),
        ("get", "/v1/models", "/v1/models".into(), vec![("authorization", &bearer)], String::new()),
        ("get", "/v1/status/healthz", "/v1/status/healthz".into(), vec![], String::new()),
        ("get", "/v1/status/readyz", "/v1/status/readyz".into(), vec![], String::new()),
        ("get", "/metrics", "/metrics".into(), vec![], String::new()),
        ("get", "/openapi.json", "/openapi.json".into(), vec![], String::new()),
        (
            "get",
            "/v1/audit/requests/{requestId}",
            "/v1/audit/requests/openapi-1".into(),
            vec![("x-api-key", KEY_A)],
            String::new(),
        ),
        (
            "get",
            "/v1/admin/routing/backends",
            "/v1/admin/routing/backends".into(),
            vec![("authorization", &admin)],
            String::new(),
        ),
        (
            "get",
            "/v1/admin/routing/backends/{backendID}/health",
            "/v1/admin/routing/backends/backend-1/health".into(),
            vec![("authorization", &admin)],
            String::new(),
        ),
        (
            "post",
            "/v1/admin/routing/backends/{backendID}/degrade",
            "/v1/admin/routing/backends/backend-1/degrade".into(),
            vec![("authorization", &admin)],
            r#"{"reason":"test"}"#.into(),
        ),
        (
            "post",
            "/v1/admin/routing/backends/{backendID}/healthy",
            "/v1/admin/routing/backends/backend-1/healthy".into(),
            vec![("authorization", &admin)],
            String::new(),
        ),
        (
            "post",
            "/v1/admin/routing/policies",
            "/v1/admin/routing/policies".into(),
            vec![("authorization", &admin)],
            policy,
        ),
        (
            "get",
            "/v1/admin/routing/policies/{orgID}/{model}",
            "/v1/admin/routing/policies/org-a/gpt-4o".into(),
            vec![("authorization", &admin)],
            String::new(),
        ),
        (
            "get",
            "/v1/admin/routing/decisions",
            "/v1/admin/routing/decisions?limit=5".into(),
            vec![("authorization", &admin)],
            String::new(),
        ),
        (
            "put",
            "/v1/admin/organizations/{orgID}/limits",
            "/v1/admin/organizations/org-a/limits".into(),
            vec![("authorization", &admin)],
            r#"{"budget":{"amount":100,"period":"monthly"}}"#.into(),
        ),
        (
            "get",
            "/v1/admin/organizations/{orgID}/limits",
            "/v1/admin/organizations/org-a/limits".into(),
            vec![("authorization", &admin)],
            String::new(),
        ),
        (
            "get",
            "/v1/admin/organizations/{orgID}/usage",
            "/v1/admin/organizations/org-a/usage".into(),
            vec![("authorization", &admin)],
            String::new(),
        ),
        (
            "get",
            "/v1/admin/usage/buffer",
            "/v1/admin/usage/buffer".into(),
            vec![("authorization", &admin)],
            String::new(),
        ),
        (
            "post",
            "/v1/admin/usage/buffer/retry",
            "/v1/admin/usage/buffer/retry".into(),
            vec![("authorization", &admin)],
            String::new(),
        ),
        (
            "post",
            "/v1/admin/keys",
            "/v1/admin/keys".into(),
            vec![("authorization", &admin)],
            r#"{"organization_id":"org-a","name":"openapi","models":["gpt-4o"],"budget":{"amount":5,"period":"daily"}}"#
                .into(),
        ),
        ("get", "/v1/admin/keys", "/v1/admin/keys?organization_id=org-a".into(), vec![("authorization", &admin)], String::new()),
        ("get", "/v1/admin/keys/{keyID}", format!("/v1/admin/keys/{key_id}"), vec![("authorization", &admin)], String::new()),
        (
            "post",
            "/v1/admin/keys/{keyID}/rotate",
            format!("/v1/admin/keys/{key_id}/rotate"),
            vec![("authorization", &admin)],
            r#"{"grace_period_secs":60}"#.into(),
        ),
        (
            "get",
            "/v1/admin/keys/{keyID}/usage",
            format!("/v1/admin/keys/{key_id}/usage"),
            vec![("authorization", &admin)],
            String::new(),
        ),
        ("delete", "/v1/admin/keys/{keyID}", format!("/v1/admin/keys/{key_id}"), vec![("authorization", &admin)], String::new()),
    ];

    let documented: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, ops)| ops.as_object().unwrap().keys().map(move |m| (m.clone(), p.clone())))
        .collect();
    let called: BTreeSet<(String, String)> = calls.iter().map(|(m, p, ..)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented, called, "every documented operation is exercised, and nothing undocumented");

    // Each call's own status (200 unless listed): a documented error status
    // must not pass for a success.
    let expected = |method: &str, template: &str| match (method, template) {
        ("post", "/v1/admin/keys") => 201,
        // KAFKA_BROKERS names a port nobody listens on: kafka is unhealthy.
        ("get", "/v1/status/readyz") => 503,
        _ => 200,
    };
    for (method, template, path, headers, body) in &calls {
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let resp = send(m, &router.url(path), headers, body.clone()).await;
        assert_eq!(resp.status.as_u16(), expected(method, template), "{method} {path}: {}", resp.text());
        let status = resp.status.as_u16().to_string();
        let op = &spec["paths"][*template][*method];
        let documented = &op["responses"][&status];
        assert!(documented.is_object(), "{method} {path}: status {status} is not documented ({})", resp.text());
        let content = documented["content"].as_object().unwrap();
        if let Some(media) = content.get("application/json") {
            let v = resp.json();
            validate(&spec, &media["schema"], &v, &format!("{method} {path}")).unwrap_or_else(|e| panic!("{e}\n{v}"));
        } else {
            assert!(!resp.body.is_empty());
        }
    }
    // The served document is the same spec.
    let served = get_json(&router.url("/openapi.json"), &[]).await.1;
    assert_eq!(served, spec);
}
