//! `conveyor-api`: authenticates, validates, writes the job row, enqueues, and serves reads
//! (jobs, SSE event streams, health, metrics, OpenAPI). It never runs heavy work.

pub mod audit;
pub mod auth;
mod extract;
mod files;
mod hub;
pub mod keys;
pub mod limits;
mod openapi;
mod reference;
mod refusals;
pub mod revocation;
mod routes;
mod serve;
mod state;

pub use state::AppState;

use axum::{extract::DefaultBodyLimit, Router};
use shared::Settings;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

pub fn router(state: AppState) -> Router {
    let (limit, body_idle) = (state.settings.body_limit, state.settings.body_idle);
    let (api, mut document) = routes::router().split_for_parts();
    let (streams, streams_document) = routes::streams().split_for_parts();
    document.merge(streams_document);
    api.route("/openapi.json", openapi::serve(&document))
        .layer(DefaultBodyLimit::max(limit))
        // A body sending nothing held its connection and handler for ever (the head has
        // `serve::HEADER_READ`); the extractors answer 408 (`extract::body_idle`).
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(body_idle))
        .layer(axum::Extension(extract::BodyDeadline(body_idle * 2)))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        // Every response names its request, so a client's report finds the server's log line.
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(axum::middleware::map_request(
            routes::ops::keep_plain_request_ids,
        ))
        // The streams stay outside the trace layer: it wraps each response body and reads the
        // clock twice per chunk, and thousands of subscribers take tens of chunks a second each
        // (5 % of the API's CPU at 2,000 subscribers). Their handlers log opening and closing.
        .merge(streams)
        .with_state(state)
        .merge(reference::router())
        .method_not_allowed_fallback(routes::ops::method_not_allowed)
        .layer(axum::middleware::from_fn(
            routes::ops::refuse_undecodable_paths,
        ))
}

/// A running API server.
pub struct Server {
    pub addr: SocketAddr,
    pub state: AppState,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Connects to PostgreSQL and Redis, migrates, and serves on `settings.listen`.
    pub async fn start(settings: Settings) -> anyhow::Result<Self> {
        let state = AppState::connect(settings).await?;
        let listener = TcpListener::bind(state.settings.listen).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let app = router(state.clone());
        let write_stall = state.settings.write_stall;
        let task = tokio::spawn(serve::serve(listener, app, write_stall, stop.clone()));
        tracing::info!(%addr, "listening");
        Ok(Self {
            addr,
            state,
            stop,
            task,
        })
    }

    /// Stops accepting connections; open SSE streams end, requests in flight are answered (up
    /// to [`serve::DRAIN`]), and the connections close.
    pub async fn shutdown(self) {
        self.state.stopping.cancel();
        self.stop.cancel();
        let _ = self.task.await;
    }
}
