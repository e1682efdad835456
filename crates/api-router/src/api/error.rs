//! Every error a client can get, and the one place it becomes an HTTP response:
//! `{"error": {"code": "...", "message": "..."}}` with its status code.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use std::time::SystemTime;

use crate::backends::client::AttemptError;
use crate::limits::gcra::RateInfo;

#[derive(Debug)]
pub enum ApiError {
    /// No API key on the request.
    MissingApiKey,
    /// An API key that matches no organization.
    InvalidApiKey,
    PayloadTooLarge {
        limit: usize,
    },
    /// The body is not JSON.
    InvalidJson(String),
    /// JSON, but not a valid request (missing `model`, bad `request_id`, ...).
    InvalidRequest(String),
    /// No policy for the model, and no default route.
    ModelNotFound(String),
    /// The policy has no backend that is healthy and not degraded.
    NoHealthyBackend,
    /// Every candidate failed; carries the last failure.
    BackendsFailed {
        attempts: usize,
        last: AttemptError,
    },
    /// The admin API is off because `ADMIN_TOKEN` is not set.
    AdminDisabled,
    /// Missing or wrong admin token.
    AdminUnauthorized,
    NotFound(String),
    /// Over the organization's rate limit.
    RateLimited {
        info: RateInfo,
        retry_after_secs: u64,
    },
    /// The reservation would exceed the organization's budget.
    BudgetExceeded {
        limit: f64,
        remaining: f64,
        reset_at: Option<SystemTime>,
    },
    /// The reservation would exceed a quota (`kind`: requests or tokens).
    QuotaExceeded {
        kind: &'static str,
        limit: u64,
        remaining: u64,
        reset_at: Option<SystemTime>,
    },
    /// Redis is down and `RATE_LIMIT_FAILURE_MODE=closed`.
    LimiterUnavailable,
    /// The budget service is unreachable and `BUDGET_SERVICE_FAILURE_MODE=closed`.
    BudgetServiceUnavailable,
    /// etcd could not take (or this replica could not apply) an admin write.
    ConfigServiceUnavailable(String),
    /// The usage buffer is at its cap (`USAGE_BUFFER_FULL_POLICY=reject`).
    UsageBufferFull,
    /// The usage record could not be written ahead, so the answer is withheld.
    UsageBufferUnavailable(String),
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MissingApiKey | ApiError::InvalidApiKey | ApiError::AdminUnauthorized => StatusCode::UNAUTHORIZED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::InvalidJson(_) | ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::NoHealthyBackend
            | ApiError::LimiterUnavailable
            | ApiError::BudgetServiceUnavailable
            | ApiError::UsageBufferFull
            | ApiError::ConfigServiceUnavailable(_)
            | ApiError::UsageBufferUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BudgetExceeded { .. } | ApiError::QuotaExceeded { .. } => StatusCode::PAYMENT_REQUIRED,
            ApiError::BackendsFailed { last: AttemptError::Timeout, .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::BackendsFailed { .. } => StatusCode::BAD_GATEWAY,
            ApiError::AdminDisabled => StatusCode::FORBIDDEN,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MissingApiKey | ApiError::InvalidApiKey | ApiError::AdminUnauthorized => "unauthorized",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::NoHealthyBackend => "no_healthy_backend",
            ApiError::BackendsFailed { last: AttemptError::Timeout, .. } => "backend_timeout",
            ApiError::BackendsFailed { .. } => "backend_unavailable",
            ApiError::AdminDisabled => "admin_disabled",
            ApiError::NotFound(_) => "not_found",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::BudgetExceeded { .. } => "budget_exceeded",
            ApiError::QuotaExceeded { .. } => "quota_exceeded",
            ApiError::LimiterUnavailable => "rate_limiter_unavailable",
            ApiError::BudgetServiceUnavailable => "budget_service_unavailable",
            ApiError::UsageBufferFull => "usage_buffer_full",
            ApiError::ConfigServiceUnavailable(_) => "config_service_unavailable",
            ApiError::UsageBufferUnavailable(_) => "usage_buffer_unavailable",
            ApiError::Internal(_) => "internal_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::MissingApiKey => "missing API key: send it in the X-API-Key header".into(),
            ApiError::InvalidApiKey => "invalid API key".into(),
            ApiError::PayloadTooLarge { limit } => {
                format!("request body is larger than the limit of {limit} bytes")
            }
            ApiError::InvalidJson(e) => format!("request body is not valid JSON: {e}"),
            ApiError::InvalidRequest(e) => e.clone(),
            ApiError::ModelNotFound(m) => format!("no routing policy for model {m:?}"),
            ApiError::NoHealthyBackend => "no healthy backend is available for this model".into(),
            ApiError::BackendsFailed { attempts, last } => {
                format!("all {attempts} candidate backend(s) failed; last error: {last}")
            }
            ApiError::AdminDisabled => "the admin API is disabled: ADMIN_TOKEN is not set".into(),
            ApiError::AdminUnauthorized => {
                "missing or invalid admin token: send Authorization: Bearer <ADMIN_TOKEN>".into()
            }
            ApiError::NotFound(what) => what.clone(),
            ApiError::RateLimited { retry_after_secs, .. } => {
                format!("rate limit exceeded for this organization; retry after {retry_after_secs} s")
            }
            ApiError::BudgetExceeded { limit, remaining, .. } => {
                format!("budget exceeded: {remaining} of {limit} remaining in this period")
            }
            ApiError::QuotaExceeded { kind, limit, remaining, .. } => {
                format!("{kind} quota exceeded: {remaining} of {limit} remaining in this period")
            }
            ApiError::LimiterUnavailable => {
                "rate limiting is unavailable (Redis is down and RATE_LIMIT_FAILURE_MODE=closed)".into()
            }
            ApiError::BudgetServiceUnavailable => {
                "the budget service is unavailable (BUDGET_SERVICE_FAILURE_MODE=closed)".into()
            }
            ApiError::ConfigServiceUnavailable(e) => format!("the config service (etcd) is unavailable: {e}"),
            ApiError::UsageBufferFull => "the usage buffer is full (Kafka has been unreachable); retry later".into(),
            ApiError::UsageBufferUnavailable(e) => {
                format!("the usage record could not be stored ({e}); the request was not recorded, retry it")
            }
            ApiError::Internal(_) => "internal error".into(),
        }
    }

    /// The response, with `X-Request-Id` when the request has one.
    pub fn into_response_with_id(self, request_id: Option<&str>) -> Response {
        let mut response = self.into_response();
        if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
            response.headers_mut().insert("x-request-id", id);
        }
        response
    }
}

impl ApiError {
    /// The OpenAI error shape, `{"error": {"message", "type", "param", "code"}}`,
    /// with the same status codes, so that SDKs raise their usual exceptions.
    pub fn into_openai_response(self, request_id: Option<&str>) -> Response {
        let kind = match self.status().as_u16() {
            401 => "authentication_error",
            402 => "insufficient_quota",
            403 => "permission_error",
            404 | 400 | 413 => "invalid_request_error",
            429 => "rate_limit_error",
            _ => "server_error",
        };
        let body = json!({"error": {"message": self.message(), "type": kind, "param": null, "code": self.code()}});
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let ApiError::RateLimited { info, retry_after_secs } = &self {
            response.headers_mut().insert("retry-after", HeaderValue::from(*retry_after_secs));
            rate_limit_headers(response.headers_mut(), info);
        }
        if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
            response.headers_mut().insert("x-request-id", id);
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "internal error");
        }
        let mut error = json!({"code": self.code(), "message": self.message()});
        let time = |t: &Option<SystemTime>| t.map(crate::telemetry::rfc3339);
        match &self {
            ApiError::BudgetExceeded { limit, remaining, reset_at } => {
                error["limit"] = json!(limit);
                error["remaining"] = json!(remaining);
                error["reset_at"] = json!(time(reset_at));
            }
            ApiError::QuotaExceeded { kind, limit, remaining, reset_at } => {
                error["quota"] = json!(kind);
                error["limit"] = json!(limit);
                error["remaining"] = json!(remaining);
                error["reset_at"] = json!(time(reset_at));
            }
            ApiError::RateLimited { retry_after_secs, .. } => error["retry_after"] = json!(retry_after_secs),
            _ => {}
        }
        let mut response = (self.status(), axum::Json(json!({ "error": error }))).into_response();
        if let ApiError::RateLimited { info, retry_after_secs } = &self {
            let h = response.headers_mut();
            h.insert("retry-after", HeaderValue::from(*retry_after_secs));
            rate_limit_headers(h, info);
        }
        response
    }
}

/// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`.
pub fn rate_limit_headers(h: &mut axum::http::HeaderMap, info: &RateInfo) {
    h.insert("ratelimit-limit", HeaderValue::from(info.limit));
    h.insert("ratelimit-remaining", HeaderValue::from(info.remaining));
    h.insert("ratelimit-reset", HeaderValue::from(info.reset_secs));
}
