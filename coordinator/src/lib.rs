//! Raft-replicated coordinator: job state machine, scheduler, gRPC API,
//! QUIC data plane and shard merge.
//!
//! [`start`] runs one coordinator: its raft member (log and snapshots in
//! redb under the data dir), the gRPC API on `listen` (TCP), the QUIC data
//! plane on the same port (UDP), and the leader's supervisor loop that
//! hands out shards, expires leases and merges finished jobs.

pub mod blobs;
pub mod dashboard;
pub mod dataplane;
mod gauges;
pub mod network;
pub mod roots;
pub mod scheduler;
pub mod service;
pub mod state;
pub mod store;
pub mod supervisor;
pub mod transfer;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hcx_net::certs::CertFacts;
use hcx_net::client::LEADER_HEADER;
use hcx_net::proto::ShardProgress;
use hcx_net::proto::cluster_server::ClusterServer;
use hcx_net::proto::raft_server::RaftServer;
use hcx_net::tls::{Identity, Role};
use hcx_pipeline::model::Model;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, Raft, ServerState};
use tokio::sync::watch;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;

use crate::network::PeerTransport;
use crate::scheduler::NodeCapacity;
use crate::state::{Command, CommandResult};
use crate::store::{NodeId, StateView, TypeConfig};

/// Why a coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The raft store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// A setting is wrong.
    #[error("{0}")]
    Config(String),
    /// A socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] hcx_net::tls::TlsError),
    /// Raft refused to start.
    #[error("raft: {0}")]
    Raft(String),
    /// A model or output root is unusable.
    #[error(transparent)]
    Roots(#[from] roots::RootError),
}

/// Which finished (succeeded, failed or cancelled) jobs a cluster keeps in
/// its state; the leader deletes the others, oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most this many finished jobs.
    pub max_jobs: usize,
    /// Delete a finished job this long after it ended.
    pub max_age: Option<Duration>,
    /// Delete the oldest finished jobs while the blobs the jobs need (sent
    /// models, in-cluster artifacts) pass this many bytes.
    pub max_bytes: Option<u64>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_jobs: 10_000,
            max_age: None,
            max_bytes: None,
        }
    }
}

/// How to run one coordinator.
#[derive(Clone)]
pub struct CoordinatorConfig {
    /// This coordinator's raft id (a key of `peers`).
    pub id: NodeId,
    /// Address for gRPC (TCP) and the data plane (UDP).
    pub listen: SocketAddr,
    /// Every voter: id → `host:port` its peers and nodes reach it at.
    pub peers: BTreeMap<NodeId, String>,
    /// Where the raft log and snapshots live.
    pub data_dir: PathBuf,
    /// TLS identity; `None` runs plaintext (loopback only).
    pub tls: Option<Identity>,
    /// Join a running group instead of founding one: start with an empty
    /// log and wait for the leader to add this coordinator
    /// (`hcx-cluster coordinators add`). Ignored once the log holds a
    /// membership.
    pub join: bool,
    /// Which finished jobs the leader keeps (the rest it deletes).
    pub retention: Retention,
    /// A node silent for this long loses its shards.
    pub lease: Duration,
    /// Folders (or model files) jobs may read models from (`--model-root`).
    pub model_roots: Vec<PathBuf>,
    /// Folders jobs may write artifacts inside (`--output-root`).
    pub output_roots: Vec<PathBuf>,
    /// Where to serve the web dashboard, if anywhere (`--http-listen`,
    /// `--https-listen`).
    pub dashboard: Option<dashboard::DashboardListen>,
}

/// What every task of a coordinator shares.
pub struct Shared {
    pub(crate) id: NodeId,
    pub(crate) raft: Raft<TypeConfig>,
    pub(crate) view: StateView,
    pub(crate) advertise: String,
    pub(crate) lease: Duration,
    seen: Mutex<HashMap<String, Instant>>,
    /// Each node's last progress report (held by the leader in memory; it
    /// is advisory, so it is not worth a raft commit).
    progress: Mutex<HashMap<String, Vec<ShardProgress>>>,
    models: tokio::sync::Mutex<HashMap<PathBuf, Arc<Model>>>,
    pub(crate) peers: BTreeMap<NodeId, String>,
    /// Whether peers present certificates (false under `--insecure`).
    pub(crate) secure: bool,
    /// This coordinator's own certificate serial, which it will not revoke.
    pub(crate) own_serial: Option<String>,
    /// Where jobs may read models and write artifacts.
    pub(crate) roots: roots::Roots,
    /// Which finished jobs to keep.
    pub(crate) retention: Retention,
    /// The data dir (raft store, blobs, laid-out models, staging).
    pub(crate) data_dir: PathBuf,
    /// Sent models, shard files and in-cluster artifacts, by SHA-256.
    pub(crate) blobs: blobs::BlobStore,
    /// How to dial the other coordinators.
    pub(crate) transport: PeerTransport,
    /// Held while a sent model's folder is laid out.
    pub(crate) laying_out: tokio::sync::Mutex<()>,
}

/// Milliseconds since the Unix epoch on this machine's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Shared {
    /// The leader's address, when one is known.
    pub(crate) fn leader_addr(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        // The membership knows coordinators added since --peers was written.
        m.membership_config
            .nodes()
            .find(|(n, _)| **n == id)
            .map(|(_, node)| node.addr.clone())
            .or_else(|| self.peers.get(&id).cloned())
    }

    pub(crate) fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Errors with the leader's address unless this coordinator leads.
    pub(crate) fn require_leader(&self) -> Result<(), Status> {
        if self.is_leader() {
            return Ok(());
        }
        Err(self.not_leader())
    }

    /// Waits until a read of this coordinator's state is linearizable: it
    /// leads (confirmed by a quorum's heartbeat answers) and has applied
    /// everything committed before the call. A follower's state may lag the
    /// leader's, so a client reading there could miss its own write; such a
    /// read is sent on to the leader instead.
    pub(crate) async fn linearizable_read(&self) -> Result<(), Status> {
        self.require_leader()?;
        // A leader cut off from its quorum cannot confirm itself; the
        // client then tries the other coordinators.
        let confirmed =
            tokio::time::timeout(Duration::from_secs(3), self.raft.ensure_linearizable()).await;
        let Ok(confirmed) = confirmed else {
            return Err(Status::unavailable(format!(
                "coordinator {} could not confirm its leadership with a quorum within 3 s",
                self.id
            )));
        };
        match confirmed {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                Err(self.not_leader())
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                Err(Status::unavailable(format!(
                    "coordinator {} cannot reach a quorum: {q}",
                    self.id
                )))
            }
            Err(e) => Err(Status::unavailable(format!("raft: {e}"))),
        }
    }

    fn not_leader(&self) -> Status {
        match self.leader_addr() {
            Some(addr) if addr != self.advertise => {
                let mut s = Status::failed_precondition(format!(
                    "coordinator {} is not the leader; the leader is {addr}",
                    self.id
                ));
                if let Ok(v) = addr.parse() {
                    s.metadata_mut().insert(LEADER_HEADER, v);
                }
                s
            }
            _ => Status::unavailable(format!(
                "coordinator {} knows no leader yet (election in progress)",
                self.id
            )),
        }
    }

    /// What the caller's certificate says (`None` under `--insecure`,
    /// where certificates prove nothing). Refuses a certificate that names
    /// no cluster role and name, and one whose serial has been revoked.
    pub(crate) fn caller(
        &self,
        certs: Option<&[rustls_pki_types::CertificateDer<'static>]>,
        call: &str,
    ) -> Result<Option<CertFacts>, Status> {
        if !self.secure {
            return Ok(None);
        }
        let facts = certs
            .and_then(|c| c.first())
            .and_then(|c| hcx_net::certs::read_facts(c.as_ref()))
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "{call}: the peer presented no cluster certificate (one made by `certs issue`)"
                ))
            })?;
        if let Some(at) = self.view.read(|s| s.revoked.get(&facts.serial).copied()) {
            return Err(Status::permission_denied(format!(
                "{call}: certificate {} ({} {}) was revoked at {at} ms; issue a new one with `certs issue`",
                facts.serial, facts.role, facts.name
            )));
        }
        Ok(Some(facts))
    }

    /// Refuses a peer whose certificate was not issued for one of `allowed`
    /// (a node cannot cancel jobs, a client cannot pose as a node), or was
    /// revoked; returns what the certificate says.
    pub(crate) fn require_role(
        &self,
        certs: Option<&[rustls_pki_types::CertificateDer<'static>]>,
        allowed: &[Role],
        call: &str,
    ) -> Result<Option<CertFacts>, Status> {
        let Some(facts) = self.caller(certs, call)? else {
            return Ok(None);
        };
        if allowed.contains(&facts.role) {
            Ok(Some(facts))
        } else {
            Err(Status::permission_denied(format!(
                "{call} needs a {} certificate; the peer presented {} {}'s",
                allowed
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(" or "),
                facts.role,
                facts.name
            )))
        }
    }

    /// Refuses a raft message claiming to come from coordinator `sender`
    /// unless the caller's certificate is valid for that member's raft
    /// address (as the membership, or `--peers`, records it): a coordinator
    /// certificate speaks raft only as the member it serves. A coordinator
    /// that knows no member yet (one just started with `--join`) takes the
    /// first messages on the role alone; the log it receives then names
    /// every member.
    pub(crate) fn require_raft_sender(
        &self,
        certified: Option<&CertFacts>,
        sender: Option<NodeId>,
        call: &str,
    ) -> Result<(), Status> {
        let Some(f) = certified else {
            return Ok(());
        };
        let Some(sender) = sender else {
            return Err(Status::invalid_argument(format!(
                "{call} names no sending coordinator"
            )));
        };
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let addr = membership
            .get_node(&sender)
            .map(|n| n.addr.clone())
            .or_else(|| self.peers.get(&sender).cloned());
        let Some(addr) = addr else {
            if membership.nodes().next().is_none() {
                return Ok(());
            }
            return Err(Status::permission_denied(format!(
                "{call} claims to come from coordinator {sender}, which is not a member"
            )));
        };
        let host = host_of(&addr);
        if cert_serves(&f.hosts, host) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{call} claims to come from coordinator {sender} at {addr}, but the certificate of {} {:?} is not valid for {host} (it serves {})",
                f.role,
                f.name,
                f.hosts.join(", ")
            )))
        }
    }

    /// Refuses a node call that names another node than the one the
    /// caller's certificate was issued for.
    pub(crate) fn require_node_name(
        &self,
        certified: Option<&CertFacts>,
        claimed: &str,
        call: &str,
    ) -> Result<(), Status> {
        match certified {
            Some(f) if f.name != claimed => Err(Status::permission_denied(format!(
                "{call}: the certificate is issued to node {:?}; it cannot act as node {claimed:?}",
                f.name
            ))),
            _ => Ok(()),
        }
    }

    /// Commits a command through raft and returns what applying it said.
    pub(crate) async fn propose(&self, cmd: Command) -> Result<CommandResult, Status> {
        let t0 = Instant::now();
        match self.raft.client_write(cmd).await {
            Ok(r) => {
                metrics::histogram!(hcx_protocol::metrics::RAFT_COMMIT_SECONDS)
                    .record(t0.elapsed().as_secs_f64());
                Ok(r.data)
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(self.not_leader())
            }
            Err(e) => Err(Status::unavailable(format!("raft: {e}"))),
        }
    }

    /// Keeps `node`'s latest report of its shards' progress.
    pub(crate) fn set_progress(&self, node: &str, report: Vec<ShardProgress>) {
        let mut p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        if report.is_empty() {
            p.remove(node);
        } else {
            p.insert(node.to_string(), report);
        }
    }

    /// A job's status with its shards' progress as their holders last
    /// reported it; a report counts only for the attempt the state says the
    /// node holds now.
    pub(crate) fn status_of(&self, j: &state::JobRecord) -> hcx_net::proto::JobStatus {
        let mut st = service::job_status(j);
        let p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        for (rec, out) in j.shards.iter().zip(st.shards.iter_mut()) {
            if let Some(r) = &rec.result {
                out.step = "done".into();
                out.tensors_done = out.tensors;
                out.bytes_done = r.bytes_in;
                continue;
            }
            let Some(node) = &rec.node else { continue };
            if let Some(sp) = p.get(node).and_then(|v| {
                v.iter().find(|x| {
                    x.job_id == j.id && x.shard == rec.shard.id && x.attempt == rec.attempt
                })
            }) {
                out.step = sp.step.clone();
                out.tensors_done = sp.tensors_done.min(out.tensors);
                out.bytes_done = sp.bytes_done;
            }
        }
        st
    }

    /// Records a heartbeat from `node`.
    pub(crate) fn saw(&self, node: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(node.to_string(), Instant::now());
    }

    /// Milliseconds since each node was last heard from.
    pub(crate) fn seen_ago(&self) -> HashMap<String, u64> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter()
            .map(|(k, t)| (k.clone(), t.elapsed().as_millis() as u64))
            .collect()
    }

    /// Whether `node` has been heard from within its lease.
    pub(crate) fn alive(&self, node: &str) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(node).is_some_and(|t| t.elapsed() < self.lease)
    }

    /// Gives every registered node a fresh lease (a new leader's grace period).
    pub(crate) fn grace_all(&self) {
        let names: Vec<String> = self.view.read(|s| s.nodes.keys().cloned().collect());
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for n in names {
            seen.insert(n, now);
        }
    }

    /// Registered, non-draining nodes heard from within their lease.
    pub(crate) fn live_nodes(&self) -> Vec<NodeCapacity> {
        let nodes: Vec<_> = self.view.read(|s| s.nodes.values().cloned().collect());
        nodes
            .iter()
            .filter(|n| !n.draining && self.alive(&n.name))
            .map(service::capacity)
            .collect()
    }

    /// The source model at `path`, opened once and kept.
    pub(crate) async fn model(
        &self,
        path: &Path,
    ) -> Result<Arc<Model>, hcx_pipeline::PipelineError> {
        let mut models = self.models.lock().await;
        if let Some(m) = models.get(path) {
            return Ok(m.clone());
        }
        let p = path.to_path_buf();
        let m = tokio::task::spawn_blocking(move || Model::open(&p))
            .await
            .map_err(|e| hcx_pipeline::PipelineError::Model {
                path: path.to_path_buf(),
                why: e.to_string(),
            })??;
        let m = Arc::new(m);
        models.insert(path.to_path_buf(), m.clone());
        Ok(m)
    }
}

/// A running coordinator.
pub struct CoordinatorHandle {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The address it serves on.
    pub addr: SocketAddr,
    /// The address its dashboard serves on, if it serves one.
    pub dashboard_addr: Option<SocketAddr>,
}

impl CoordinatorHandle {
    /// A read handle on its applied state.
    pub fn view(&self) -> StateView {
        self.shared.view.clone()
    }

    /// Whether it leads now.
    pub fn is_leader(&self) -> bool {
        self.shared.is_leader()
    }

    /// Its raft member's view of the group now: term, leader, log,
    /// snapshot and purge points, and (on the leader) each peer's progress.
    pub fn metrics(&self) -> openraft::RaftMetrics<NodeId, BasicNode> {
        self.shared.raft.metrics().borrow().clone()
    }

    /// Commits `cmd` through raft, as the API handlers do after checking a
    /// request, and returns what applying it said. Refused with the
    /// leader's address unless this coordinator leads.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, Status> {
        self.shared.propose(cmd).await
    }

    /// Stops serving and shuts raft down.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            t.abort();
        }
        let _ = self.shared.raft.shutdown().await;
    }
}

/// Starts a coordinator and returns once it serves.
pub async fn start(mut cfg: CoordinatorConfig) -> Result<CoordinatorHandle, CoordinatorError> {
    if !cfg.peers.contains_key(&cfg.id) {
        return Err(CoordinatorError::Config(format!(
            "--id {} is not in --peers ({})",
            cfg.id,
            cfg.peers
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        )));
    }
    let roots = roots::Roots::new(&cfg.model_roots, &cfg.output_roots)?;
    if let Some(d) = &cfg.dashboard {
        dashboard::check(d, cfg.tls.is_some())?;
    }
    if cfg.tls.is_none() {
        hcx_net::tls::check_insecure_addr(&cfg.listen)?;
        for (id, addr) in &cfg.peers {
            hcx_net::tls::check_insecure_host(addr)
                .map_err(|e| CoordinatorError::Config(format!("peer {id}: {e}")))?;
        }
    }
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        CoordinatorError::Config(format!(
            "cannot create the data dir {}: {e}",
            cfg.data_dir.display()
        ))
    })?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| CoordinatorError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| CoordinatorError::Bind {
            addr: cfg.listen,
            source,
        })?;
    // A peer address with port 0 (the embedded single-voter cluster) takes
    // the port just bound.
    if let Some(a) = cfg.peers.get_mut(&cfg.id)
        && a.ends_with(":0")
    {
        *a = addr.to_string();
    }
    let (log, sm) = store::open(&cfg.data_dir)?;
    let view = sm.view();
    let config = openraft::Config {
        cluster_name: "hcx-cluster".into(),
        heartbeat_interval: 150,
        election_timeout_min: 600,
        election_timeout_max: 1200,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(2000),
        max_in_snapshot_log_to_keep: 500,
        snapshot_max_chunk_size: network::SNAPSHOT_CHUNK_BYTES as u64,
        install_snapshot_timeout: network::SNAPSHOT_CHUNK_TIMEOUT_MS,
        ..Default::default()
    }
    .validate()
    .map_err(|e| CoordinatorError::Config(e.to_string()))?;
    let client_tls = cfg.tls.as_ref().map(hcx_net::tls::tonic_client_tls);
    let transport = PeerTransport::new(client_tls);
    let blob_store = blobs::BlobStore::open(&cfg.data_dir.join("blobs"))
        .map_err(|e| CoordinatorError::Config(e.to_string()))?;
    let raft = Raft::new(cfg.id, Arc::new(config), transport.clone(), log, sm)
        .await
        .map_err(|e| CoordinatorError::Raft(e.to_string()))?;
    let members: BTreeMap<NodeId, BasicNode> = cfg
        .peers
        .iter()
        .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
        .collect();
    // Every founding member initializes with the same voters; openraft
    // refuses it once the log holds a membership (a restart), which is
    // what we want. A joining coordinator must not: its own membership
    // would compete with the running group's.
    if !cfg.join
        && let Err(e) = raft.initialize(members).await
    {
        tracing::debug!("initialize: {e}");
    }
    let advertise = cfg.peers[&cfg.id].clone();
    let shared = Arc::new(Shared {
        id: cfg.id,
        raft,
        view,
        advertise,
        lease: cfg.lease,
        seen: Mutex::new(HashMap::new()),
        progress: Mutex::new(HashMap::new()),
        models: tokio::sync::Mutex::new(HashMap::new()),
        peers: cfg.peers.clone(),
        secure: cfg.tls.is_some(),
        own_serial: cfg.tls.as_ref().map(|id| id.facts().serial.clone()),
        roots,
        retention: cfg.retention,
        data_dir: cfg.data_dir.clone(),
        blobs: blob_store,
        transport,
        laying_out: tokio::sync::Mutex::new(()),
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut builder = tonic::transport::Server::builder();
    if let Some(id) = &cfg.tls {
        builder = builder
            .tls_config(hcx_net::tls::tonic_server_tls(id))
            .map_err(|e| CoordinatorError::Config(format!("gRPC TLS: {e}")))?;
    }
    // Every call, whatever the service, is refused to a certificate that
    // names no cluster machine or has been revoked.
    let gate = {
        let shared = shared.clone();
        move |req: tonic::Request<()>| {
            let certs = req.peer_certs();
            shared.caller(certs.as_deref().map(|v| v.as_slice()), "the cluster API")?;
            Ok(req)
        }
    };
    let cluster = ClusterServer::new(service::ClusterService {
        shared: shared.clone(),
    })
    .max_decoding_message_size(hcx_net::client::API_MESSAGE_LIMIT)
    .max_encoding_message_size(hcx_net::client::API_MESSAGE_LIMIT);
    let raft_rpc = RaftServer::new(service::RaftService {
        shared: shared.clone(),
    })
    .max_decoding_message_size(network::RAFT_MESSAGE_LIMIT)
    .max_encoding_message_size(network::RAFT_MESSAGE_LIMIT);
    let router = builder
        .add_service(InterceptedService::new(cluster, gate.clone()))
        .add_service(InterceptedService::new(raft_rpc, gate));
    let mut rx = shutdown_rx.clone();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let grpc = tokio::spawn(async move {
        let stop = async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
            tracing::error!("gRPC server stopped: {e}");
        }
    });
    let quic = dataplane::start(shared.clone(), addr, cfg.tls.as_ref())?;
    let sweep = tokio::spawn(supervisor::sweep(shared.clone(), shutdown_rx.clone()));
    let gauges = tokio::spawn(gauges::run(shared.clone(), shutdown_rx.clone()));
    let mut tasks = vec![grpc, quic, sweep, gauges];
    let mut dashboard_addr = None;
    if let Some(listen) = cfg.dashboard {
        let (bound, task) = dashboard::serve(
            shared.clone(),
            listen,
            cfg.tls.as_ref(),
            shutdown_rx.clone(),
        )
        .await?;
        dashboard_addr = Some(bound);
        tasks.push(task);
    }
    tasks.push(tokio::spawn(supervisor::run(shared.clone(), shutdown_rx)));
    Ok(CoordinatorHandle {
        shared,
        shutdown,
        tasks,
        addr,
        dashboard_addr,
    })
}

/// The host part of `host:port` (`[v6]:port` included).
pub(crate) fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// Whether a certificate's hosts (DNS names and IP addresses) include
/// `host`: names compared without case, addresses as addresses.
pub(crate) fn cert_serves(hosts: &[String], host: &str) -> bool {
    let ip: Option<std::net::IpAddr> = host.parse().ok();
    hosts
        .iter()
        .any(|h| match (ip, h.parse::<std::net::IpAddr>()) {
            (Some(a), Ok(b)) => a == b,
            (None, Err(_)) => h.eq_ignore_ascii_case(host),
            _ => false,
        })
}

#[cfg(test)]
mod raft_sender_tests {
    use super::*;

    #[test]
    fn hosts_are_read_from_addresses_and_matched_as_names_or_addresses() {
        assert_eq!(host_of("172.29.8.11:7101"), "172.29.8.11");
        assert_eq!(host_of("[::1]:7101"), "::1");
        assert_eq!(host_of("c1.hcx.svc:7101"), "c1.hcx.svc");
        let hosts = vec![
            "C1.hcx.svc".to_string(),
            "172.29.8.11".to_string(),
            "::1".into(),
        ];
        assert!(cert_serves(&hosts, "c1.hcx.svc"));
        assert!(cert_serves(&hosts, "172.29.8.11"));
        assert!(cert_serves(&hosts, "0:0:0:0:0:0:0:1"));
        assert!(!cert_serves(&hosts, "172.29.8.12"));
        assert!(!cert_serves(&hosts, "c2.hcx.svc"));
    }
}
