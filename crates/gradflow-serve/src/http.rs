//! The HTTP adapter: the TensorFlow Serving REST shape over a [`Server`], and `/metrics`.
//!
//! - `POST /v1/models/<job>:predict` with `{"instances": [{"column": value, ...}, ...]}`
//!   answers `{"predictions": [p, ...]}`, one probability per instance, in order.
//! - `GET /v1/models/<job>` answers the model's status: `{"model_version_status": [{"version":
//!   "<step>", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}`.
//! - `GET /metrics`: Prometheus text.
//!
//! A body that is not JSON, lacks `instances`, or has an instance with an unknown or missing
//! column or a value of the wrong type is answered 400 with `{"error": "..."}` naming the
//! field; another model name is 404.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::{ServeError, Server};

/// The routes, over `server`.
pub fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/v1/models/{target}", axum::routing::get(status).post(predict))
        .route("/metrics", axum::routing::get(metrics))
        .with_state(server)
}

/// Serves `router(server)` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: Arc<Server>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(server)).with_graceful_shutdown(shutdown).await
}

fn error(code: StatusCode, message: String) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], json!({ "error": message }).to_string())
        .into_response()
}

fn unknown_model(server: &Server, asked: &str) -> Response {
    let job = server.current().model.info().job.clone();
    error(StatusCode::NOT_FOUND, format!("no model `{asked}`: this server serves `{job}` (/v1/models/{job})"))
}

async fn status(State(server): State<Arc<Server>>, Path(target): Path<String>) -> Response {
    let current = server.current();
    let job = &current.model.info().job;
    if target != *job {
        return unknown_model(&server, &target);
    }
    let body = json!({
        "model_version_status": [{
            "version": current.model.step().to_string(),
            "state": "AVAILABLE",
            "status": { "error_code": "OK", "error_message": "" },
        }],
        "checkpoint": current.model.checkpoint(),
    });
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn predict(State(server): State<Arc<Server>>, Path(target): Path<String>, body: Bytes) -> Response {
    let started = Instant::now();
    let response = answer(&server, &target, &body).await;
    server.metrics().observe("rest", response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

async fn answer(server: &Server, target: &str, body: &[u8]) -> Response {
    let Some(name) = target.strip_suffix(":predict") else {
        return error(
            StatusCode::NOT_FOUND,
            format!("POST /v1/models/{target}: expected /v1/models/<name>:predict"),
        );
    };
    if name != server.current().model.info().job {
        return unknown_model(server, name);
    }
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}")),
    };
    let Some(instances) = value.get("instances") else {
        return error(
            StatusCode::BAD_REQUEST,
            "the body has no `instances`: expected {\"instances\": [{column: value, ...}]}".into(),
        );
    };
    let Some(list) = instances.as_array() else {
        return error(StatusCode::BAD_REQUEST, "`instances` must be a list of objects".into());
    };
    let mut rows = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        match item.as_object() {
            Some(row) => rows.push(row.clone()),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("instance {i} must be an object of column: value"),
                );
            }
        }
    }
    match server.predict(&rows).await {
        Ok(probs) => {
            ([(header::CONTENT_TYPE, "application/json")], json!({ "predictions": probs }).to_string())
                .into_response()
        }
        Err(ServeError::Input(e)) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(ServeError::Stopped) => error(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping".into()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn metrics(State(server): State<Arc<Server>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        server.metrics_text(),
    )
        .into_response()
}
