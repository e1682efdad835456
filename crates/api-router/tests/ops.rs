//! The operations package: alert rules (promtool), the live metrics
//! exposition (promtool), the Grafana dashboard, and every PromQL expression
//! of both evaluated by a real Prometheus scraping a router with traffic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use test_support::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn dashboard() -> Value {
    let path = root().join("deployments/helm/api-router-service/dashboards/api-router.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("the dashboard is valid JSON")
}

fn rule_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("deployments/prometheus/alerts.yml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    doc["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| (r["alert"].as_str().unwrap().to_string(), r["expr"].as_str().unwrap().trim().to_string()))
        .collect()
}

fn panel_exprs() -> Vec<(String, String)> {
    dashboard()["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap().to_string();
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap().to_string()))
        })
        .collect()
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let dir = root().join("deployments/prometheus");
    for args in [vec!["check", "rules", "alerts.yml"], vec!["test", "rules", "alerts_test.yml"]] {
        let out =
            Command::new("promtool").args(&args).current_dir(&dir).output().expect("promtool (make test installs it)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // One rule per runbook alert, each with a severity and a runbook link.
    let text = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    for alert in [
        "HighErrorRate",
        "HighLatencyP95",
        "HighLatencyP99",
        "HighFailoverRate",
        "BackendUnhealthy",
        "RateLimitDenialsHigh",
        "BufferStoreSizeHigh",
        "BufferStoreSizeEscalation",
        "BufferStoreAgeHigh",
        "KafkaUnhealthy",
        "ConfigServiceUnhealthy",
        "BudgetDenialsHigh",
        "QuotaDenialsHigh",
    ] {
        assert!(text.contains(&format!("alert: {alert}\n")), "missing {alert}");
        assert!(text.contains(&format!("runbook_url: docs/runbook.md#{}", alert.to_lowercase())));
    }
}

#[test]
fn dashboard_has_the_runbook_panels_and_variables() {
    let d = dashboard();
    let vars: Vec<&str> =
        d["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert!(vars.contains(&"datasource") && vars.contains(&"backend"), "{vars:?}");
    let ds = d["templating"]["list"].as_array().unwrap().iter().find(|v| v["name"] == "datasource").unwrap();
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let titles: Vec<&str> = d["panels"].as_array().unwrap().iter().map(|p| p["title"].as_str().unwrap()).collect();
    for t in ["Backend Health Status", "Error Rate by Backend", "Backend Latency", "Routing Decisions"] {
        assert!(titles.contains(&t), "missing panel {t}");
    }
    for p in d["panels"].as_array().unwrap() {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {} ignores the datasource variable", p["title"]);
    }
}

/// A router with traffic that exercises every family: successes, failovers
/// (a dead backend), rate-limit, budget and quota denials, and buffering (a
/// broker that is not there).
async fn busy_router(m1: &Mock, m2: &mut Mock, tmp: &tempfile::TempDir) -> Router {
    let config = tmp.path().join("router.yaml");
    std::fs::write(&config, "prices:\n  m: {input_per_1k: 1, output_per_1k: 1, request_cost: 1.0}\n").unwrap();
    let router = RouterBuilder::new(&[m1, m2])
        .env("ROUTER_CONFIG", config.to_str().unwrap())
        .env("API_KEYS", &format!("{KEY_A}=org-a,{KEY_B}=org-b,key-org-c=org-c,key-org-d=org-d"))
        .env("KAFKA_BROKERS", &format!("127.0.0.1:{}", free_port()))
        .env("HEALTH_CHECK_INTERVAL_MS", "60000")
        .start();
    let p = policy("org-a", "m", &[("backend-1", 1), ("backend-2", 1)], 1000);
    assert_eq!(router.admin_post("/v1/admin/routing/policies", p).await.status, 200);
    for (org, limits) in [
        ("org-b", json!({"quota": {"requests": 1, "period": "daily"}})),
        ("org-d", json!({"rate_limit": {"requests_per_second": 0.01, "burst": 1}})),
        ("org-c", json!({"budget": {"amount": 0.5, "period": "daily"}})),
    ] {
        assert_eq!(router.admin_put(&format!("/v1/admin/organizations/{org}/limits"), limits).await.status, 200);
    }
    router.wait_health_round().await;
    m2.kill();
    traffic(&router).await;
    router
}

async fn traffic(router: &Router) {
    for _ in 0..20 {
        assert_eq!(router.infer(KEY_A, json!({"model": "m"})).await.status, 200);
    }
    for _ in 0..3 {
        for key in [KEY_B, "key-org-c", "key-org-d"] {
            router.infer(key, json!({"model": "m"})).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_check_metrics() {
    let (m1, mut m2) = (Mock::start("backend-1", &[]), Mock::start("backend-2", &[]));
    let tmp = tempfile::tempdir().unwrap();
    let router = busy_router(&m1, &mut m2, &tmp).await;
    let text = router.metrics().await;
    for family in [
        "router_failover_total",
        "api_router_rate_limit_denials_total",
        "api_router_budget_denials_total",
        "api_router_quota_denials_total",
    ] {
        assert!(metric(&text, family, &[]) > 0.0, "no {family} after traffic");
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics: {report}");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_every_dashboard_and_rule_expression() {
    let (m1, mut m2) = (Mock::start("backend-1", &[]), Mock::start("backend-2", &[]));
    let tmp = tempfile::tempdir().unwrap();
    let router = busy_router(&m1, &mut m2, &tmp).await;

    let prom_port = free_port();
    let config = tmp.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{}]\nscrape_configs:\n  - job_name: api-router\n    static_configs: [{{targets: ['{}']}}]\n",
            root().join("deployments/prometheus/alerts.yml").display(),
            router.addr
        ),
    )
    .unwrap();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", tmp.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"));
    let prom = Proc::spawn(cmd);
    let api = format!("http://127.0.0.1:{prom_port}/api/v1/query?query=");
    let query = |q: &str| {
        let url = format!("{api}{}", urlencode(q));
        async move { try_get_json(&url).await.unwrap_or(Value::Null) }
    };
    assert!(
        eventually(Duration::from_secs(30), || async { query("up").await["data"]["result"][0]["value"][1] == "1" })
            .await,
        "Prometheus never scraped the router:\n{}",
        prom.lines().join("\n")
    );
    // Traffic spread over a few scrapes, so that rates have two points:
    // after each round, wait for Prometheus to have scraped once more.
    let scrapes = || async {
        query("count_over_time(up[10m])").await["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    for _ in 0..3 {
        traffic(&router).await;
        let before = scrapes().await;
        assert!(
            eventually(Duration::from_secs(15), || async { scrapes().await > before }).await,
            "Prometheus stopped scraping"
        );
    }

    // Whole sample names, not substrings: `x_total` must not pass for `x`.
    let exposition = router.metrics().await;
    let exported: std::collections::BTreeSet<&str> =
        exposition.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    let names =
        regex_names(&panel_exprs().into_iter().chain(rule_exprs()).map(|(_, e)| e).collect::<Vec<_>>().join(" "));
    for name in &names {
        assert!(exported.contains(name.as_str()), "{name} is used by a panel or rule but not exported");
    }
    for (what, expr) in panel_exprs().into_iter().chain(rule_exprs()) {
        let expr = expr.replace("$backend", ".*");
        let v = query(&expr).await;
        assert_eq!(v["status"], "success", "{what}: {expr}: {v}");
    }
    for panel in ["Backend Health Status", "Error Rate by Backend", "Backend Latency", "Routing Decisions"] {
        let exprs: Vec<String> =
            panel_exprs().into_iter().filter(|(t, _)| t == panel).map(|(_, e)| e.replace("$backend", ".*")).collect();
        let has_data = eventually(Duration::from_secs(15), || {
            let exprs = exprs.clone();
            let query = &query;
            async move {
                for e in &exprs {
                    let v = query(e).await;
                    if v["data"]["result"].as_array().is_some_and(|r| !r.is_empty()) {
                        return true;
                    }
                }
                false
            }
        })
        .await;
        assert!(has_data, "panel {panel} shows no data");
    }
    let rules = try_get_json(&format!("http://127.0.0.1:{prom_port}/api/v1/rules")).await.unwrap_or(Value::Null);
    let loaded = rules["data"]["groups"][0]["rules"].as_array().map(|r| r.len()).unwrap_or(0);
    assert_eq!(loaded, rule_exprs().len(), "Prometheus loaded the rules");
    drop(prom);
}

/// Metric names (api_router_* and router_*) in PromQL text.
fn regex_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if boundary && (rest.starts_with("api_router_") || rest.starts_with("router_")) {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            out.insert(rest[..end].to_string());
            i += end;
        } else {
            i += 1;
        }
    }
    out
}
