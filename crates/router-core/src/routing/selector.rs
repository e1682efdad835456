//! Weighted selection with failover order.
//!
//! Given a resolved policy, [`candidates`] returns the order in which to try its
//! backends: a weighted random pick first, then the remaining weighted backends
//! drawn by weight without replacement, then the standbys (weight 0) in listed
//! order. Backends that are degraded or unhealthy are left out, and no backend
//! appears twice, so a request never tries the same backend twice.

use std::sync::Arc;

use router_providers::Operation;

use crate::config_service::{Backend, RoutePolicy};

/// Small enough to stay on the stack for typical policies.
pub type Candidates = Vec<(Arc<Backend>, u32)>;

/// Only backends that can serve `op` (in their own shape or through a
/// translation) are candidates; backends cooling down are left out too.
pub fn candidates(policy: &RoutePolicy, op: Operation, rng: &mut fastrand::Rng) -> Candidates {
    let mut out: Candidates = Vec::with_capacity(policy.members.len());
    let mut total: u64 = 0;
    for (backend, weight) in &policy.members {
        if *weight > 0 && backend.can_serve(op) && backend.is_routable() {
            total += u64::from(*weight);
            out.push((backend.clone(), *weight));
        }
    }
    // Order the weighted part in place: position i gets a weighted draw from
    // the entries not yet placed.
    let weighted = out.len();
    for i in 0..weighted {
        if total == 0 {
            break;
        }
        let mut r = rng.u64(0..total);
        let mut pick = i;
        for (j, (_, w)) in out.iter().enumerate().skip(i) {
            let w = u64::from(*w);
            if r < w {
                pick = j;
                break;
            }
            r -= w;
        }
        out.swap(i, pick);
        total -= u64::from(out[i].1);
    }
    for (backend, weight) in &policy.members {
        if *weight == 0 && backend.can_serve(op) && backend.is_routable() {
            out.push((backend.clone(), 0));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_service::{BackendSpec, ConfigState, ConfigStore, Override};
    use crate::routing::policy::{Policy, PolicyBackend};
    use std::collections::HashMap;
    use std::time::SystemTime;

    fn store(weights: &[(&str, u32)]) -> ConfigStore {
        let mut s = ConfigState { default_route: false, default_failover_threshold: 3, ..Default::default() };
        for (i, (id, _)) in weights.iter().enumerate() {
            s.backends.insert(id.to_string(), BackendSpec::new(&format!("http://127.0.0.1:{}", 9000 + i)).unwrap());
        }
        s.policies.insert(
            ("org".into(), "m".into()),
            Policy {
                policy_id: "p".into(),
                organization_id: "org".into(),
                model: "m".into(),
                backends: weights
                    .iter()
                    .map(|(id, w)| PolicyBackend { backend_id: id.to_string(), weight: *w })
                    .collect(),
                failover_threshold: 3,
                fallback_models: vec![],
            },
        );
        crate::config_service::test_store(s)
    }

    fn ids(c: &Candidates) -> Vec<&str> {
        c.iter().map(|(b, _)| &*b.id).collect()
    }

    #[test]
    fn split_follows_weights() {
        let store = store(&[("a", 80), ("b", 20)]);
        let snap = store.load();
        let policy = snap.route("org", "m").unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut first: HashMap<String, u32> = HashMap::new();
        for _ in 0..10_000 {
            let c = candidates(policy, Operation::Native, &mut rng);
            assert_eq!(c.len(), 2, "every backend once");
            *first.entry(c[0].0.id.to_string()).or_default() += 1;
        }
        let a = first["a"] as f64 / 10_000.0;
        assert!((a - 0.8).abs() < 0.02, "a got {a}");
    }

    #[test]
    fn the_failover_order_is_drawn_by_weight_without_replacement() {
        // Equal weights: every order of three equally likely, so each
        // position (the failover ones too) is a fair draw from what is left.
        let three = store(&[("a", 1), ("b", 1), ("c", 1)]);
        let snap = three.load();
        let policy = snap.route("org", "m").unwrap();
        let mut rng = fastrand::Rng::with_seed(11);
        let mut orders: HashMap<Vec<String>, u32> = HashMap::new();
        for _ in 0..6_000 {
            let c = candidates(policy, Operation::Native, &mut rng);
            *orders.entry(ids(&c).iter().map(|s| s.to_string()).collect()).or_default() += 1;
        }
        assert_eq!(orders.len(), 6, "{orders:?}");
        for (order, n) in &orders {
            let share = f64::from(*n) / 6_000.0;
            assert!((share - 1.0 / 6.0).abs() < 0.03, "{order:?}: {share}");
        }
        // Two of weight 1: each first half the time (an off-by-one in the
        // draw would always pick the first).
        let two = store(&[("a", 1), ("b", 1)]);
        let snap = two.load();
        let policy = snap.route("org", "m").unwrap();
        let a_first = (0..2_000).filter(|_| &*candidates(policy, Operation::Native, &mut rng)[0].0.id == "a").count();
        assert!((900..=1100).contains(&a_first), "{a_first}");
    }

    #[test]
    fn standby_comes_last_and_unroutable_backends_are_skipped() {
        let store = store(&[("standby", 0), ("a", 1), ("b", 1)]);
        let mut rng = fastrand::Rng::with_seed(1);
        let snap = store.load_full();
        let c = candidates(snap.route("org", "m").unwrap(), Operation::Native, &mut rng);
        assert_eq!(c.last().unwrap().0.id.as_ref(), "standby");
        assert_eq!(c.len(), 3);

        snap.backend("a").unwrap().runtime.health.record_failure(1, "down");
        store
            .update(|s| {
                s.overrides
                    .insert("b".into(), Override { reason: "r".into(), since: SystemTime::now(), by: "t".into() });
                Ok::<_, ()>(())
            })
            .unwrap();
        let snap = store.load_full();
        let c = candidates(snap.route("org", "m").unwrap(), Operation::Native, &mut rng);
        assert_eq!(ids(&c), vec!["standby"]);
        snap.backend("standby").unwrap().runtime.health.record_failure(1, "down");
        assert!(candidates(snap.route("org", "m").unwrap(), Operation::Native, &mut rng).is_empty());
    }
}
