//! Backend selection and the full routing decision with 10,000 policies
//! loaded. Target: under 1 µs per decision. `make bench` runs this.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use router_core::config_service::{BackendSpec, ConfigState, ConfigStore, test_store};
use router_core::routing::policy::{Policy, PolicyBackend};
use router_core::routing::selector;
use router_providers::Operation;

const BACKENDS: usize = 8;
const POLICIES: usize = 10_000;

fn store() -> ConfigStore {
    let mut state = ConfigState { default_route: true, default_failover_threshold: 3, ..Default::default() };
    for i in 0..BACKENDS {
        let spec = BackendSpec::new(&format!("http://127.0.0.1:{}", 9000 + i)).unwrap_or_else(|e| panic!("{e}"));
        state.backends.insert(format!("backend-{i}"), spec);
    }
    for p in 0..POLICIES {
        let (org, model) = (format!("org-{}", p / 10), format!("model-{}", p % 10));
        let backends = (0..3)
            .map(|k| PolicyBackend { backend_id: format!("backend-{}", (p + k) % BACKENDS), weight: [60, 30, 0][k] })
            .collect();
        state.policies.insert(
            (org.clone(), model.clone()),
            Policy {
                policy_id: format!("p-{p}"),
                organization_id: org,
                model,
                backends,
                failover_threshold: 3,
                fallback_models: vec![],
            },
        );
    }
    test_store(state)
}

fn bench(c: &mut Criterion) {
    let store = store();
    let mut rng = fastrand::Rng::with_seed(42);
    let snapshot = store.load_full();
    let policy = snapshot.route("org-500", "model-3").cloned().unwrap_or_else(|| panic!("policy missing"));

    c.bench_function("select_candidates/3_backends", |b| {
        b.iter(|| black_box(selector::candidates(black_box(&policy), Operation::Native, &mut rng)))
    });

    let orgs: Vec<String> = (0..1000).map(|i| format!("org-{i}")).collect();
    let models: Vec<String> = (0..10).map(|i| format!("model-{i}")).collect();
    let mut i = 0usize;
    c.bench_function("routing_decision/10k_policies", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919);
            let (org, model) = (&orgs[i % orgs.len()], &models[i % models.len()]);
            // What the request path does: load the snapshot, look up the
            // policy (or default route), order the candidates.
            let policy = store.load().route(org, model).cloned();
            black_box(policy.map(|p| selector::candidates(&p, Operation::Native, &mut rng)))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
