//! center's errors, and their one mapping to HTTP responses (`{"error":{"code","message"}}`)
//! and to gRPC statuses.

use std::time::Duration;

use axum::http::HeaderValue;
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use axum::response::Response;

/// Everything that can go wrong in center, from a bad request to a port already taken.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or breaks a documented limit; the message says which.
    #[error("{0}")]
    BadRequest(String),
    /// No API key, or a key no app knows.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid key of another app.
    #[error("{0}")]
    Forbidden(String),
    /// Unknown app, broadcast or route.
    #[error("{0}")]
    NotFound(String),
    /// The route exists, the method does not.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The body is larger than `max_body_bytes`.
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The app's token bucket is empty.
    #[error(
        "rate limit of app {app:?} exceeded ({per_second}/s, burst {burst}); retry after {retry_after:?}"
    )]
    RateLimited {
        app: String,
        per_second: u32,
        burst: u32,
        retry_after: Duration,
    },
    /// A dependency (keeper, register, room) cannot serve the request now; retrying may help.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected answer from a dependency.
    #[error("{0}")]
    Internal(String),
    /// Startup: a listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// Startup: the configuration is invalid.
    #[error("invalid config: {0}")]
    Config(String),
    /// The keeper could not be reached or refused a request.
    #[error("keeper: {0}")]
    Keeper(String),
}

/// center's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The stable machine-readable code of the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::NotFound(_) => "not_found",
            Error::MethodNotAllowed(_) => "method_not_allowed",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::RateLimited { .. } => "rate_limited",
            Error::Unavailable(_) | Error::Keeper(_) => "unavailable",
            Error::Internal(_) | Error::Bind { .. } | Error::Config(_) => "internal",
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Unavailable(_) | Error::Keeper(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) | Error::Bind { .. } | Error::Config(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        metrics::counter!("center_http_errors_total", "code" => self.code()).increment(1);
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        });
        let mut response = (status, axum::Json(body)).into_response();
        if let Error::RateLimited { retry_after, .. } = &self {
            // Whole seconds, rounded up: a client that waits this long finds a token.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::BadRequest(_) | Error::PayloadTooLarge { .. } => {
                tonic::Status::invalid_argument(message)
            }
            Error::Unauthorized(_) => tonic::Status::unauthenticated(message),
            Error::Forbidden(_) => tonic::Status::permission_denied(message),
            Error::NotFound(_) => tonic::Status::not_found(message),
            Error::MethodNotAllowed(_) => tonic::Status::unimplemented(message),
            Error::RateLimited { .. } => tonic::Status::resource_exhausted(message),
            Error::Unavailable(_) | Error::Keeper(_) => tonic::Status::unavailable(message),
            Error::Internal(_) | Error::Bind { .. } | Error::Config(_) => {
                tonic::Status::internal(message)
            }
        }
    }
}
