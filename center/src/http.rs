//! The HTTP JSON front end (axum): routing, the bearer key, body limits and strict JSON parsing.
//! Every error leaves through [`Error`]'s one `IntoResponse`, as `{"error":{"code","message"}}`.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::MatchedPath;
use axum::extract::Path;
use axum::extract::Query;
use axum::extract::State;
use axum::extract::rejection::PathRejection;
use axum::extract::rejection::QueryRejection;
use axum::http::HeaderMap;
use axum::http::Request;
use axum::http::StatusCode;
use axum::http::header;
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::get;
use axum::routing::post;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::api::KickRequest;
use crate::api::PushBatchRequest;
use crate::api::PushRequest;
use crate::error::Error;
use crate::error::Result;
use crate::service::Center;
use crate::service::PushOutcome;

/// The OpenAPI document, maintained by hand beside the routes; a test checks that every route
/// is in it and every path in it is routed.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Every route, as (method, path template); the router and the OpenAPI test both read this.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/v1/dispatch"),
    ("post", "/v1/apps/{app}/push"),
    ("post", "/v1/apps/{app}/push/batch"),
    ("get", "/v1/apps/{app}/users/{user}"),
    ("post", "/v1/apps/{app}/users/{user}/kick"),
    ("get", "/v1/apps/{app}/broadcasts/{id}"),
];

#[derive(Clone)]
struct AppState {
    center: Arc<Center>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

/// The router of the HTTP API. `metrics` renders `/metrics` (503 without a recorder).
pub fn router(
    center: Arc<Center>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/dispatch", get(dispatch))
        .route("/v1/apps/{app}/push", post(push))
        .route("/v1/apps/{app}/push/batch", post(push_batch))
        .route("/v1/apps/{app}/users/{user}", get(presence))
        .route("/v1/apps/{app}/users/{user}/kick", post(kick))
        .route("/v1/apps/{app}/broadcasts/{id}", get(broadcast_status))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(observe))
        .with_state(AppState { center, metrics })
}

/// Counts requests and their latency per route and status.
async fn observe(request: Request<Body>, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let start = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("center_http_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("center_http_seconds", "route" => route)
        .record(start.elapsed().as_secs_f64());
    response
}

async fn not_found() -> Error {
    Error::NotFound("no such route; see /openapi.json".into())
}

async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed("method not allowed on this route; see /openapi.json".into())
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn render_metrics(State(state): State<AppState>) -> Result<Response> {
    let handle = state.metrics.ok_or_else(|| {
        Error::Unavailable("no metrics recorder installed in this process".into())
    })?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// The key from `Authorization: Bearer <key>`; `None` when absent or of another scheme.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

/// Reads at most `limit` bytes of body (413 naming the limit beyond) and parses it as JSON into
/// `T`, whose unknown fields are errors (400 with serde's message, which names the field).
/// An empty body parses as `{}` when `empty_ok`.
async fn strict_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    empty_ok: bool,
) -> Result<T> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Error::PayloadTooLarge { limit });
    }
    let bytes = match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Error::PayloadTooLarge { limit });
        }
        Err(e) => return Err(Error::BadRequest(format!("cannot read body: {e}"))),
    };
    let bytes: &[u8] = if empty_ok && bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    // serde would also build a struct from an array of its fields: every body is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Error::BadRequest(
            "invalid JSON body: expected a JSON object".into(),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| Error::BadRequest(format!("invalid JSON body: {e}")))
}

fn path_error(e: PathRejection) -> Error {
    Error::BadRequest(format!("bad path: {}", e.body_text()))
}

async fn push(
    State(state): State<AppState>,
    app: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let Path(app) = app.map_err(path_error)?;
    let app = state.center.authorize(&app, bearer(&headers))?;
    let limit = state.center.config().max_body_bytes;
    let request: PushRequest = strict_json(&headers, body, limit, false).await?;
    Ok(match state.center.push(&app, request).await? {
        PushOutcome::Users(r) => (StatusCode::OK, Json(r)).into_response(),
        PushOutcome::Broadcast(b) => (StatusCode::ACCEPTED, Json(b)).into_response(),
    })
}

/// Many messages, each to its own users; one token per message.
async fn push_batch(
    State(state): State<AppState>,
    app: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let Path(app) = app.map_err(path_error)?;
    let app = state.center.authenticate(&app, bearer(&headers))?;
    let limit = state.center.config().max_body_bytes;
    let request: PushBatchRequest = strict_json(&headers, body, limit, false).await?;
    Ok(Json(state.center.push_batch(&app, request).await?).into_response())
}

async fn presence(
    State(state): State<AppState>,
    path: std::result::Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response> {
    let Path((app, user)) = path.map_err(path_error)?;
    let app = state.center.authorize(&app, bearer(&headers))?;
    Ok(Json(state.center.presence(&app, &user).await?).into_response())
}

async fn kick(
    State(state): State<AppState>,
    path: std::result::Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let Path((app, user)) = path.map_err(path_error)?;
    let app = state.center.authorize(&app, bearer(&headers))?;
    let limit = state.center.config().max_body_bytes;
    let request: KickRequest = strict_json(&headers, body, limit, true).await?;
    Ok(Json(state.center.kick(&app, &user, request.reason).await?).into_response())
}

async fn broadcast_status(
    State(state): State<AppState>,
    path: std::result::Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response> {
    let Path((app, id)) = path.map_err(path_error)?;
    let app = state.center.authorize(&app, bearer(&headers))?;
    Ok(Json(state.center.broadcast_status(&app, &id)?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DispatchQuery {
    app: String,
    user: String,
}

async fn dispatch(
    State(state): State<AppState>,
    query: std::result::Result<Query<DispatchQuery>, QueryRejection>,
) -> Result<Response> {
    let Query(q) = query.map_err(|e| Error::BadRequest(format!("bad query: {}", e.body_text())))?;
    Ok(Json(state.center.dispatch(&q.app, &q.user)?).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer k1".parse().unwrap());
        assert_eq!(bearer(&h), Some("k1"));
        h.insert(header::AUTHORIZATION, "bearer  k2 ".parse().unwrap());
        assert_eq!(bearer(&h), Some("k2"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn openapi_lists_every_route_and_only_those() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        let paths = doc["paths"].as_object().expect("paths");
        for (method, path) in ROUTES {
            assert!(
                paths.get(*path).and_then(|p| p.get(*method)).is_some(),
                "{method} {path} missing from openapi.json"
            );
        }
        for (path, ops) in paths {
            for method in ops.as_object().unwrap().keys() {
                if method == "parameters" {
                    continue;
                }
                assert!(
                    ROUTES.iter().any(|(m, p)| m == method && p == path),
                    "openapi.json documents {method} {path}, which is not routed"
                );
            }
        }
    }
}
