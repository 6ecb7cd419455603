//! Serving the router's connections through hyper (HTTP/1.1): each request's head read within
//! a deadline, each write taken by the client within one, and on shutdown the listener closed first, then the requests in flight answered
//! before the connections close. (`axum::serve` sets hyper no timer, so a client sending its
//! headers a byte a minute held a connection and a task for ever, without credentials; and
//! its detection of HTTP/2 with prior knowledge reads a connection's first bytes with no
//! deadline at all, and an HTTP/2 connection had none after: a connection that sent nothing,
//! or half a preface, was held for ever. HTTP/2 is the balancer's or the TLS terminator's.)

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long a client has to send a request's head (hyper's header read timeout, which also
/// closes a kept-alive connection idle this long: longer than balancers keep theirs idle).
pub const HEADER_READ: Duration = Duration::from_secs(30);

/// How long requests in flight at shutdown have to end before their connections are dropped.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `stop`, then lets the requests in flight end (up to
/// [`DRAIN`]). A write that waits `write_stall` for the client to read cuts its connection: a
/// client that pipelined requests and never read the answers held it for ever.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    write_stall: Duration,
    stop: CancellationToken,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ);
    let connections = GracefulShutdown::new();
    let mut served = tokio::task::JoinSet::new();
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
        let mut tcp = tokio_io_timeout::TimeoutStream::new(tcp);
        tcp.set_write_timeout(Some(write_stall));
        let service = TowerToHyperService::new(app.clone());
        let connection =
            connections.watch(http.serve_connection(TokioIo::new(Box::pin(tcp)), service));
        served.spawn(async move {
            if let Err(e) = connection.await {
                tracing::trace!(error = %e, "connection ended");
            }
        });
        // Ended connections' tasks leave the set: it holds only live ones.
        while served.try_join_next().is_some() {}
    }
    // No more handshakes into a backlog nobody accepts from: a balancer tries another replica.
    drop(listener);
    if tokio::time::timeout(DRAIN, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after the drain; their connections close");
        served.abort_all();
    }
}
