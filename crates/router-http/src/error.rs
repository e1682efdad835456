//! Every error a client can get, and the one place each becomes an HTTP
//! response: its status, its `code`, and its body in the door's shape
//! (native `{"error": {"code", "message"}}`, or OpenAI's). The core's
//! mechanisms define their own errors ([`RequestError`], [`LimitError`],
//! [`RecordError`], [`UpdateError`], [`AuthError`]); only this module knows
//! their statuses.

use std::time::SystemTime;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use router_core::auth::{AdminAuthError, AuthError};
use router_core::config_service::UpdateError;
use router_core::limits::LimitError;
use router_core::limits::gcra::RateInfo;
use router_core::pipeline::RequestError;
use router_core::usage::RecordError;
use router_providers::translate::chat;
use router_providers::transport::AttemptError;
use serde_json::json;

#[derive(Debug)]
pub enum ApiError {
    /// No API key on the request.
    MissingApiKey,
    /// An API key that matches no organization (or a revoked one).
    InvalidApiKey,
    /// A managed API key past its expiry.
    KeyExpired,
    PayloadTooLarge {
        limit: usize,
    },
    /// The body did not arrive within `HTTP_BODY_READ_TIMEOUT_MS`.
    RequestTimeout {
        after: std::time::Duration,
    },
    /// The body is not JSON.
    InvalidJson(String),
    /// JSON, but not a valid request (missing `model`, bad `request_id`, ...).
    InvalidRequest(String),
    /// The admin API is off because `ADMIN_TOKEN` is not set.
    AdminDisabled,
    /// Missing or wrong admin token.
    AdminUnauthorized,
    NotFound(String),
    /// Someone else changed the thing first; nothing was written.
    Conflict(String),
    /// etcd could not take (or this replica could not apply) an admin write.
    ConfigServiceUnavailable(String),
    /// The audit store cannot answer a lookup now (PostgreSQL unreachable,
    /// or this replica's records still on their way): not a 404.
    AuditStoreUnavailable(String),
    /// The pipeline's errors: routing, backends, limits, usage.
    Request(RequestError),
    Internal(String),
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        ApiError::Request(e)
    }
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        ApiError::Request(RequestError::Limits(e))
    }
}

impl From<RecordError> for ApiError {
    fn from(e: RecordError) -> Self {
        ApiError::Request(RequestError::Usage(e))
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::MissingKey => ApiError::MissingApiKey,
            AuthError::InvalidKey => ApiError::InvalidApiKey,
            AuthError::KeyExpired => ApiError::KeyExpired,
        }
    }
}

impl From<AdminAuthError> for ApiError {
    fn from(e: AdminAuthError) -> Self {
        match e {
            AdminAuthError::Disabled => ApiError::AdminDisabled,
            AdminAuthError::Unauthorized => ApiError::AdminUnauthorized,
        }
    }
}

impl From<UpdateError> for ApiError {
    fn from(e: UpdateError) -> Self {
        match e {
            UpdateError::Invalid(m) => ApiError::InvalidRequest(m),
            UpdateError::NotFound(m) => ApiError::NotFound(m),
            UpdateError::Unavailable(m) => ApiError::ConfigServiceUnavailable(m),
            UpdateError::Conflict(m) => ApiError::Conflict(m),
            UpdateError::Internal(m) => ApiError::Internal(m),
        }
    }
}

/// The status of a pipeline error; the core records it in usage and audit
/// records (`Core::status_of`).
pub fn status_of(e: &RequestError) -> u16 {
    request_status(e).as_u16()
}

fn request_status(e: &RequestError) -> StatusCode {
    match e {
        RequestError::ModelNotFound(_) => StatusCode::NOT_FOUND,
        RequestError::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
        RequestError::NoHealthyBackend => StatusCode::SERVICE_UNAVAILABLE,
        RequestError::BackendsFailed { last: AttemptError::Timeout, .. } => StatusCode::GATEWAY_TIMEOUT,
        RequestError::BackendsFailed { .. } => StatusCode::BAD_GATEWAY,
        RequestError::Limits(LimitError::RateLimited { .. }) => StatusCode::TOO_MANY_REQUESTS,
        RequestError::Limits(LimitError::BudgetExceeded { .. } | LimitError::QuotaExceeded { .. }) => {
            StatusCode::PAYMENT_REQUIRED
        }
        RequestError::Limits(LimitError::LimiterUnavailable | LimitError::BudgetServiceUnavailable)
        | RequestError::Usage(_)
        | RequestError::Audit(_) => StatusCode::SERVICE_UNAVAILABLE,
        RequestError::Untranslatable(_) => StatusCode::BAD_REQUEST,
        RequestError::CoolingDown { status, .. } => {
            StatusCode::from_u16(*status).unwrap_or(StatusCode::TOO_MANY_REQUESTS)
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MissingApiKey | ApiError::InvalidApiKey | ApiError::KeyExpired | ApiError::AdminUnauthorized => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::InvalidJson(_) | ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::ConfigServiceUnavailable(_) | ApiError::AuditStoreUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::AdminDisabled => StatusCode::FORBIDDEN,
            ApiError::Request(e) => request_status(e),
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MissingApiKey | ApiError::InvalidApiKey | ApiError::AdminUnauthorized => "unauthorized",
            ApiError::KeyExpired => "key_expired",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::RequestTimeout { .. } => "request_timeout",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::AdminDisabled => "admin_disabled",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::ConfigServiceUnavailable(_) => "config_service_unavailable",
            ApiError::AuditStoreUnavailable(_) => "audit_store_unavailable",
            ApiError::Internal(_) => "internal_error",
            ApiError::Request(e) => match e {
                RequestError::ModelNotFound(_) => "model_not_found",
                RequestError::ModelNotAllowed(_) => "model_not_allowed",
                RequestError::NoHealthyBackend => "no_healthy_backend",
                RequestError::BackendsFailed { last: AttemptError::Timeout, .. } => "backend_timeout",
                RequestError::BackendsFailed { .. } => "backend_unavailable",
                RequestError::Limits(l) => match l {
                    LimitError::RateLimited { .. } => "rate_limited",
                    LimitError::BudgetExceeded { .. } => "budget_exceeded",
                    LimitError::QuotaExceeded { .. } => "quota_exceeded",
                    LimitError::LimiterUnavailable => "rate_limiter_unavailable",
                    LimitError::BudgetServiceUnavailable => "budget_service_unavailable",
                },
                RequestError::Usage(RecordError::BufferFull) => "usage_buffer_full",
                RequestError::Usage(RecordError::Unavailable(_)) => "usage_buffer_unavailable",
                RequestError::Audit(_) => "audit_unavailable",
                RequestError::Untranslatable(_) => "unsupported_parameter",
                RequestError::CoolingDown { .. } => "upstream_rate_limited",
            },
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::MissingApiKey => "missing API key: send it in the X-API-Key header".into(),
            ApiError::InvalidApiKey => "invalid API key".into(),
            ApiError::KeyExpired => "this API key has expired".into(),
            ApiError::PayloadTooLarge { limit } => {
                format!("request body is larger than the limit of {limit} bytes")
            }
            ApiError::RequestTimeout { after } => {
                format!("the request body did not arrive within {} ms", after.as_millis())
            }
            ApiError::InvalidJson(e) => format!("request body is not valid JSON: {e}"),
            ApiError::InvalidRequest(e) | ApiError::NotFound(e) | ApiError::Conflict(e) => e.clone(),
            ApiError::AdminDisabled => "the admin API is disabled: ADMIN_TOKEN is not set".into(),
            ApiError::AdminUnauthorized => {
                "missing or invalid admin token: send Authorization: Bearer <ADMIN_TOKEN>".into()
            }
            ApiError::ConfigServiceUnavailable(e) => format!("the config service (etcd) is unavailable: {e}"),
            ApiError::AuditStoreUnavailable(e) => {
                format!("the audit store cannot answer now ({e}); the record is not lost, retry the lookup")
            }
            ApiError::Request(e) => e.to_string(),
            ApiError::Internal(_) => "internal error".into(),
        }
    }

    /// `Retry-After`, and the rate limit for the `RateLimit-*` headers.
    fn retry_after(&self) -> Option<(u64, Option<&RateInfo>)> {
        match self {
            ApiError::Request(RequestError::Limits(LimitError::RateLimited { info, retry_after_secs, .. })) => {
                Some((*retry_after_secs, Some(info)))
            }
            ApiError::Request(RequestError::CoolingDown { retry_after_secs, .. }) => Some((*retry_after_secs, None)),
            _ => None,
        }
    }

    /// The headers every shape carries: `Retry-After` (and `RateLimit-*` on
    /// our own 429), `X-Request-Id` when the request has one.
    fn finish(&self, mut response: Response, request_id: Option<&str>) -> Response {
        if let Some((retry_after, info)) = self.retry_after() {
            let h = response.headers_mut();
            h.insert("retry-after", HeaderValue::from(retry_after));
            if let Some(info) = info {
                rate_limit_headers(h, info);
            }
        }
        if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
            response.headers_mut().insert("x-request-id", id);
        }
        // The rest of the body may still be on its way: start afresh.
        if matches!(self, ApiError::PayloadTooLarge { .. } | ApiError::RequestTimeout { .. }) {
            response.headers_mut().insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// The native shape: `{"error": {"code", "message", ...details}}`.
    pub fn native(self, request_id: Option<&str>) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "internal error");
        }
        let mut error = json!({"code": self.code(), "message": self.message()});
        let time = |t: &Option<SystemTime>| t.map(router_core::util::rfc3339);
        match &self {
            ApiError::Request(RequestError::Limits(LimitError::BudgetExceeded {
                limit,
                remaining,
                reset_at,
                scope,
            })) => {
                error["scope"] = json!(scope.as_str());
                error["limit"] = json!(limit);
                error["remaining"] = json!(remaining);
                error["reset_at"] = json!(time(reset_at));
            }
            ApiError::Request(RequestError::Limits(LimitError::QuotaExceeded { kind, limit, remaining, reset_at })) => {
                error["quota"] = json!(kind);
                error["limit"] = json!(limit);
                error["remaining"] = json!(remaining);
                error["reset_at"] = json!(time(reset_at));
            }
            ApiError::Request(
                RequestError::Limits(LimitError::RateLimited { retry_after_secs, .. })
                | RequestError::CoolingDown { retry_after_secs, .. },
            ) => error["retry_after"] = json!(retry_after_secs),
            _ => {}
        }
        let response = (self.status(), axum::Json(json!({ "error": error }))).into_response();
        self.finish(response, request_id)
    }

    /// The OpenAI error shape, `{"error": {"message", "type", "param", "code"}}`,
    /// with the same status codes, so that SDKs raise their usual exceptions.
    pub fn openai(self, request_id: Option<&str>) -> Response {
        let status = self.status();
        let body = chat::openai_error(status.as_u16(), &self.message(), Some(self.code()));
        let response = (status, axum::Json(body)).into_response();
        self.finish(response, request_id)
    }

    /// Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`,
    /// with the same status codes (the SDK raises its usual exceptions), and
    /// the request id in the body as Anthropic puts it.
    pub fn anthropic(self, request_id: Option<&str>) -> Response {
        let status = self.status();
        let mut body = chat::anthropic_error(status.as_u16(), &self.message());
        if let Some(id) = request_id {
            body["request_id"] = json!(id);
        }
        let response = (status, axum::Json(body)).into_response();
        self.finish(response, request_id)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.native(None)
    }
}

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`. (Names
/// as constants: on every answer with a rate limit, a name given as a `&str`
/// was parsed and checked each time.)
pub fn rate_limit_headers(h: &mut HeaderMap, info: &RateInfo) {
    h.insert(RATELIMIT_LIMIT, HeaderValue::from(info.limit));
    h.insert(RATELIMIT_REMAINING, HeaderValue::from(info.remaining));
    h.insert(RATELIMIT_RESET, HeaderValue::from(info.reset_secs));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mechanism_error_has_its_status_and_code() {
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (RequestError::ModelNotFound("m".into()).into(), 404, "model_not_found"),
            (RequestError::NoHealthyBackend.into(), 503, "no_healthy_backend"),
            (RequestError::BackendsFailed { attempts: 2, last: AttemptError::Timeout }.into(), 504, "backend_timeout"),
            (
                RequestError::BackendsFailed { attempts: 1, last: AttemptError::Tls("certificate expired".into()) }
                    .into(),
                502,
                "backend_unavailable",
            ),
            (LimitError::LimiterUnavailable.into(), 503, "rate_limiter_unavailable"),
            (RecordError::BufferFull.into(), 503, "usage_buffer_full"),
            (UpdateError::Unavailable("down".into()).into(), 503, "config_service_unavailable"),
            (ApiError::AuditStoreUnavailable("down".into()), 503, "audit_store_unavailable"),
            (UpdateError::NotFound("x".into()).into(), 404, "not_found"),
            (AuthError::InvalidKey.into(), 401, "unauthorized"),
            (AdminAuthError::Disabled.into(), 403, "admin_disabled"),
            (RequestError::Untranslatable("`n`".into()).into(), 400, "unsupported_parameter"),
            (RequestError::CoolingDown { status: 429, retry_after_secs: 3 }.into(), 429, "upstream_rate_limited"),
            (AuthError::KeyExpired.into(), 401, "key_expired"),
            (RequestError::ModelNotAllowed("m".into()).into(), 403, "model_not_allowed"),
        ];
        for (e, status, code) in cases {
            assert_eq!((e.status().as_u16(), e.code()), (status, code), "{e:?}");
        }
    }
}
