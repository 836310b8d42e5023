//! The web dashboard every coordinator can serve: its nodes, its jobs and
//! their shards, updated live, and a finished job's attribution charts.
//!
//! The page (`/`, and `/jobs/ID` for one job) is one HTML document with its
//! own script, served from this binary (nothing from a CDN); the script
//! polls the JSON views below every second and redraws the tables. The
//! charts are the artifact's own `attribution.svg`, drawn server-side when
//! the artifact was written.
//!
//! | route | what |
//! |---|---|
//! | `GET /`, `GET /jobs/ID` | the page |
//! | `GET /api/overview` | [`Overview`]: this coordinator, the nodes, the jobs |
//! | `GET /api/jobs/ID` | [`JobView`]: one job with its shards |
//! | `GET /jobs/ID/attribution.svg` | the artifact's charts, once the job succeeded |
//! | `GET /jobs/ID/attribution.json` | the artifact's report |
//!
//! Two ways to listen: plain HTTP on a loopback address only
//! (`--http-listen`, for an SSH tunnel or a browser on the same machine),
//! or HTTPS with the coordinator's certificate (`--https-listen`), where
//! the browser must present a client certificate issued by the cluster CA
//! (`certs issue --role client`) that is not revoked.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hcx_net::tls::{Identity, Role};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

use crate::state::{JobRecord, JobState};
use crate::{CoordinatorError, Shared};

/// Where and how a coordinator serves its dashboard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DashboardListen {
    /// Address to bind (port 0 picks one).
    pub addr: SocketAddr,
    /// HTTPS with the coordinator's certificate, client certificates
    /// required; plain HTTP (loopback only) when false.
    pub tls: bool,
}

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the page shows about the coordinator serving it.
#[derive(Debug, Serialize)]
pub struct CoordinatorView {
    /// Its raft id.
    pub id: u64,
    /// Whether it leads now.
    pub leader: bool,
    /// The leader's raft id, when one is known.
    pub leader_id: Option<u64>,
    /// The leader's address, when one is known.
    pub leader_addr: Option<String>,
    /// Current raft term.
    pub term: u64,
    /// Index of the last entry it applied.
    pub applied: u64,
}

/// One node as the page lists it.
#[derive(Debug, Serialize)]
pub struct NodeView {
    /// Its name (from its certificate).
    pub name: String,
    /// Cores it offers.
    pub cores: u32,
    /// Memory it offers, bytes.
    pub memory_bytes: u64,
    /// GPUs it found.
    pub gpus: Vec<String>,
    /// Its labels (`site=a`).
    pub labels: Vec<String>,
    /// Milliseconds since its last heartbeat reached this coordinator;
    /// `None` where this coordinator does not lead (heartbeats go to the
    /// leader) or has not heard from it.
    pub heartbeat_age_ms: Option<u64>,
    /// Whether it takes no new shards.
    pub draining: bool,
    /// Shards it holds now, as `JOB/SHARD`.
    pub holding: Vec<String>,
}

/// One job as the page lists it.
#[derive(Debug, Serialize)]
pub struct JobSummary {
    /// Job id.
    pub id: String,
    /// Job name from its spec.
    pub name: String,
    /// running, merging, succeeded, failed or cancelled.
    pub state: String,
    /// Why it failed, if it did.
    pub reason: String,
    /// Shards done.
    pub shards_done: usize,
    /// Shards in all.
    pub shards_total: usize,
    /// Source bytes / artifact bytes, once it succeeded.
    pub ratio: Option<f64>,
    /// Leader's clock at submit, ms since the epoch.
    pub submitted_ms: u64,
    /// Leader's clock when it ended.
    pub finished_ms: Option<u64>,
}

/// The whole cluster as one coordinator sees it.
#[derive(Debug, Serialize)]
pub struct Overview {
    /// The coordinator answering.
    pub coordinator: CoordinatorView,
    /// Registered nodes.
    pub nodes: Vec<NodeView>,
    /// Every active job and the most recent finished ones
    /// ([`FINISHED_SHOWN`]), newest first.
    pub jobs: Vec<JobSummary>,
    /// Jobs the cluster keeps in all (a retained history can run to
    /// thousands; the page lists only what [`Overview::jobs`] holds).
    pub jobs_total: usize,
}

/// One shard on the job page.
#[derive(Debug, Serialize)]
pub struct ShardView {
    /// Shard id.
    pub id: u32,
    /// What it covers (`layer.3`, `rank 1`).
    pub label: String,
    /// waiting (no node holds it), assigned (its node has not reported
    /// starting it: queued there, or this coordinator does not lead and so
    /// gets no reports), running (its node reports a step) or done.
    pub state: &'static str,
    /// The node holding (or that finished) it.
    pub node: String,
    /// Current attempt, from 1.
    pub attempt: u32,
    /// What its holder is doing (fetch, encode, calibrate, upload, done).
    pub step: String,
    /// Tensors through that step.
    pub tensors_done: u32,
    /// Tensors in the shard.
    pub tensors: u32,
    /// Why the last attempt ended without a result.
    pub last_error: String,
    /// Kernel seconds, once done.
    pub kernel_seconds: f64,
    /// Shard file bytes, once done.
    pub bytes_out: u64,
}

/// One job with its shards.
#[derive(Debug, Serialize)]
pub struct JobView {
    /// The job.
    pub job: JobSummary,
    /// The stage that failed, if it did.
    pub failed_stage: String,
    /// Its shards.
    pub shards: Vec<ShardView>,
    /// Members of its collective group by rank, if it runs as one.
    pub group: Vec<String>,
    /// Quality-gate notes, one per measured try.
    pub gates: Vec<String>,
    /// Whether the attribution charts can be fetched from this coordinator.
    pub charts: bool,
}

fn summary(j: &JobRecord) -> JobSummary {
    let (reason, ratio) = match &j.state {
        JobState::Failed { reason, .. } => (reason.clone(), None),
        JobState::Succeeded {
            artifact_bytes,
            source_bytes,
        } if *artifact_bytes > 0 => (
            String::new(),
            Some(*source_bytes as f64 / *artifact_bytes as f64),
        ),
        _ => (String::new(), None),
    };
    JobSummary {
        id: j.id.clone(),
        name: j.spec.name.clone(),
        state: j.state.name().into(),
        reason,
        shards_done: j.done(),
        shards_total: j.shards.len(),
        ratio,
        submitted_ms: j.submitted_ms,
        finished_ms: j.finished_ms,
    }
}

/// The overview this coordinator gives now.
pub(crate) fn overview(sh: &Shared) -> Overview {
    let m = sh.raft.metrics().borrow().clone();
    let coordinator = CoordinatorView {
        id: sh.id,
        leader: sh.is_leader(),
        leader_id: m.current_leader,
        leader_addr: sh.leader_addr(),
        term: m.current_term,
        applied: m.last_applied.map_or(0, |l| l.index),
    };
    let ages = if coordinator.leader {
        sh.seen_ago()
    } else {
        Default::default()
    };
    sh.view.read(|s| {
        let nodes = s
            .nodes
            .values()
            .map(|n| NodeView {
                name: n.name.clone(),
                cores: n.cores,
                memory_bytes: n.memory_bytes,
                gpus: n.gpus.clone(),
                labels: n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                heartbeat_age_ms: ages.get(&n.name).copied(),
                draining: n.draining,
                holding: s
                    .jobs
                    .values()
                    .filter(|j| j.state.is_active())
                    .flat_map(|j| {
                        j.shards
                            .iter()
                            .filter(|r| r.result.is_none() && r.node.as_deref() == Some(&n.name))
                            .map(|r| format!("{}/{}", j.id, r.shard.id))
                    })
                    .collect(),
            })
            .collect();
        let jobs = listed(s).into_iter().map(summary).collect();
        Overview {
            coordinator,
            nodes,
            jobs,
            jobs_total: s.jobs.len(),
        }
    })
}

/// How many finished jobs the overview lists beside the active ones.
pub const FINISHED_SHOWN: usize = 50;

/// The jobs the overview lists, newest first: every active one and the
/// [`FINISHED_SHOWN`] most recent finished ones, so a page redrawn every
/// second stays small however many jobs the cluster retains.
fn listed(s: &crate::state::ClusterState) -> Vec<&JobRecord> {
    let mut finished = 0;
    s.jobs
        .values()
        .rev()
        .filter(|j| {
            if j.state.is_active() {
                return true;
            }
            finished += 1;
            finished <= FINISHED_SHOWN
        })
        .collect()
}

/// One job's view, or `None` for an unknown id.
pub(crate) fn job_view(sh: &Shared, id: &str) -> Option<JobView> {
    let j = sh.view.read(|s| s.jobs.get(id).cloned())?;
    let status = sh.status_of(&j);
    let shards = j
        .shards
        .iter()
        .zip(status.shards)
        .map(|(rec, st)| ShardView {
            id: st.id,
            label: st.label,
            state: if rec.result.is_some() {
                "done"
            } else if rec.node.is_none() {
                "waiting"
            } else if st.step.is_empty() {
                "assigned"
            } else {
                "running"
            },
            node: st.node,
            attempt: st.attempt,
            step: st.step,
            tensors_done: st.tensors_done,
            tensors: st.tensors,
            last_error: st.last_error,
            kernel_seconds: st.kernel_seconds,
            bytes_out: st.bytes_out,
        })
        .collect();
    let charts = report_file(sh, &j, hcx_pipeline::artifact::CHARTS_FILE).is_some();
    Some(JobView {
        job: summary(&j),
        failed_stage: status.failed_stage,
        shards,
        group: j
            .group
            .as_ref()
            .map(|g| g.members.clone())
            .unwrap_or_default(),
        gates: j.gate_notes.clone(),
        charts,
    })
}

/// Where this coordinator holds file `name` of a succeeded job's artifact:
/// among the in-cluster artifact's blobs, or in the output folder it wrote.
fn report_file(sh: &Shared, j: &JobRecord, name: &str) -> Option<PathBuf> {
    if !matches!(j.state, JobState::Succeeded { .. }) {
        return None;
    }
    if j.in_cluster() {
        let f = j.artifact.iter().find(|f| f.name == name)?;
        sh.blobs.has(&f.sha256).ok().flatten()?;
        sh.blobs.path(&f.sha256).ok()
    } else {
        let p = std::path::Path::new(&j.output).join(name);
        p.is_file().then_some(p)
    }
}

/// The page's HTML, script and style.
const PAGE: &str = include_str!("dashboard.html");

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
}

fn json<T: Serialize>(v: T) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Json(v)).into_response()
}

fn not_found(what: String) -> Response {
    (StatusCode::NOT_FOUND, what).into_response()
}

async fn api_overview(State(sh): State<Arc<Shared>>) -> Response {
    json(overview(&sh))
}

async fn api_job(State(sh): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match job_view(&sh, &id) {
        Some(v) => json(v),
        None => not_found(format!("no job {id} in the cluster")),
    }
}

async fn artifact_report(sh: Arc<Shared>, id: String, name: &str, kind: &'static str) -> Response {
    let Some(j) = sh.view.read(|s| s.jobs.get(&id).cloned()) else {
        return not_found(format!("no job {id} in the cluster"));
    };
    let Some(path) = report_file(&sh, &j, name) else {
        return not_found(format!(
            "job {id} ({}) has no {name} on coordinator {}: it is written when the job succeeds, \
             by the leader that merges it",
            j.state.name(),
            sh.id
        ));
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, kind)], bytes).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read {}: {e}", path.display()),
        )
            .into_response(),
    }
}

async fn charts(State(sh): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    artifact_report(sh, id, hcx_pipeline::artifact::CHARTS_FILE, "image/svg+xml").await
}

async fn report(State(sh): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    artifact_report(sh, id, "attribution.json", "application/json").await
}

/// Who is on the other end of a dashboard connection.
#[derive(Clone, Debug)]
struct Peer {
    /// Its address.
    addr: SocketAddr,
    /// The certificate it presented over HTTPS (its leaf, DER); `None` on
    /// plain HTTP.
    cert: Option<rustls_pki_types::CertificateDer<'static>>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Refuses an HTTPS caller whose certificate is not a client's of this
/// cluster or has been revoked (plain HTTP is loopback-only and open).
async fn gate(
    State(sh): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(cert) = &peer.cert {
        let certs = [cert.clone()];
        if let Err(s) = sh.require_role(Some(&certs), &[Role::Client], "the dashboard") {
            tracing::info!("dashboard: refused {}: {}", peer.addr, s.message());
            return (StatusCode::FORBIDDEN, s.message().to_string()).into_response();
        }
    }
    next.run(req).await
}

/// A stream the dashboard serves over: plain TCP or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// The dashboard's listener: accepts TCP connections and, for HTTPS,
/// finishes each TLS handshake in its own task (a slow client delays only
/// itself), handing axum the connections ready to speak HTTP.
struct Listener {
    ready: mpsc::Receiver<(Box<dyn Stream>, Peer)>,
    local: SocketAddr,
}

impl axum::serve::Listener for Listener {
    type Io = Box<dyn Stream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task ended (shutdown): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            cert: None,
        })
    }
}

async fn accept_loop(
    tcp: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ready: mpsc::Sender<(Box<dyn Stream>, Peer)>,
) {
    loop {
        let (conn, addr) = match tcp.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait, then go on.
                tracing::warn!("dashboard: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ready = ready.clone();
        match &tls {
            None => {
                let peer = Peer { addr, cert: None };
                if ready.send((Box::new(conn), peer)).await.is_err() {
                    return;
                }
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                        Ok(Ok(stream)) => {
                            let cert = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| c.clone().into_owned());
                            let _ = ready.send((Box::new(stream), Peer { addr, cert })).await;
                        }
                        Ok(Err(e)) => tracing::info!("dashboard: TLS from {addr}: {e}"),
                        Err(_) => {
                            tracing::info!("dashboard: TLS from {addr}: no handshake in 10 s")
                        }
                    }
                });
            }
        }
    }
}

/// Refuses a dashboard setting that would serve in the clear off
/// loopback, or HTTPS without a certificate to present.
pub fn check(listen: &DashboardListen, has_certificate: bool) -> Result<(), CoordinatorError> {
    if listen.tls && !has_certificate {
        return Err(CoordinatorError::Config(
            "--https-listen needs the coordinator's certificate (--certs); \
             under --insecure use --http-listen on a loopback address"
                .into(),
        ));
    }
    if !listen.tls && !listen.addr.ip().to_canonical().is_loopback() {
        return Err(CoordinatorError::Config(format!(
            "--http-listen {}: plain HTTP is served on loopback addresses only; \
             use --https-listen (client certificates from the cluster CA) elsewhere",
            listen.addr
        )));
    }
    Ok(())
}

/// Binds the dashboard and serves it until `shutdown` turns true; returns
/// the address bound and the serving task.
pub(crate) async fn serve(
    sh: Arc<Shared>,
    listen: DashboardListen,
    identity: Option<&Identity>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), CoordinatorError> {
    check(&listen, identity.is_some())?;
    let acceptor = match identity.filter(|_| listen.tls) {
        Some(id) => {
            let cfg = hcx_net::tls::server_config(id, &[b"http/1.1"])?;
            Some(tokio_rustls::TlsAcceptor::from(cfg))
        }
        None => None,
    };
    let tcp = tokio::net::TcpListener::bind(listen.addr)
        .await
        .map_err(|source| CoordinatorError::Bind {
            addr: listen.addr,
            source,
        })?;
    let local = tcp.local_addr().map_err(|source| CoordinatorError::Bind {
        addr: listen.addr,
        source,
    })?;
    let (tx, rx) = mpsc::channel(64);
    let app = Router::new()
        .route("/", get(page))
        .route("/jobs/{id}", get(page))
        .route("/api/overview", get(api_overview))
        .route("/api/jobs/{id}", get(api_job))
        .route("/jobs/{id}/attribution.svg", get(charts))
        .route("/jobs/{id}/attribution.json", get(report))
        .layer(axum::middleware::from_fn_with_state(sh.clone(), gate))
        .with_state(sh);
    let scheme = if listen.tls { "https" } else { "http" };
    tracing::info!("dashboard on {scheme}://{local}/");
    let task = tokio::spawn(async move {
        let accepting = tokio::spawn(accept_loop(tcp, acceptor, tx));
        let listener = Listener { ready: rx, local };
        let served = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|v| *v).await;
            })
            .await;
        accepting.abort();
        if let Err(e) = served {
            tracing::error!("dashboard on {local} stopped: {e}");
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overview_lists_active_jobs_and_only_the_latest_finished_ones() {
        use crate::state::ClusterState;
        let spec: hcx_protocol::JobSpec = hcx_protocol::JobSpec::parse(
            "name: j\nmodel: m.safetensors\noutput: out\npipeline:\n  - rtn: {bits: 4}\n",
            std::path::Path::new("j.yaml"),
            std::path::Path::new("/"),
        )
        .unwrap();
        let mut s = ClusterState::default();
        for i in 1..=200u64 {
            let state = if i == 3 || i == 150 {
                JobState::Running
            } else {
                JobState::Cancelled
            };
            let id = format!("j{i:06}");
            s.jobs.insert(
                id.clone(),
                JobRecord {
                    id,
                    idempotency_key: None,
                    spec: spec.clone(),
                    output: String::new(),
                    state,
                    shards: Vec::new(),
                    submitted_ms: i,
                    finished_ms: None,
                    units: Vec::new(),
                    group: None,
                    artifact: Vec::new(),
                    raises: 0,
                    gate_notes: Vec::new(),
                },
            );
        }
        let ids: Vec<String> = listed(&s).iter().map(|j| j.id.clone()).collect();
        // The 50 newest finished (j000200 down to j000151), then the active
        // ones below them, newest first.
        let want: Vec<String> = (151..=200u64)
            .rev()
            .map(|i| format!("j{i:06}"))
            .chain(["j000150".to_string(), "j000003".to_string()])
            .collect();
        assert_eq!(ids, want);
    }

    #[test]
    fn plain_http_only_on_loopback_and_https_only_with_a_certificate() {
        let at = |a: &str, tls| DashboardListen {
            addr: a.parse().unwrap(),
            tls,
        };
        assert!(check(&at("127.0.0.1:7180", false), false).is_ok());
        assert!(check(&at("[::1]:7180", false), true).is_ok());
        let e = check(&at("0.0.0.0:7180", false), true).unwrap_err();
        assert!(e.to_string().contains("loopback addresses only"), "{e}");
        let e = check(&at("10.0.0.1:7180", false), true).unwrap_err();
        assert!(e.to_string().contains("--https-listen"), "{e}");
        assert!(check(&at("10.0.0.1:7443", true), true).is_ok());
        let e = check(&at("127.0.0.1:7443", true), false).unwrap_err();
        assert!(
            e.to_string()
                .contains("needs the coordinator's certificate"),
            "{e}"
        );
    }

    #[test]
    fn the_page_draws_text_as_text_and_loads_nothing_from_elsewhere() {
        assert!(!PAGE.contains("innerHTML"), "text must go in as text");
        assert!(!PAGE.contains("http://") && !PAGE.contains("https://"));
        assert!(!PAGE.contains("<script src"));
    }
}
