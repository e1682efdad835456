//! What readiness reports on: one [`Component`] per dependency, each healthy,
//! unhealthy or not configured. The door turns the list into
//! `GET /v1/status/readyz`; the metrics endpoint into
//! `api_router_component_health`.

use std::sync::Arc;

use crate::config_service::ConfigStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentStatus {
    Healthy,
    Unhealthy,
    NotConfigured,
}

impl ComponentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentStatus::Healthy => "healthy",
            ComponentStatus::Unhealthy => "unhealthy",
            ComponentStatus::NotConfigured => "not_configured",
        }
    }

    /// The `api_router_component_health` gauge value.
    pub fn gauge(self) -> i64 {
        match self {
            ComponentStatus::Healthy => 1,
            ComponentStatus::Unhealthy => 0,
            ComponentStatus::NotConfigured => -1,
        }
    }
}

/// A dependency that readiness reports on.
pub trait Component: Send + Sync {
    fn name(&self) -> &'static str;
    fn status(&self) -> ComponentStatus;
}

/// A dependency that knows whether it is reachable.
pub trait Healthy: Send + Sync {
    fn is_healthy(&self) -> bool;
}

/// An optional dependency (`redis`, `kafka`, `config_service`): not
/// configured without one, else healthy or unhealthy as it reports.
pub struct Optional<T: ?Sized>(pub &'static str, pub Option<Arc<T>>);

impl<T: Healthy + ?Sized> Component for Optional<T> {
    fn name(&self) -> &'static str {
        self.0
    }
    fn status(&self) -> ComponentStatus {
        match &self.1 {
            None => ComponentStatus::NotConfigured,
            Some(d) if d.is_healthy() => ComponentStatus::Healthy,
            Some(_) => ComponentStatus::Unhealthy,
        }
    }
}

/// `backend_registry`: unhealthy with no backends, or none routable.
pub struct BackendRegistry(pub Arc<ConfigStore>);

impl Component for BackendRegistry {
    fn name(&self) -> &'static str {
        "backend_registry"
    }
    fn status(&self) -> ComponentStatus {
        if self.0.load().any_routable() { ComponentStatus::Healthy } else { ComponentStatus::Unhealthy }
    }
}

/// Ready unless some component is unhealthy; `not_configured` is acceptable.
pub fn is_ready(statuses: &[(&'static str, ComponentStatus)]) -> bool {
    statuses.iter().all(|(_, s)| *s != ComponentStatus::Unhealthy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_is_a_function_of_component_statuses() {
        use ComponentStatus::*;
        assert!(is_ready(&[("redis", NotConfigured), ("backend_registry", Healthy)]));
        assert!(!is_ready(&[("redis", Unhealthy), ("backend_registry", Healthy)]));
        assert!(!is_ready(&[("backend_registry", Unhealthy)]));
        assert!(is_ready(&[]));
    }
}
