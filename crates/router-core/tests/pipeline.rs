//! The pipeline's logic in process: a real core (stores, limits, audit,
//! background tasks) and in-process mocks reached through a transport without
//! sockets, on paused time where time matters. Failover order and its
//! decisions, a timeout failing over at exactly the per-attempt timeout, a
//! reservation held while the request is in flight and settled or released
//! after it, and streams cut by the backend or left by the client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use mock_backend::{Faults, Mock, Options};
use router_core::config_service::{BackendSpec, ConfigState};
use router_core::limits::period::Period;
use router_core::limits::{Budget, FailureMode, LimitSettings, OrgLimits, Price};
use router_core::pipeline::{Outcome, RequestError};
use router_core::routing::decisions::DecisionFilter;
use router_core::routing::policy::{Policy, PolicyBackend};
use router_core::usage::{Fsync, FullPolicy, UsageSettings};
use router_core::{Core, CoreSettings, InferenceRequest, Parts, Running, process};
use router_providers::Operation;
use router_providers::transport::{AttemptError, Transports};
use serde_json::{Value, json};
use test_support::in_process::InProcess;

const BACKEND_TIMEOUT: Duration = Duration::from_secs(5);

fn status_of(e: &RequestError) -> u16 {
    match e {
        RequestError::BackendsFailed { last: AttemptError::Timeout, .. } => 504,
        RequestError::BackendsFailed { .. } => 502,
        _ => 500,
    }
}

/// Backends `b1`, `b2` (`kind+http://bN:80`) over in-process mocks, one
/// policy `org`/`m` over them with `weights`.
struct Setup {
    running: Running,
    mocks: BTreeMap<&'static str, Arc<Mock>>,
    _dir: tempfile::TempDir,
}

async fn setup(kind: &str, weights: &[(&'static str, u32)], org: Option<OrgLimits>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mut state = ConfigState { default_route: false, default_failover_threshold: 3, ..Default::default() };
    let mut mocks = BTreeMap::new();
    let mut routes = Vec::new();
    for (id, _) in weights {
        let prefix = if kind == "native" { String::new() } else { format!("{kind}+") };
        state.backends.insert(id.to_string(), BackendSpec::parse_endpoint(&format!("{prefix}http://{id}:80")).unwrap());
        let mock = Mock::new(&Options::new(id));
        routes.push((format!("{id}:80"), mock.clone()));
        mocks.insert(*id, mock);
    }
    state.policies.insert(
        ("org".into(), "m".into()),
        Policy {
            policy_id: "p".into(),
            organization_id: "org".into(),
            model: "m".into(),
            backends: weights.iter().map(|(id, w)| PolicyBackend { backend_id: id.to_string(), weight: *w }).collect(),
            failover_threshold: 3,
            fallback_models: vec![],
        },
    );
    state.prices.insert(
        "m".into(),
        Price {
            input_per_1k: 1.0,
            output_per_1k: 1.0,
            cache_read_per_1k: None,
            cache_write_per_1k: None,
            request_cost: Some(0.5),
        },
    );
    if let Some(limits) = org {
        state.organizations.insert("org".into(), limits);
    }
    let settings = CoreSettings {
        instance_id: "test".into(),
        data_dir: dir.path().to_path_buf(),
        health_check_interval: Duration::from_secs(3600),
        health_check_timeout: Duration::from_secs(1),
        backend_timeout: BACKEND_TIMEOUT,
        max_response_bytes: 1 << 20,
        audit_retention: Duration::from_secs(86_400),
        audit_commit_interval: Duration::from_millis(10),
        audit_database: None,
        decisions_capacity: 100,
        upstream_cooldown_max: Duration::from_secs(60),
        limits: LimitSettings {
            default_rate: None,
            failure_mode: FailureMode::Local,
            redis: None,
            redis_timeout: Duration::from_millis(20),
            redis_prefix: "t:".into(),
            default_request_cost: 0.0,
            estimated_tokens: 0,
            budget_service: None,
        },
        usage: UsageSettings {
            brokers: None,
            topic: "t".into(),
            max_records: 1000,
            full_policy: FullPolicy::Reject,
            fsync: Fsync::Never,
            linger: router_core::usage::publisher::DEFAULT_LINGER,
        },
        transport: Default::default(),
        initial_state: state,
    };
    let routes = routes.iter().map(|(a, m)| (a.as_str(), m.clone())).collect();
    let transports = Arc::new(Transports::fixed(Arc::new(InProcess::new(routes))));
    let running = Core::start(settings, status_of, Parts { transports: Some(transports), remote: None }).await.unwrap();
    // The health monitor's first round runs at once; let it finish, so that
    // it does not reset the counters a test looks at.
    let checked = async {
        while running.core.config.load().backend_list.iter().any(|b| b.runtime.health.view().last_check.is_none()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), checked).await.expect("the first health round");
    Setup { running, mocks, _dir: dir }
}

impl Setup {
    fn core(&self) -> &Arc<Core> {
        &self.running.core
    }

    fn fault(&self, id: &str, faults: Faults) {
        self.mocks[id].apply(&faults).unwrap();
    }

    async fn audit(&self, request_id: &str) -> Value {
        let bytes = self.core().audit.get(request_id, Some("org")).await.unwrap().expect("an audit record");
        serde_json::from_slice(&bytes).unwrap()
    }

    /// The audit record of a stream, written when the stream ended. (Not a
    /// tokio timeout: a lookup waits on the audit store's own thread, and
    /// paused time would jump past any deadline meanwhile.)
    async fn wait_audit(&self, request_id: &str) -> Value {
        for _ in 0..500 {
            if let Some(b) = self.core().audit.get(request_id, Some("org")).await.unwrap() {
                return serde_json::from_slice(&b).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no audit record for {request_id}");
    }

    async fn spent(&self) -> f64 {
        let limits = self.core().config.load().org_limits("org");
        self.core().limits.usage("org", limits).await.unwrap()["budget"]["spent"].as_f64().unwrap()
    }
}

fn native(id: &str) -> InferenceRequest {
    InferenceRequest {
        request_id: Arc::from(id),
        organization_id: Arc::from("org"),
        model: Arc::from("m"),
        op: Operation::Native,
        body: Bytes::from(json!({"model": "m", "request_id": id, "payload": "hi"}).to_string()),
        json: None,
        stream: false,
        headers: Default::default(),
        key: None,
    }
}

fn chat_stream(id: &str) -> InferenceRequest {
    let v = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    InferenceRequest {
        request_id: Arc::from(id),
        organization_id: Arc::from("org"),
        model: Arc::from("m"),
        op: Operation::Chat,
        body: Bytes::from(v.to_string()),
        json: Some(v),
        stream: true,
        headers: Default::default(),
        key: None,
    }
}

fn answered_by(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Answered { backend_id, response } => {
            assert_eq!(response.status, 200);
            backend_id
        }
        Outcome::Streaming { .. } => panic!("a stream"),
        Outcome::Failed(e) => panic!("failed: {e}"),
    }
}

#[tokio::test]
async fn a_failing_primary_fails_over_to_the_standby_and_every_attempt_is_recorded() {
    let s = setup("native", &[("b1", 1), ("b2", 0)], None).await;
    s.fault("b1", Faults { error_rate: Some(1.0), error_status: Some(503), ..Default::default() });
    let p = process(s.core(), native("r-failover")).await;
    assert_eq!(answered_by(&p.outcome), "b2");
    assert_eq!((s.mocks["b1"].requests(), s.mocks["b2"].requests()), (1, 1));

    let d = s.core().decisions.query(&DecisionFilter::default());
    let (first, second) = (&d[1], &d[0]);
    assert_eq!(
        (first.backend_id.as_deref(), first.decision_type.as_str(), first.status),
        (Some("b1"), "PRIMARY", Some(503))
    );
    assert_eq!(first.error.as_deref(), Some("backend answered 503"));
    assert_eq!((second.backend_id.as_deref(), second.decision_type.as_str()), (Some("b2"), "FAILOVER"));
    assert_eq!(second.reason, "failover from b1: backend answered 503");

    let audit = s.audit("r-failover").await;
    assert_eq!(audit["status"], 200);
    assert_eq!(audit["backend_id"], "b2");
    assert_eq!(audit["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(audit["usage"]["total_tokens"], 21, "usage read by the answering backend's kind");
    let snapshot = s.core().config.load();
    let failures = snapshot.backend("b1").unwrap().runtime.health.view().consecutive_failures;
    assert_eq!(failures, 1, "a 503 counts against health");
}

#[tokio::test(start_paused = true)]
async fn a_slow_backend_fails_over_exactly_at_the_attempt_timeout() {
    let s = setup("native", &[("b1", 1), ("b2", 0)], None).await;
    s.fault("b1", Faults { latency_ms: Some(10_000), ..Default::default() });
    let p = process(s.core(), native("r-timeout")).await;
    assert_eq!(answered_by(&p.outcome), "b2");
    // The attempt's own clock (the whole call also waits for the audit
    // journal, a real thread, while the paused clock may jump ahead).
    let d = s.core().decisions.query(&DecisionFilter { backend_id: Some("b1".into()), ..Default::default() });
    assert_eq!(d[0].error.as_deref(), Some("timed out"));
    let timeout_ms = BACKEND_TIMEOUT.as_secs_f64() * 1000.0;
    assert!(d[0].latency_ms >= timeout_ms && d[0].latency_ms < timeout_ms + 50.0, "{}", d[0].latency_ms);

    // With nowhere to fail over to, the timeout is the answer.
    s.fault("b2", Faults { latency_ms: Some(10_000), ..Default::default() });
    let p = process(s.core(), native("r-timeout-2")).await;
    match p.outcome {
        Outcome::Failed(RequestError::BackendsFailed { attempts: 2, last: AttemptError::Timeout }) => {}
        _ => panic!("expected both attempts to time out"),
    }
    assert_eq!(s.audit("r-timeout-2").await["status"], 504, "the door's status is recorded");
}

#[tokio::test(start_paused = true)]
async fn a_reservation_is_held_in_flight_then_settled_or_released() {
    let budget = OrgLimits { budget: Some(Budget { amount: 10.0, period: Period::Daily }), ..Default::default() };
    let s = setup("native", &[("b1", 1)], Some(budget)).await;
    s.fault("b1", Faults { latency_ms: Some(1000), ..Default::default() });
    let core = s.core().clone();
    let task = tokio::spawn(async move { process(&core, native("r-settle")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.spent().await, 0.5, "the estimate (request_cost) is reserved while in flight");
    let p = task.await.unwrap();
    assert_eq!(answered_by(&p.outcome), "b1");
    // Settled to the usage: 12 + 9 tokens at 1 per 1,000.
    let settled = async {
        while s.spent().await != 0.021 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), settled).await.expect("settled to the reported usage");

    s.fault("b1", Faults { error_rate: Some(1.0), error_status: Some(500), ..Default::default() });
    let core = s.core().clone();
    let task = tokio::spawn(async move { process(&core, native("r-release")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.spent().await, 0.521, "reserved on top of what was spent");
    assert!(matches!(task.await.unwrap().outcome, Outcome::Failed(RequestError::BackendsFailed { .. })));
    let released = async {
        while s.spent().await != 0.021 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), released).await.expect("the reservation was released");
}

fn break_event(detail: &str) -> Bytes {
    Bytes::from(format!("event: error\ndata: {detail}\n\n"))
}

#[tokio::test(start_paused = true)]
async fn a_stream_cut_by_the_backend_ends_with_the_doors_event_and_counts_what_was_delivered() {
    let s = setup("openai", &[("b1", 1)], None).await;
    s.fault("b1", Faults { cut_stream_after: Some(2), stream_delay_ms: Some(20), ..Default::default() });
    let p = process(s.core(), chat_stream("r-cut")).await;
    let (status, body, backend_id) = match p.outcome {
        Outcome::Streaming { status, body, backend_id, .. } => (status, body, backend_id),
        Outcome::Answered { response, .. } => panic!("not a stream: {} {:?}", response.status, response.body),
        Outcome::Failed(e) => panic!("failed: {e}"),
    };
    assert_eq!((status.as_u16(), &*backend_id), (200, "b1"));
    let bytes = (*body).with_break_event(break_event).collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(text.matches("data: {").count(), 2, "{text}");
    assert!(text.ends_with("\n\n") && text.contains("event: error\ndata: connection error"), "{text}");

    let audit = s.wait_audit("r-cut").await;
    assert_eq!(audit["status"], 502);
    assert!(audit["error"].as_str().unwrap().starts_with("stream broken midway"), "{audit}");
    assert_eq!(audit["usage"]["completion_tokens"], 2, "one per delivered event");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_cancels_the_upstream_and_is_recorded_as_499() {
    let s = setup("openai", &[("b1", 1)], None).await;
    s.fault("b1", Faults { stream_chunks: Some(50), stream_delay_ms: Some(100), ..Default::default() });
    let p = process(s.core(), chat_stream("r-gone")).await;
    let Outcome::Streaming { mut body, .. } = p.outcome else { panic!("not a stream") };
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: {"));
    drop(body);
    let audit = s.wait_audit("r-gone").await;
    assert_eq!(audit["status"], 499);
    assert!(audit["error"].as_str().unwrap().contains("client disconnected"), "{audit}");
    let stats = async {
        while s.mocks["b1"].disconnects() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), stats).await.expect("the mock saw its client go");
}
