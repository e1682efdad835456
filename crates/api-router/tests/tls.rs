//! TLS to backends, end to end: the real router and TLS mocks with
//! certificates made at test time. Both doors over a private CA (streaming
//! included), HTTP/2 when offered, untrusted certificates failing over with
//! their reason, mTLS with and without the client certificate, and bad TLS
//! files at start-up.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};
use test_support::tls::Pki;
use test_support::*;

fn tls_mock(id: &str, cert: &std::path::Path, key: &std::path::Path, extra: &[&str]) -> Mock {
    let mut args = vec!["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    args.extend_from_slice(extra);
    Mock::start(id, &args)
}

async fn chat(router: &Router, stream: bool) -> Resp {
    let body = json!({"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
    send(
        Method::POST,
        &router.url("/v1/chat/completions"),
        &[("authorization", &format!("Bearer {KEY_A}")), ("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_doors_over_tls_with_a_private_ca_and_http2_when_offered() {
    let pki = Pki::new();
    let native = tls_mock("native-1", &pki.server_cert, &pki.server_key, &[]);
    let openai = tls_mock("openai-1", &pki.server_cert, &pki.server_key, &["--no-h2"]);
    let endpoints = format!("{},{}=openai+{}", native.endpoint(), openai.id, openai.url());
    assert!(endpoints.contains("https://"), "{endpoints}");
    let router = RouterBuilder::new(&[])
        .env("BACKEND_ENDPOINTS", &endpoints)
        .env("BACKEND_CA_FILE", pki.ca.to_str().unwrap())
        .start();

    let r = router.infer(KEY_A, json!({"model": "m", "request_id": "tls-native-1"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-backend-id").as_deref(), Some("native-1"));
    assert_eq!(r.json()["request_id"], "tls-native-1");
    assert_eq!(native.stats().await["last_version"], "HTTP/2.0", "h2 was offered by ALPN and used");

    let r = chat(&router, false).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-backend-id").as_deref(), Some("openai-1"));
    assert_eq!(openai.stats().await["last_version"], "HTTP/1.1", "no h2 offered: HTTP/1.1");

    let r = chat(&router, true).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    assert_eq!(text.matches("data: {").count(), 6, "5 chunks and the usage chunk: {text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric_or_zero(&router.metrics().await, "api_router_tokens_total", &[("type", "completion")])
                == 9.0 + 9.0 + 5.0
        })
        .await,
        "usage of both full answers (9 each) and of the stream (5) was counted"
    );
    // Health checks go over the same transport: every TLS backend is healthy.
    router.wait_health_round().await;
    for id in ["native-1", "openai-1"] {
        assert_eq!(router.backend_status(id).await, "healthy", "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_expired_and_misnamed_certificates_fail_over_with_their_reason() {
    let pki = Pki::new();
    let rogue = tls_mock("rogue", &pki.rogue_cert, &pki.rogue_key, &[]);
    let expired = tls_mock("expired", &pki.expired_cert, &pki.expired_key, &[]);
    let misnamed = tls_mock("misnamed", &pki.wrong_name_cert, &pki.wrong_name_key, &[]);
    let good = tls_mock("good", &pki.server_cert, &pki.server_key, &[]);
    let router = RouterBuilder::new(&[&rogue, &expired, &misnamed, &good])
        .env("BACKEND_CA_FILE", pki.ca.to_str().unwrap())
        .env("HEALTH_CHECK_INTERVAL_MS", "600000")
        .start();
    let policy = policy("org-a", "m", &[("rogue", 1), ("expired", 1), ("misnamed", 1), ("good", 0)], 5);
    assert_eq!(router.admin_post("/v1/admin/routing/policies", policy).await.status, 200);

    // The first health round found each bad certificate; its reason is shown.
    router.wait_health_round().await;
    let expect = [
        ("rogue", "tls: certificate not trusted"),
        ("expired", "tls: certificate expired"),
        ("misnamed", "tls: certificate not valid for this name"),
    ];
    for (id, reason) in expect {
        let h = router.admin_get(&format!("/v1/admin/routing/backends/{id}/health")).await.json();
        assert_eq!(h["status"], "unhealthy", "{id}: {h}");
        assert_eq!(h["last_error"], reason, "{id}: {h}");
        // Readmit it, so that live traffic tries it.
        let r = router.admin_post(&format!("/v1/admin/routing/backends/{id}/healthy"), json!({})).await;
        assert_eq!(r.status, 200);
    }

    let r = router.infer(KEY_A, json!({"model": "m", "request_id": "tls-failover-1"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-backend-id").as_deref(), Some("good"));
    let decisions = router.decisions("limit=10").await;
    for (id, reason) in expect {
        let d = decisions
            .iter()
            .find(|d| d["backend_id"] == id && d["request_id"] == "tls-failover-1")
            .unwrap_or_else(|| panic!("no decision for {id}: {decisions:?}"));
        assert_eq!(d["error"], reason, "{d}");
        assert!(d["status"].is_null(), "no HTTP answer: {d}");
    }
    let last = decisions.iter().find(|d| d["backend_id"] == "good").unwrap();
    assert_eq!(last["decision_type"], "FAILOVER");
    assert!(last["reason"].as_str().unwrap().contains("tls: certificate"), "{last}");
    let text = router.metrics().await;
    assert_eq!(metric(&text, "api_router_backend_errors_total", &[("error_type", "tls")]), 3.0);
    assert_eq!(good.requests().await, 1);
    // No key material or credential in the log.
    let log = router.proc.lines().join("\n");
    assert!(!log.contains("PRIVATE KEY") && !log.contains("BEGIN CERTIFICATE"));
}

fn mtls_config(dir: &std::path::Path, mock: &Mock, pki: &Pki, client_cert: bool) -> std::path::PathBuf {
    let mut tls = format!("ca_file: {}", pki.ca.display());
    if client_cert {
        tls += &format!(
            ", client_cert_file: {}, client_key_file: {}",
            pki.client_cert.display(),
            pki.client_key.display()
        );
    }
    let path = dir.join(format!("router-{client_cert}.yaml"));
    std::fs::write(
        &path,
        format!("backends:\n  - backend_id: {}\n    endpoint: {}\n    tls: {{{tls}}}\n", mock.id, mock.url()),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_with_the_client_certificate_and_without_it() {
    let pki = Pki::new();
    let mock = tls_mock("mtls", &pki.server_cert, &pki.server_key, &["--client-ca", pki.ca.to_str().unwrap()]);
    let with = RouterBuilder::new(&[])
        .env("ROUTER_CONFIG", mtls_config(pki.dir.path(), &mock, &pki, true).to_str().unwrap())
        .start();
    let r = with.infer(KEY_A, json!({"model": "m"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.requests().await, 1);

    let without = RouterBuilder::new(&[])
        .env("ROUTER_CONFIG", mtls_config(pki.dir.path(), &mock, &pki, false).to_str().unwrap())
        .env("HEALTH_CHECK_INTERVAL_MS", "600000")
        .start();
    // The health check goes over the same transport, and fails the same way.
    without.wait_health_round().await;
    let h = without.admin_get("/v1/admin/routing/backends/mtls/health").await.json();
    assert_eq!(h["last_error"], "tls: client certificate refused", "{h}");
    assert_eq!(without.admin_post("/v1/admin/routing/backends/mtls/healthy", json!({})).await.status, 200);
    let r = without.infer(KEY_A, json!({"model": "m", "request_id": "no-client-cert"})).await;
    r.assert_error(502, "backend_unavailable");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("tls: client certificate refused"), "{}", r.text());
    assert_eq!(mock.requests().await, 1, "the request never reached the backend");
    assert!(mock.stats().await["tls_failures"].as_u64().unwrap() >= 1);
    let audit = wait_audit(&without, "no-client-cert", &[("x-api-key", KEY_A)]).await;
    assert_eq!(audit["attempts"][0]["error"], "tls: client certificate refused", "{audit}");
}

#[test]
fn unreadable_tls_files_stop_the_router_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-ca.pem");
    for (var, value) in [
        ("BACKEND_CA_FILE", missing.to_str().unwrap().to_string()),
        ("ROUTER_CONFIG", {
            let path = dir.path().join("router.yaml");
            std::fs::write(
                &path,
                format!(
                    "backends:\n  - backend_id: b1\n    endpoint: https://127.0.0.1:1\n    tls: {{ca_file: {}}}\n",
                    missing.display()
                ),
            )
            .unwrap();
            path.to_str().unwrap().to_string()
        }),
    ] {
        let out = std::process::Command::new(bin("api-router"))
            .env_clear()
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("DATA_DIR", dir.path())
            .env(var, &value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].contains(var) && lines[0].contains("missing-ca.pem"), "{stderr}");
        if var == "ROUTER_CONFIG" {
            assert!(lines[0].contains("tls.ca_file"), "the setting inside the file is named: {stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backends_in_the_admin_list_show_their_kind() {
    let pki = Pki::new();
    let m = tls_mock("b1", &pki.server_cert, &pki.server_key, &[]);
    let router = RouterBuilder::new(&[]).openai(&[&m]).env("BACKEND_CA_FILE", pki.ca.to_str().unwrap()).start();
    let list = router.admin_get("/v1/admin/routing/backends").await.json();
    let b: &Value = &list["backends"][0];
    assert_eq!((b["endpoint"].as_str().unwrap(), b["kind"].as_str().unwrap()), (m.url().as_str(), "openai"));
}

// ---- serving TLS (TLS_CERT_FILE, TLS_KEY_FILE) ----

/// One keep-alive `GET path` on an open stream; the status.
async fn get_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "closed mid-answer: {}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let length: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).unwrap().trim().parse().unwrap();
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).await.unwrap();
    head[9..12].parse().unwrap()
}

/// Replaces `to` with `from`'s content atomically (as a deploy tool would).
fn replace(from: &std::path::Path, to: &std::path::Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_serves_tls_and_reloads_a_renewed_certificate_without_dropping_connections() {
    use test_support::tls::{cert_der, tls_connect};
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    replace(&pki.server_cert, &cert);
    replace(&pki.server_key, &key);
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1])
        .env("TLS_CERT_FILE", cert.to_str().unwrap())
        .env("TLS_KEY_FILE", key.to_str().unwrap())
        .start();
    let started = router.proc.lines().into_iter().find(|l| l.contains("HTTP server starting")).unwrap();
    assert!(started.contains(r#""tls":true"#), "{started}");

    let (mut old, presented) = tls_connect(router.addr, &pki.ca).await;
    assert_eq!(presented, cert_der(&pki.server_cert));
    assert_eq!(get_on(&mut old, "/v1/status/healthz").await, 200);
    assert_eq!(get_on(&mut old, "/v1/status/readyz").await, 200, "kept alive");

    // Renewed on disk: new connections get it within a few seconds.
    replace(&pki.renewed_key, &key);
    replace(&pki.renewed_cert, &cert);
    let renewed = cert_der(&pki.renewed_cert);
    assert!(
        eventually(Duration::from_secs(10), || async { tls_connect(router.addr, &pki.ca).await.1 == renewed }).await,
        "the renewed certificate was not served within 10 s"
    );
    assert!(router.proc.lines().iter().any(|l| log_message(l).as_deref() == Some("TLS certificate reloaded")));
    // The connection made before the reload is still open and served.
    assert_eq!(get_on(&mut old, "/v1/status/healthz").await, 200);

    // A pair that does not load is refused: the current one stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    assert!(
        router
            .proc
            .wait_for_line(Duration::from_secs(10), |l| l.contains("TLS certificate files changed but do not load"))
            .is_some()
    );
    assert_eq!(tls_connect(router.addr, &pki.ca).await.1, renewed);
    // Plain HTTP on the TLS port gets no answer in clear text.
    let reply =
        raw_exchange(router.addr, b"GET /v1/status/healthz HTTP/1.1\r\nhost: x\r\n\r\n", Duration::from_secs(3)).await;
    assert_eq!(reply.status(), None, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serving_files_that_do_not_make_a_pair_stop_the_start() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let missing = pki.ca.with_file_name("missing.pem");
    let cases: Vec<(Vec<(&str, &std::path::Path)>, &str)> = vec![
        (vec![("TLS_CERT_FILE", &pki.server_cert)], "TLS_KEY_FILE"),
        (vec![("TLS_KEY_FILE", &pki.server_key)], "TLS_CERT_FILE"),
        (vec![("TLS_CERT_FILE", &pki.server_cert), ("TLS_KEY_FILE", &pki.renewed_key)], "do not make a pair"),
        (vec![("TLS_CERT_FILE", &missing), ("TLS_KEY_FILE", &pki.server_key)], "missing.pem"),
    ];
    for (vars, needle) in cases {
        let mut cmd = std::process::Command::new(bin("api-router"));
        cmd.env_clear().env("HTTP_ADDR", "127.0.0.1:0").env("DATA_DIR", dir.path());
        for (k, v) in &vars {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{vars:?}: {stderr}");
        assert!(stderr.contains(needle), "{vars:?}: {stderr}");
    }
}
