//! What an hcx-cluster process tells its operator besides its answers:
//! Prometheus metrics served over HTTP (`--metrics-listen`) and log lines,
//! as text or as JSON objects (`--log-format json`), each carrying the ids
//! of the spans (job, shard, stage, tensor) it was written in.
//!
//! Every crate records through the `metrics` facade under the names in
//! [`hcx_protocol::metrics`]; nothing is recorded until a process installs
//! the recorder with [`serve_metrics`], so a local run pays nothing.
#![warn(missing_docs, unreachable_pub)]

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hcx_protocol::metrics::{ALL, MetricKind};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// What can go wrong setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The metrics address cannot be bound.
    #[error("cannot serve metrics on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// The recorder could not be built or installed.
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
}

/// Histogram buckets (seconds) for every `_seconds` histogram: from half a
/// millisecond (a raft commit on loopback) to five minutes (a large shard).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// The process-wide Prometheus recorder, installed on first use: an
/// embedded cluster's coordinator and nodes share one process and so one
/// set of series.
pub fn recorder() -> Result<PrometheusHandle, TelemetryError> {
    let mut slot = HANDLE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = slot.as_ref() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(|e| TelemetryError::Recorder(e.to_string()))?
        .install_recorder()
        .map_err(|e| TelemetryError::Recorder(e.to_string()))?;
    for m in ALL {
        match m.kind {
            MetricKind::Counter => metrics::describe_counter!(m.name, m.help),
            MetricKind::Gauge => metrics::describe_gauge!(m.name, m.help),
            MetricKind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
    *slot = Some(handle.clone());
    Ok(handle)
}

/// Shows the unlabelled counters in `names` at zero from the start, so a
/// scrape finds every series of this process before it first moves.
pub fn show_counters(names: &[&str]) {
    for n in names {
        metrics::counter!(n.to_string()).increment(0);
    }
}

/// The content type of Prometheus' text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves the metrics at `GET /metrics` on `addr` (port 0 picks one) from a
/// task on the current tokio runtime; returns the address bound.
pub async fn serve_metrics(addr: SocketAddr) -> Result<SocketAddr, TelemetryError> {
    let handle = recorder()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| TelemetryError::Listen { addr, source })?;
    let render = handle.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = render.render();
            async move { ([(axum::http::header::CONTENT_TYPE, PROMETHEUS_TEXT)], text) }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server on {bound} stopped: {e}");
        }
    });
    // Histograms keep their observations until upkeep folds them in.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
    tracing::info!("metrics on http://{bound}/metrics");
    Ok(bound)
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines, span ids as a `job{id=…}:shard{…}:` prefix.
    #[default]
    Text,
    /// One JSON object a line, with the current span and every span above it.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?}: use text or json")),
        }
    }
}

/// Sets up logging to stderr in `format`, filtered by `$HCX_LOG` (an
/// `EnvFilter` directive such as `info` or `hcx_node=debug`), else by
/// `default_filter`.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HCX_LOG")
        .unwrap_or_else(|_| default_filter.into());
    // Colours only on a terminal: a log file or a pipe gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}
