//! The Prometheus `/metrics` endpoint every gradflow process serves (servers, workers, the
//! launcher): plain HTTP beside the gRPC port, the OpenMetrics text format.
//!
//! One implementation for all of them; each process only says how to write its metrics.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;

/// The content type of the OpenMetrics text format that `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers `GET /metrics` on `listener` with what `encode` writes, until `shutdown`
/// completes. Any other path gets 404.
pub async fn serve(
    listener: TcpListener,
    encode: impl Fn() -> String + Clone + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = encode();
            async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text) }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Listens on `addr` (port 0: a free one) and serves `GET /metrics` there in a task until
/// `shutdown` completes; returns the address it listens on. A failure of the endpoint later
/// is logged, naming `whose` endpoint it was ("the worker's").
pub async fn spawn(
    addr: SocketAddr,
    encode: impl Fn() -> String + Clone + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
    whose: &'static str,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = serve(listener, encode, shutdown).await {
            tracing::error!(error = %e, "{whose} metrics endpoint failed");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn metrics_are_served_in_the_openmetrics_format_until_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, || "# EOF\n".to_string(), async move {
            let _ = stopped.await;
        }));
        let answer = get(addr, "/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains(CONTENT_TYPE) && answer.ends_with("# EOF\n"), "{answer}");
        assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
