//! Serving the router's connections: HTTP/1.1 through hyper, each connection's request head
//! read within a deadline, and on shutdown the requests in flight answered before the
//! connections close. (`axum::serve` sets hyper no timer, so a client sending its headers a
//! byte a minute held a connection and a task for ever, without credentials.)

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long a client has to send a request's head, the first one or the next on a kept-alive
/// connection (which then closes).
pub const HEADER_READ: Duration = Duration::from_secs(10);

/// How long requests in flight at shutdown have to end before their connections are dropped.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `stop`, then lets the requests in flight end (up to
/// [`DRAIN`]).
pub async fn serve(listener: TcpListener, app: Router, stop: CancellationToken) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ);
    let connections = GracefulShutdown::new();
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        // Without TCP_NODELAY, Nagle's algorithm holds an SSE write back until the client has
        // acknowledged the previous one, and clients delay their acknowledgements (40 ms on
        // Linux): live events would wait on that instead of going out at once.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(TokioIo::new(tcp), service);
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::trace!(error = %e, "connection ended");
            }
        });
    }
    if tokio::time::timeout(DRAIN, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after the drain; their connections close");
    }
}
