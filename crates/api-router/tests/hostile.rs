//! Hostile clients against the real router over raw sockets: slow headers and
//! bodies, a stalled HTTP/2 preface, connection floods and file-descriptor
//! exhaustion, idle keep-alive,
//! header bombs, request smuggling, invalid UTF-8, deep JSON, out-of-range
//! numbers, bodies that end early, oversized bodies sent whole, and admin
//! token guessing. Each gets a clear 4xx or a closed connection, nothing is
//! recorded, and everyone else keeps being served.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::json;
use test_support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A router with short client timeouts, for tests that wait on them.
fn hasty(m1: &Mock) -> RouterBuilder {
    RouterBuilder::new(&[m1])
        .env("HTTP_HEADER_READ_TIMEOUT_MS", "1000")
        .env("HTTP_BODY_READ_TIMEOUT_MS", "1000")
        .env("HTTP_IDLE_TIMEOUT_MS", "1500")
}

fn closed(text: &str, reason: &str) -> f64 {
    metric_or_zero(text, "api_router_http_connections_closed_total", &[("reason", reason)])
}

/// A request of the native door with `extra` headers and `body`, as bytes.
fn native_request(extra: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /v1/inference HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY_A}\r\ncontent-type: application/json\r\n{extra}"
    )
    .into_bytes();
    if !extra.to_ascii_lowercase().contains("content-length")
        && !extra.to_ascii_lowercase().contains("transfer-encoding")
    {
        r.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

async fn ok(router: &Router, id: &str) -> bool {
    router.infer(KEY_A, json!({"model": "gpt-4o", "request_id": id})).await.status == 200
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_headers_are_closed_after_the_header_timeout_while_others_are_served() {
    let m1 = Mock::start("backend-1", &[]);
    let router = hasty(&m1).start();
    // 300 clients each sending their headers a byte every 200 ms.
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..300 {
        let addr = router.addr;
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(b"GET /v1/status/healthz HTTP/1.1\r\n").await;
            loop {
                if s.write_all(b"X").await.is_err() {
                    return Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                if started.elapsed() > Duration::from_secs(20) {
                    panic!("a slow client was still connected after 20 s");
                }
            }
        }));
    }
    // Everyone else is served meanwhile.
    for i in 0..50 {
        assert!(ok(&router, &format!("during-slowloris-{i}")).await);
    }
    for task in slow {
        let closed_at = task.await.unwrap();
        assert!(closed_at.duration_since(started) < Duration::from_secs(6), "closed after {:?}", closed_at - started);
    }
    assert!(closed(&router.metrics().await, "header_timeout") >= 300.0);
    assert!(ok(&router, "after-slowloris").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_body_gets_408_after_the_body_timeout_and_is_not_recorded() {
    let m1 = Mock::start("backend-1", &[]);
    let router = hasty(&m1).start();
    let mut s = TcpStream::connect(router.addr).await.unwrap();
    s.write_all(&native_request("content-length: 100\r\n", b"{")).await.unwrap();
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        for _ in 0..20 {
            if s.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        s
    });
    let mut s = writer.await.unwrap();
    let reply = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert_eq!(reply.status(), Some(408), "{}", reply.text());
    assert!(reply.text().contains("request_timeout"));
    assert!(reply.closed, "the connection is closed after a 408");
    assert!(t0.elapsed() < Duration::from_secs(6));
    assert_eq!(m1.requests().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_connection_cap_new_connections_are_closed_and_open_ones_served() {
    let m1 = Mock::start("backend-1", &[]);
    let router = hasty(&m1).env("HTTP_MAX_CONNECTIONS", "20").env("HTTP_HEADER_READ_TIMEOUT_MS", "3000").start();
    // A keep-alive client with its connection open before the flood.
    assert!(ok(&router, "before-flood").await);
    let mut silent = Vec::new();
    for _ in 0..60 {
        silent.push(TcpStream::connect(router.addr).await.unwrap());
    }
    // The ones past the cap are closed at once; the others wait.
    let mut closed_at_once = 0;
    for s in &mut silent {
        if read_until_closed(s, Duration::from_millis(300)).await.closed {
            closed_at_once += 1;
        }
    }
    assert!(closed_at_once >= 40, "only {closed_at_once} of 60 closed at once");
    let text = router.metrics().await;
    assert!(metric(&text, "api_router_http_connections_refused_total", &[]) >= 40.0);
    assert!(metric(&text, "api_router_http_connections", &[]) <= 20.0);
    assert!(router.proc.lines().iter().any(|l| l.contains("client connection limit reached")));
    // The open keep-alive connection keeps working.
    for i in 0..5 {
        assert!(ok(&router, &format!("during-flood-{i}")).await);
    }
    // Silent connections are closed at the header timeout; then new ones are served.
    assert!(
        eventually(Duration::from_secs(8), || async {
            raw_exchange(
                router.addr,
                b"GET /v1/status/healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                Duration::from_secs(2),
            )
            .await
            .status()
                == Some(200)
        })
        .await,
        "new clients are not served once the silent ones time out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_256_file_descriptors_silent_connections_cannot_starve_the_router() {
    let m1 = Mock::start("backend-1", &[]);
    let router =
        hasty(&m1).env("HTTP_HEADER_READ_TIMEOUT_MS", "2000").wrapped(&["prlimit", "--nofile=256:256"]).start();
    // A connection opened before the flood, held by this test (not left to
    // a client pool's timing, which could open a new one past the cap).
    let tcp = TcpStream::connect(router.addr).await.unwrap();
    let (mut open, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut infer_on_open = async |id: String| {
        open.ready().await.unwrap();
        let body = json!({"model": "gpt-4o", "request_id": id}).to_string();
        let request = hyper::Request::post("/v1/inference")
            .header("host", "router")
            .header("x-api-key", KEY_A)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let response = open.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        http_body_util::BodyExt::collect(response.into_body()).await.unwrap();
        status
    };
    assert_eq!(infer_on_open("before".into()).await, 200);
    let mut silent = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect(router.addr).await {
            Ok(s) => silent.push(s),
            Err(_) => break,
        }
    }
    // The open connection is still served; the refusals are logged.
    for i in 0..5 {
        assert_eq!(infer_on_open(format!("starved-{i}")).await, 200);
    }
    assert!(router.proc.lines().iter().any(|l| l.contains("client connection limit reached")));
    // Once the silent ones time out, new clients get in.
    assert!(
        eventually(Duration::from_secs(10), || async {
            raw_exchange(
                router.addr,
                b"GET /v1/status/healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                Duration::from_secs(2),
            )
            .await
            .status()
                == Some(200)
        })
        .await
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_stalling_inside_the_http2_preface_is_closed_at_the_header_timeout() {
    let m1 = Mock::start("backend-1", &[]);
    let router = hasty(&m1).start();
    let mut s = TcpStream::connect(router.addr).await.unwrap();
    // The preface's first half: HTTP/2 or not is still undecided.
    s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let t0 = Instant::now();
    let reply = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(reply.closed, "still open after 5 s");
    assert!(t0.elapsed() < Duration::from_secs(3), "closed after {:?}, header timeout 1 s", t0.elapsed());
    assert!(closed(&router.metrics().await, "header_timeout") >= 1.0);
    assert!(ok(&router, "after-stalled-preface").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plaintext_http2_with_prior_knowledge_is_served_beside_http1() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let m1 = Mock::start("backend-1", &[]);
    let router = hasty(&m1).start();
    let tcp = TcpStream::connect(router.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let body = json!({"model": "gpt-4o", "request_id": format!("h2c-{i}")}).to_string();
        let request = hyper::Request::post(format!("http://{}/v1/inference", router.addr))
            .header("x-api-key", KEY_A)
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        assert_eq!((response.status().as_u16(), response.version()), (200, hyper::Version::HTTP_2));
        assert_eq!(response.headers()["x-request-id"], format!("h2c-{i}").as_str());
        let answer: serde_json::Value =
            serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert!(answer.is_object(), "{answer}");
    }
    assert!(ok(&router, "http1-beside-h2c").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let m1 = Mock::start("backend-1", &[]);
    let router = hasty(&m1).env("HTTP_HEADER_READ_TIMEOUT_MS", "5000").start();
    let mut s = TcpStream::connect(router.addr).await.unwrap();
    s.write_all(b"GET /v1/status/healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let t0 = Instant::now();
    let reply = read_until_closed(&mut s, Duration::from_secs(6)).await;
    assert_eq!(reply.status(), Some(200));
    assert!(reply.closed, "still open after 6 s");
    assert!(t0.elapsed() < Duration::from_secs(4), "closed after {:?}, idle timeout 1.5 s", t0.elapsed());
    assert!(closed(&router.metrics().await, "idle") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_many_headers_get_431_and_a_closed_connection() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).start();
    let headers: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let reply = raw_exchange(router.addr, &native_request(&headers, b"{}"), Duration::from_secs(5)).await;
    assert_eq!((reply.status(), reply.closed), (Some(431), true), "{}", reply.text());
    assert!(ok(&router, "after-header-bomb").await);
    assert_eq!(m1.requests().await, 1, "only the good request reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_64_kb_header_gets_431_and_a_closed_connection() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).start();
    let header = format!("x-big: {}\r\n", "a".repeat(64 * 1024));
    let reply = raw_exchange(router.addr, &native_request(&header, b"{}"), Duration::from_secs(5)).await;
    assert_eq!((reply.status(), reply.closed), (Some(431), true), "{}", reply.text());
    assert_eq!(m1.requests().await, 0);
}

/// A framing that could smuggle a request: 400, the connection closed,
/// nothing reaches a backend or the audit store.
async fn assert_refused_framing(request: &[u8]) {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).start();
    let reply = raw_exchange(router.addr, request, Duration::from_secs(5)).await;
    assert_eq!(reply.status(), Some(400), "{}", reply.text());
    assert_eq!(reply.text().matches("HTTP/1.1 ").count(), 1, "one answer, nothing after it: {}", reply.text());
    assert!(reply.closed, "the connection must be closed after an ambiguous framing");
    assert_eq!(m1.requests().await, 0);
    let text = router.metrics().await;
    assert_eq!(metric_or_zero(&text, "api_router_audit_records_total", &[]), 0.0);
    assert!(ok(&router, "after-smuggling").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn content_length_with_transfer_encoding_is_refused() {
    // Read as chunked, this is a valid request and then a second one; read
    // by its length, one request. Neither reading is acted on.
    let json = br#"{"model":"gpt-4o"}"#;
    let smuggled = b"GET /v1/status/healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    let body = [format!("{:x}\r\n", json.len()).as_bytes(), json, b"\r\n0\r\n\r\n", smuggled].concat();
    let head = format!("content-length: {}\r\ntransfer-encoding: chunked\r\n", body.len());
    assert_refused_framing(&native_request(&head, &body)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_different_content_lengths_are_refused() {
    assert_refused_framing(&native_request("content-length: 2\r\ncontent-length: 20\r\n", b"{}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_transfer_encodings_are_refused() {
    // hyper reads the last one (chunked); a proxy may read the first.
    let head = "transfer-encoding: identity\r\ntransfer-encoding: chunked\r\n";
    assert_refused_framing(&native_request(head, b"12\r\n{\"model\":\"gpt-4o\"}\r\n0\r\n\r\n")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_chunk_size_is_refused() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).start();
    let reply = raw_exchange(
        router.addr,
        &native_request("transfer-encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n"),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(reply.status(), Some(400), "{}", reply.text());
    assert!(reply.closed);
    assert_eq!(m1.requests().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_utf8_in_a_request_id_header_is_a_400() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[]).openai(&[&m1]).start();
    let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    let mut request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_A}\r\ncontent-length: {}\r\nx-request-id: ",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(b"\xff\xfe\r\n\r\n");
    request.extend_from_slice(body);
    let reply = raw_exchange(router.addr, &request, Duration::from_millis(500)).await;
    assert_eq!(reply.status(), Some(400), "{}", reply.text());
    assert!(reply.text().contains("X-Request-Id"));
    assert_eq!(m1.requests().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_utf8_in_an_api_key_is_a_401() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).start();
    let body = br#"{"model":"gpt-4o"}"#;
    let mut request =
        format!("POST /v1/inference HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nx-api-key: ", body.len()).into_bytes();
    request.extend_from_slice(b"key-\xff\r\n\r\n");
    request.extend_from_slice(body);
    let reply = raw_exchange(router.addr, &request, Duration::from_millis(500)).await;
    assert_eq!(reply.status(), Some(401), "{}", reply.text());
    assert_eq!(m1.requests().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_utf8_in_a_json_string_is_a_400() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).start();
    let reply = raw_exchange(
        router.addr,
        &native_request("", b"{\"model\":\"gpt-\xff\",\"payload\":\"x\"}"),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(reply.status(), Some(400), "{}", reply.text());
    assert!(reply.text().contains("invalid_json") || reply.text().contains("invalid_request"), "{}", reply.text());
    assert_eq!(m1.requests().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_nested_ten_thousand_deep_is_a_400_at_every_door() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).start();
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let r = router.infer(KEY_A, serde_json::from_str::<serde_json::Value>(r#"{"model":"gpt-4o"}"#).unwrap()).await;
    assert_eq!(r.status, 200);
    let body = format!(r#"{{"model":"gpt-4o","payload":{deep}}}"#);
    let r = send(Method::POST, &router.url("/v1/inference"), &[("x-api-key", KEY_A)], body).await;
    r.assert_error(400, "invalid_json");
    let body = format!(r#"{{"model":"gpt-4o","messages":{deep}}}"#);
    let r =
        send(Method::POST, &router.url("/v1/chat/completions"), &[("authorization", &format!("Bearer {KEY_A}"))], body)
            .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let body = format!(r#"{{"model":"claude","max_tokens":5,"messages":{deep}}}"#);
    let r = send(Method::POST, &router.url("/v1/messages"), &[("x-api-key", KEY_A)], body).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(m1.requests().await, 1, "only the first, shallow request reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn numbers_out_of_range_are_a_400() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).start();
    let r = send(Method::POST, &router.url("/v1/inference"), &[("x-api-key", KEY_A)], r#"{"model":1e999}"#).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let body = r#"{"model":"gpt-4o","max_tokens":1e999,"messages":[{"role":"user","content":"hi"}]}"#;
    let r =
        send(Method::POST, &router.url("/v1/chat/completions"), &[("authorization", &format!("Bearer {KEY_A}"))], body)
            .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let body = r#"{"model":"claude","max_tokens":18446744073709551616,"messages":[]}"#;
    let r = send(Method::POST, &router.url("/v1/messages"), &[("x-api-key", KEY_A)], body).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(m1.requests().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_ends_early_is_a_400_and_not_recorded() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).start();
    let mut s = TcpStream::connect(router.addr).await.unwrap();
    s.write_all(&native_request("content-length: 100\r\n", br#"{"model":"#)).await.unwrap();
    s.shutdown().await.unwrap();
    let reply = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert_eq!(reply.status(), Some(400), "{}", reply.text());
    assert_eq!(m1.requests().await, 0);
    assert_eq!(metric_or_zero(&router.metrics().await, "api_router_audit_records_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_body_sent_whole_gets_its_413_not_a_reset() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).start();
    let big = vec![b' '; 2 << 20];
    for (i, framing) in ["content-length", "chunked"].iter().cycle().take(10).enumerate() {
        let mut s = TcpStream::connect(router.addr).await.unwrap();
        let request = if *framing == "chunked" {
            let mut body = format!("{:x}\r\n", big.len()).into_bytes();
            body.extend_from_slice(&big);
            body.extend_from_slice(b"\r\n0\r\n\r\n");
            native_request("transfer-encoding: chunked\r\n", &body)
        } else {
            native_request("", &big)
        };
        // The whole body first, as a client that does not read early does.
        s.write_all(&request).await.unwrap_or_else(|e| panic!("round {i} ({framing}): the write failed: {e}"));
        let reply = read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert_eq!(reply.status(), Some(413), "round {i} ({framing}): {}", reply.text());
        assert!(reply.text().contains("payload_too_large"));
    }
    assert_eq!(m1.requests().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_token_guessing_is_counted_logged_and_slowed_while_the_right_token_works() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).start();
    let url = router.url("/v1/admin/routing/backends");
    let guesses: Vec<String> = (0..50).map(|i| format!("guess-{i}-{}", fastrand::u64(..))).collect();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for g in &guesses {
        let (url, auth) = (url.clone(), format!("Bearer {g}"));
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = send(Method::GET, &url, &[("authorization", &auth)], String::new()).await;
            (r.status.as_u16(), started.elapsed())
        }));
    }
    // While the guesses wait, the right token is answered at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let right = Instant::now();
    assert_eq!(router.admin_get("/v1/admin/routing/backends").await.status, 200);
    assert!(right.elapsed() < Duration::from_secs(1), "the right token waited {:?}", right.elapsed());
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let (status, took) = t.await.unwrap();
        assert_eq!(status, 401);
        slowest = slowest.max(took);
    }
    assert!(slowest >= Duration::from_secs(1), "50 guesses were not slowed down: slowest {slowest:?}");
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert_eq!(metric(&router.metrics().await, "api_router_admin_auth_failures_total", &[]), 50.0);
    let lines = router.proc.lines();
    let logged = lines.iter().filter(|l| log_message(l).as_deref() == Some("admin authentication failed")).count();
    assert_eq!(logged, 50);
    for g in &guesses {
        assert!(!lines.iter().any(|l| l.contains(g.as_str())), "a presented token reached the log");
    }
}
