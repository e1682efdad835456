//! The Helm chart (`deployments/helm/api-router-service`): `helm lint` with
//! the defaults and with every optional part on, and the manifests `helm
//! template` renders: probes, security context, a grace period longer than
//! the shutdown, every documented variable, the optional objects.
//! `scripts/test-deps.sh` installs helm and exports `HELM_BIN`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chart() -> PathBuf {
    root().join("deployments/helm/api-router-service")
}

/// Every optional part of the chart on.
const ALL_ON: &str = "persistence.enabled=true,autoscaling.enabled=true,serviceMonitor.enabled=true,\
    prometheusRule.enabled=true,dashboard.enabled=true,podDisruptionBudget.enabled=true,tls.secretName=router-tls";

fn helm(args: &[&str]) -> std::process::Output {
    let bin = std::env::var("HELM_BIN").unwrap_or_else(|_| "helm".into());
    Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e} (scripts/test-deps.sh installs helm and exports HELM_BIN)"))
}

fn template(set: &str) -> Vec<Value> {
    let chart = chart();
    let out = helm(&["template", "r", chart.to_str().unwrap(), "--set", set]);
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text).map(|d| Value::deserialize(d).unwrap()).filter(|v| !v.is_null()).collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} rendered"))
}

/// The variables of docs/configuration.md's environment table.
fn documented_variables() -> Vec<String> {
    let doc = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let table = doc.split("## Environment variables").nth(1).unwrap();
    let table = &table[..table.find("\n## ").unwrap_or(table.len())];
    let mut vars = Vec::new();
    for line in table.lines().filter(|l| l.starts_with("| `")) {
        let first = line.split('|').nth(1).unwrap();
        vars.extend(first.split('`').skip(1).step_by(2).map(str::to_string));
    }
    vars
}

#[test]
fn the_chart_lints_with_defaults_and_with_every_optional_part_on() {
    let chart = chart();
    for set in ["image.tag=0.1.0", ALL_ON] {
        let out = helm(&["lint", "--strict", chart.to_str().unwrap(), "--set", set]);
        assert!(
            out.status.success(),
            "helm lint --set {set}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_optional_part_renders() {
    let docs = template(ALL_ON);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for k in [
        "StatefulSet",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    // With persistence, one volume per pod from the claim template, no emptyDir.
    let sts = kind(&docs, "StatefulSet");
    assert_eq!(sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"], "data");
    let volumes = sts["spec"]["template"]["spec"]["volumes"].as_sequence().unwrap();
    assert!(!volumes.iter().any(|v| v["name"] == "data"));
    // The autoscaler owns the replica count.
    assert!(sts["spec"]["replicas"].is_null());
    // The PrometheusRule carries the same alerts as deployments/prometheus/alerts.yml.
    let rules: Value =
        serde_yaml::from_str(&std::fs::read_to_string(root().join("deployments/prometheus/alerts.yml")).unwrap())
            .unwrap();
    assert_eq!(kind(&docs, "PrometheusRule")["spec"]["groups"], rules["groups"]);
    // The dashboard ConfigMap is labelled for Grafana's sidecar.
    assert!(
        docs.iter().any(|d| d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"] == "1"),
        "no dashboard ConfigMap"
    );
    // Without persistence the workload is a Deployment with an emptyDir.
    let plain = template("persistence.enabled=false");
    let deploy = kind(&plain, "Deployment");
    assert!(deploy["spec"]["template"]["spec"]["volumes"].as_sequence().unwrap().iter().any(|v| v["name"] == "data"));
}

/// The defaults lose nothing when a pod goes: a StatefulSet with a volume
/// claim per pod, and the shared stores' connection strings from a Secret
/// (optional keys, so that a default install starts without them).
#[test]
fn the_defaults_render_a_statefulset_with_a_volume_per_pod_and_datastores_from_a_secret() {
    let docs = template("image.tag=0.1.0");
    assert!(!docs.iter().any(|d| d["kind"] == "Deployment"), "the default is not a Deployment");
    let sts = kind(&docs, "StatefulSet");
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["metadata"]["name"], "data");
    assert_eq!(claim["spec"]["accessModes"][0], "ReadWriteOnce");
    let pod = &sts["spec"]["template"]["spec"];
    assert!(!pod["volumes"].as_sequence().unwrap().iter().any(|v| v["name"] == "data"), "no emptyDir");
    let env = pod["containers"][0]["env"].as_sequence().unwrap();
    for (var, key) in [("AUDIT_DATABASE_URL", "audit-database-url"), ("REDIS_CLUSTER_URLS", "redis-cluster-urls")] {
        let e = env.iter().find(|e| e["name"] == var).unwrap_or_else(|| panic!("{var} not rendered"));
        let r = &e["valueFrom"]["secretKeyRef"];
        assert_eq!(r["name"], "api-router-datastores", "{var}");
        assert_eq!(r["key"], key, "{var}");
        assert_eq!(r["optional"], true, "{var}");
    }
    // Without the Secret's name, neither is rendered.
    let docs = template("secretRefs.datastores.name=");
    let env = kind(&docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"].clone();
    assert!(!env.as_sequence().unwrap().iter().any(|e| e["name"] == "AUDIT_DATABASE_URL"));
}

#[test]
fn probes_and_security_context_are_as_the_runbook_expects() {
    for (set, scheme) in [("image.tag=0.1.0", Value::Null), (ALL_ON, Value::from("HTTPS"))] {
        let docs = template(set);
        let workload = docs.iter().find(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet").unwrap();
        let pod = &workload["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/v1/status/healthz");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/v1/status/readyz?only=backend_registry");
        assert_eq!(c["livenessProbe"]["httpGet"]["scheme"], scheme);
        assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], scheme);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    }
}

#[test]
fn the_grace_period_is_longer_than_the_shutdown_and_a_shorter_one_is_refused() {
    let docs = template(ALL_ON);
    let pod = &kind(&docs, "StatefulSet")["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let env: BTreeMap<String, String> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string())))
        .collect();
    let shutdown: u64 = env["SHUTDOWN_TIMEOUT_SECS"].parse().unwrap();
    let pre_stop: u64 = c["lifecycle"]["preStop"]["exec"]["command"][1].as_str().unwrap().parse().unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > shutdown + pre_stop, "grace {grace} <= shutdown {shutdown} + preStop {pre_stop}");

    let chart = chart();
    let out = helm(&["template", "r", chart.to_str().unwrap(), "--set", "terminationGracePeriodSeconds=15"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be longer than SHUTDOWN_TIMEOUT_SECS"));
}

#[test]
fn every_documented_variable_is_in_the_chart() {
    let values: Value = serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap()).unwrap();
    let in_values = values["env"].as_mapping().unwrap();
    let docs = template(ALL_ON);
    let c = &kind(&docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0];
    let rendered: Vec<&str> = c["env"].as_sequence().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    let vars = documented_variables();
    assert!(vars.len() > 40, "the table was not read: {vars:?}");
    for var in &vars {
        match var.as_str() {
            // A development credential: in production keys live hashed in
            // router.yaml or etcd; a secret can still bring it (extraEnvFrom).
            "API_KEYS" => assert!(!in_values.contains_key(var.as_str()), "a credential in values.yaml"),
            // From a Secret, the pod's name and the TLS Secret.
            "ADMIN_TOKEN" => {
                let e = c["env"].as_sequence().unwrap().iter().find(|e| e["name"] == "ADMIN_TOKEN").unwrap();
                assert!(e["value"].is_null() && !e["valueFrom"]["secretKeyRef"].is_null());
            }
            // Connection strings: from the datastores Secret, never in values.
            "AUDIT_DATABASE_URL" | "REDIS_CLUSTER_URLS" => {
                assert!(!in_values.contains_key(var.as_str()), "a connection string in values.yaml");
                let e = c["env"].as_sequence().unwrap().iter().find(|e| e["name"] == var.as_str()).unwrap();
                assert!(e["value"].is_null() && !e["valueFrom"]["secretKeyRef"].is_null(), "{var}");
            }
            "INSTANCE_ID" | "TLS_CERT_FILE" | "TLS_KEY_FILE" => assert!(rendered.contains(&var.as_str()), "{var}"),
            _ => {
                let value = in_values
                    .get(var.as_str())
                    .unwrap_or_else(|| panic!("{var} is documented but not in values.yaml"))
                    .as_str()
                    .unwrap_or_else(|| panic!("{var}: values are strings"));
                // Empty: left unset, so the router's default applies.
                assert_eq!(rendered.contains(&var.as_str()), !value.is_empty(), "{var}");
            }
        }
    }
    // Nothing in values.yaml that the router does not read.
    for key in in_values.keys() {
        let key = key.as_str().unwrap();
        assert!(vars.iter().any(|v| v == key), "values.yaml sets {key}, which docs/configuration.md does not know");
    }
}
