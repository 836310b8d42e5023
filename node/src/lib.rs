//! The worker agent: registers with the coordinators, heartbeats, and for
//! each shard it is given fetches the source tensors over QUIC, runs the
//! kernels, and uploads the shard file with its SHA-256. A shard of a
//! calibrated job comes with its collective group: the node links into the
//! group's ring on the node-to-node plane and runs the calibration as one
//! rank, writing its own shard.
//!
//! A shard the leader takes back (lease expired, job cancelled) disappears
//! from the heartbeat reply; the agent then drops its work on it. What to
//! do when is decided by [`agent::Agent`], a state machine without I/O;
//! [`run`] is the async shell that carries its actions out.

pub mod agent;
pub mod metered;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hcx_kernels::collective::Collective;
use hcx_net::client::{ClientError, CoordinatorClient};
use hcx_net::frames::{Reply, Request, read_frame, write_frame};
use hcx_net::peer::{PeerPlane, RingPlan};
use hcx_net::proto::{Assignment, Group, HeartbeatRequest, NodeInfo, ShardFailure, ShardProgress};
use hcx_net::tls::Identity;
use hcx_net::tls::Role;
use hcx_pipeline::PipelineError;
use hcx_pipeline::shard::{SourceTensor, encode_shard_reporting};
use hcx_protocol::JobSpec;
use hcx_protocol::metrics as names;
use tracing::Instrument;

use crate::agent::{Action, Agent, Event, WorkKey};
use tokio::io::AsyncReadExt;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

/// How a node runs.
#[derive(Clone)]
pub struct NodeConfig {
    /// Unique name.
    pub name: String,
    /// Coordinator addresses (`host:port`).
    pub coordinators: Vec<String>,
    /// Local address of its QUIC endpoint.
    pub listen: SocketAddr,
    /// Labels such as `site=a`.
    pub labels: BTreeMap<String, String>,
    /// Where shard files are built before upload.
    pub work_dir: PathBuf,
    /// TLS identity: a node certificate from `certs issue --role node`,
    /// which names this node (`name` must be that name) and carries its
    /// labels; `None` is `--insecure` (loopback only).
    pub tls: Option<Identity>,
    /// Cores offered (defaults to the machine's).
    pub cores: u32,
    /// Memory offered in bytes (defaults to the machine's).
    pub memory_bytes: u64,
    /// Time between heartbeats.
    pub heartbeat: Duration,
    /// How long a downloaded model or calibration file stays in the work
    /// dir after a job last used it ([`sweep_cache`]).
    pub cache_keep: Duration,
}

/// How long a downloaded model or calibration file stays cached by
/// default after its last use.
pub const DEFAULT_CACHE_KEEP: Duration = Duration::from_secs(24 * 3600);

/// How often a node sweeps its cache of downloaded inputs.
const CACHE_SWEEP_EVERY: Duration = Duration::from_secs(600);

/// Removes the downloaded inputs under `work_dir` that no job has used for
/// `keep` before `now`: sent models (`models/DIGEST`, whose `.complete`
/// marker every use touches), sent calibration files
/// (`calibration/SHA256`, touched on every use) and downloads left
/// unfinished (`*.partial`) as old. A job still reading a removed file
/// keeps its open handle; a later job downloads it again. Returns the
/// bytes freed.
pub fn sweep_cache(work_dir: &Path, keep: Duration, now: std::time::SystemTime) -> u64 {
    fn size(p: &Path) -> u64 {
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => std::fs::read_dir(p)
                .map(|d| d.flatten().map(|e| size(&e.path())).sum())
                .unwrap_or(0),
            Ok(m) => m.len(),
            Err(_) => 0,
        }
    }
    let old = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > keep))
    };
    let mut freed = 0;
    for kind in ["models", "calibration"] {
        let Ok(entries) = std::fs::read_dir(work_dir.join(kind)) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let partial = p.extension().is_some_and(|x| x == "partial");
            // A model folder's use is its marker's time; a folder without
            // one is a download that never finished.
            let used = if kind == "models" && !partial {
                p.join(".complete")
            } else {
                p.clone()
            };
            let stale = if used.exists() { old(&used) } else { old(&p) };
            if !stale {
                continue;
            }
            let bytes = size(&p);
            let gone = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            match gone {
                Ok(()) => {
                    tracing::info!(path = %p.display(), bytes, "removed a cached input no job used for {keep:?}");
                    freed += bytes;
                }
                Err(err) => {
                    tracing::warn!(path = %p.display(), "cannot remove a stale cached input: {err}")
                }
            }
        }
    }
    freed
}

/// Marks a cached input as used now, so the sweep keeps it.
fn touch(p: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(p) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A setting is wrong.
    #[error("{0}")]
    Config(String),
    /// The coordinators could not be used.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] hcx_net::tls::TlsError),
    /// The coordinators refused this node for good (its certificate was
    /// revoked, names another node, or does not carry a claimed label).
    #[error("the coordinators refused this node: {0}")]
    Refused(String),
}

/// Cores of this machine.
pub fn machine_cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Memory of this machine in bytes (from /proc/meminfo; 0 when unknown).
pub fn machine_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// GPUs the NVIDIA driver reports on this machine (empty without one).
pub fn detect_gpus() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/proc/driver/nvidia/gpus") else {
        return Vec::new();
    };
    let mut out: Vec<String> = rd
        .flatten()
        .map(|e| {
            let info = std::fs::read_to_string(e.path().join("information")).unwrap_or_default();
            let model = info
                .lines()
                .find_map(|l| l.strip_prefix("Model:"))
                .map(|m| m.trim().to_string())
                .unwrap_or_else(|| "NVIDIA GPU".into());
            format!("{model} ({})", e.file_name().to_string_lossy())
        })
        .collect();
    out.sort();
    out
}

struct Ctx {
    cfg: NodeConfig,
    client: CoordinatorClient,
    endpoint: quinn::Endpoint,
    peers: PeerPlane,
    one_at_a_time: Semaphore,
    /// Why the coordinators refused this node for good, once they have.
    refused: std::sync::Mutex<Option<String>>,
    /// How far each running shard has got, sent with every heartbeat.
    progress: Progress,
}

/// Each running shard's progress, by (job, shard, attempt).
type ProgressMap = BTreeMap<(String, u32, u32), ShardProgress>;

/// A handle on the node's progress reports.
#[derive(Clone, Default)]
struct Progress(Arc<std::sync::Mutex<ProgressMap>>);

impl Progress {
    fn with(&self, a: &Assignment, f: impl FnOnce(&mut ShardProgress)) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let e = m
            .entry((a.job_id.clone(), a.shard, a.attempt))
            .or_insert_with(|| ShardProgress {
                job_id: a.job_id.clone(),
                shard: a.shard,
                attempt: a.attempt,
                ..Default::default()
            });
        f(e);
    }

    /// The shard has moved on to `step`, with nothing through it yet.
    fn step(&self, a: &Assignment, step: &str) {
        self.with(a, |p| {
            p.step = step.into();
            p.tensors_done = 0;
            p.bytes_done = 0;
        });
    }

    /// One more tensor of `bytes` source bytes is through the current step.
    fn tensor(&self, a: &Assignment, bytes: u64) {
        self.with(a, |p| {
            p.tensors_done += 1;
            p.bytes_done += bytes;
        });
    }

    fn forget(&self, a: &Assignment) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&(a.job_id.clone(), a.shard, a.attempt));
    }

    fn report(&self) -> Vec<ShardProgress> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.values().cloned().collect()
    }
}

/// How long a rank waits for its ring neighbours to link up.
const RING_JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A shard whose work ended but which the leader still lists for this node
/// (its result or failure report did not get through) is started again
/// after this long.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Runs the agent until `stop` turns true.
pub async fn run(cfg: NodeConfig, mut stop: watch::Receiver<bool>) -> Result<(), NodeError> {
    std::fs::create_dir_all(&cfg.work_dir).map_err(|e| {
        NodeError::Config(format!(
            "cannot create the work dir {}: {e}",
            cfg.work_dir.display()
        ))
    })?;
    if let Some(id) = &cfg.tls {
        if id.role() != Role::Node {
            return Err(NodeError::Config(format!(
                "a node needs a node certificate; this one is {} {}'s",
                id.role(),
                id.name()
            )));
        }
        if id.name() != cfg.name {
            return Err(NodeError::Config(format!(
                "the node certificate is issued to {:?}, not {:?}",
                id.name(),
                cfg.name
            )));
        }
    } else {
        hcx_net::tls::check_insecure_addr(&cfg.listen)?;
        for c in &cfg.coordinators {
            hcx_net::tls::check_insecure_host(c)?;
        }
    }
    let client = CoordinatorClient::new(
        cfg.coordinators.clone(),
        cfg.tls.as_ref().map(hcx_net::tls::tonic_client_tls),
    )?;
    // One endpoint for both directions: out to the coordinators' data plane,
    // and in from other nodes (collective rings), which only nodes may join.
    let server = match &cfg.tls {
        Some(id) => hcx_net::tls::quinn_server_config(id)?,
        None => hcx_net::insecure::quinn_server_config()?,
    };
    let client_config = match &cfg.tls {
        Some(id) => hcx_net::tls::quinn_client_config(id)?,
        None => hcx_net::insecure::quinn_client_config()?,
    };
    let mut endpoint = hcx_net::tls::bulk_endpoint(cfg.listen, Some(server))
        .map_err(|e| NodeError::Config(format!("cannot bind {}: {e}", cfg.listen)))?;
    endpoint.set_default_client_config(client_config.clone());
    let bound = endpoint.local_addr().map_err(|e| {
        NodeError::Config(format!(
            "cannot read the address bound at {}: {e}",
            cfg.listen
        ))
    })?;
    // The address other nodes dial: the configured host with the port bound.
    let listen = SocketAddr::new(cfg.listen.ip(), bound.port());
    if let Some(id) = &cfg.tls
        && let Some(leaf) = id.cert_chain().first()
        && !cfg.listen.ip().is_unspecified()
        && !hcx_net::tls::cert_covers_ip(leaf, cfg.listen.ip())
    {
        tracing::warn!(
            "{}: the node certificate is not valid for {}, where the other ranks of a collective group dial this node: calibrated jobs will fail here until it is issued with `certs issue --role node --name {} --host {}`",
            cfg.name,
            cfg.listen.ip(),
            cfg.name,
            cfg.listen.ip()
        );
    }
    let peers = PeerPlane::new(endpoint.clone(), client_config, cfg.tls.is_some());
    tracing::info!(%listen, "serving the node-to-node plane");
    let ctx = Arc::new(Ctx {
        cfg: cfg.clone(),
        client,
        endpoint,
        peers,
        one_at_a_time: Semaphore::new(1),
        refused: std::sync::Mutex::new(None),
        progress: Progress::default(),
    });
    // The kernels go to the first CUDA device where this build and machine
    // have one (the same bytes as the CPU's, `hcx_kernels::gpu`).
    let gpu_kernels = match hcx_kernels::gpu::install() {
        Ok(device) => {
            tracing::info!("kernels run on {device}");
            device
        }
        Err(why) => {
            tracing::debug!("kernels run on the CPU: {why}");
            String::new()
        }
    };
    let info = NodeInfo {
        gpu_kernels,
        name: cfg.name.clone(),
        listen: listen.to_string(),
        cores: cfg.cores,
        memory_bytes: cfg.memory_bytes,
        gpus: detect_gpus(),
        labels: cfg.labels.clone().into_iter().collect(),
        nccl: match hcx_kernels::collective::nccl_devices() {
            Ok(n) => {
                tracing::info!("NCCL collectives available on {n} CUDA device(s)");
                true
            }
            Err(why) => {
                tracing::debug!("collective groups use the QUIC ring: {why}");
                false
            }
        },
    };
    // Downloaded inputs no job used for a while are swept from the work dir.
    let sweeper = {
        let (dir, keep, mut stop) = (cfg.work_dir.clone(), cfg.cache_keep, stop.clone());
        tokio::spawn(async move {
            loop {
                let (d, now) = (dir.clone(), std::time::SystemTime::now());
                let _ = tokio::task::spawn_blocking(move || sweep_cache(&d, keep, now)).await;
                tokio::select! {
                    _ = tokio::time::sleep(CACHE_SWEEP_EVERY) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    };
    // The shell: carry out the agent's actions, feed it what came of them,
    // and wait for the next tick, work end or stop.
    let mut agent = Agent::new(RETRY_AFTER);
    let mut tasks: HashMap<WorkKey, JoinHandle<()>> = HashMap::new();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<WorkKey>();
    let mut next = Event::Tick;
    loop {
        let stopping = matches!(next, Event::Stop);
        let mut events = VecDeque::from([next]);
        while let Some(event) = events.pop_front() {
            for action in agent.step(Instant::now(), event) {
                if let Some(e) = carry_out(&ctx, &info, &mut tasks, &ended_tx, action).await {
                    events.push_back(e);
                }
            }
        }
        let refused = ctx
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if stopping || refused {
            break;
        }
        next = tokio::select! {
            _ = tokio::time::sleep(cfg.heartbeat) => Event::Tick,
            _ = stop.changed() => Event::Stop,
            Some(k) = ended_rx.recv() => Event::WorkEnded(k),
        };
        if *stop.borrow() {
            next = Event::Stop;
        }
    }
    for (_, h) in tasks {
        h.abort();
    }
    sweeper.abort();
    ctx.endpoint.close(0u32.into(), b"node stopping");
    let refused = ctx.refused.lock().unwrap_or_else(|p| p.into_inner()).take();
    match refused {
        Some(why) => Err(NodeError::Refused(why)),
        None => Ok(()),
    }
}

/// Records that the coordinators refused this node for good; the node stops.
fn refuse(ctx: &Ctx, status: &tonic::Status) -> Event {
    let why = status.message().to_string();
    tracing::error!("{}: refused: {why}", ctx.cfg.name);
    *ctx.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    Event::Stop
}

/// Carries out one of the agent's actions; returns the event it led to.
async fn carry_out(
    ctx: &Arc<Ctx>,
    info: &NodeInfo,
    tasks: &mut HashMap<WorkKey, JoinHandle<()>>,
    ended: &mpsc::UnboundedSender<WorkKey>,
    action: Action,
) -> Option<Event> {
    let name = &ctx.cfg.name;
    match action {
        Action::Register => Some(
            match ctx
                .client
                .call(|mut c| {
                    let info = info.clone();
                    async move { c.register_node(info).await }
                })
                .await
            {
                Ok(_) => {
                    tracing::info!("{name} registered");
                    Event::Registered
                }
                Err(ClientError::Refused(s)) if s.code() == tonic::Code::PermissionDenied => {
                    refuse(ctx, &s)
                }
                Err(e) => {
                    tracing::warn!("{name}: cannot register yet: {e}");
                    Event::RegisterFailed
                }
            },
        ),
        Action::Heartbeat => Some(
            match ctx
                .client
                .call(|mut c| {
                    let name = name.clone();
                    let progress = ctx.progress.report();
                    async move { c.heartbeat(HeartbeatRequest { name, progress }).await }
                })
                .await
            {
                Ok(reply) => {
                    metrics::counter!(names::NODE_HEARTBEATS).increment(1);
                    ctx.peers.set_revoked(reply.revoked);
                    Event::Assignments(reply.assignments)
                }
                Err(ClientError::Refused(s)) if s.code() == tonic::Code::NotFound => Event::Unknown,
                Err(ClientError::Refused(s)) if s.code() == tonic::Code::PermissionDenied => {
                    refuse(ctx, &s)
                }
                Err(e) => {
                    tracing::warn!("{name}: heartbeat failed: {e}");
                    Event::HeartbeatFailed
                }
            },
        ),
        Action::Start(a) => {
            let k = agent::key_of(&a);
            let (ctx, ended) = (ctx.clone(), ended.clone());
            let key = k.clone();
            let span = tracing::info_span!(
                "shard",
                job = %a.job_id,
                shard = a.shard,
                attempt = a.attempt,
                node = %ctx.cfg.name
            );
            let handle = tokio::spawn(
                async move {
                    do_shard(ctx, a).await;
                    let _ = ended.send(key);
                }
                .instrument(span),
            );
            if let Some(old) = tasks.insert(k, handle) {
                old.abort();
            }
            None
        }
        Action::Abort(k) => {
            if let Some(h) = tasks.remove(&k) {
                h.abort();
            }
            None
        }
    }
}

/// Runs its closure when dropped.
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Where a shard step failed, and whether trying again could help.
struct ShardError {
    stage: String,
    reason: String,
    retryable: bool,
}

async fn do_shard(ctx: Arc<Ctx>, a: Assignment) {
    // A rank of a collective group starts at once: its peers wait for it.
    let _permit = match &a.group {
        Some(_) => None,
        None => match ctx.one_at_a_time.acquire().await {
            Ok(p) => Some(p),
            Err(_) => return,
        },
    };
    let started = Instant::now();
    let running = metrics::gauge!(names::NODE_RUNNING_SHARDS);
    running.increment(1.0);
    // Counted down and forgotten however the work ends, an abort included.
    let (progress, held) = (ctx.progress.clone(), a.clone());
    let _running = Defer(move || {
        running.decrement(1.0);
        progress.forget(&held);
    });
    tracing::info!(
        "{}: {} shard {} attempt {} ({} tensors)",
        ctx.cfg.name,
        a.job_id,
        a.shard,
        a.attempt,
        a.tensors.len()
    );
    let done = match &a.group {
        Some(g) => group_steps(&ctx, &a, g, started).await,
        None => shard_steps(&ctx, &a, started).await,
    };
    if let Err(e) = done {
        metrics::counter!(names::NODE_SHARDS, "outcome" => "failed").increment(1);
        tracing::warn!(
            "{}: {} shard {} failed at {}: {}",
            ctx.cfg.name,
            a.job_id,
            a.shard,
            e.stage,
            e.reason
        );
        let f = ShardFailure {
            job_id: a.job_id.clone(),
            shard: a.shard,
            attempt: a.attempt,
            node: ctx.cfg.name.clone(),
            reason: e.reason,
            stage: e.stage,
            retryable: e.retryable,
        };
        let _ = ctx
            .client
            .call(|mut c| {
                let f = f.clone();
                async move { c.report_failure(f).await }
            })
            .await;
    }
}

async fn connect(ctx: &Ctx, addr: &str) -> Result<quinn::Connection, String> {
    let sock: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?
        .find(|a| a.is_ipv4() == ctx.cfg.listen.is_ipv4())
        .ok_or_else(|| format!("{addr}: no address of the node's family"))?;
    let conn = ctx
        .endpoint
        .connect(sock, &hcx_net::tls::server_name(addr))
        .map_err(|e| format!("{addr}: {e}"))?
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    // The handshake checked that the certificate names the address; the
    // data plane is served by coordinators only.
    if ctx.cfg.tls.is_some() {
        hcx_net::tls::require_connection_role(&conn, Role::Coordinator)
            .map_err(|e| format!("{addr}: the server {e}"))?;
    }
    Ok(conn)
}

/// Most bytes of source tensors a node takes for one shard when it does not
/// know its memory (64 GiB); otherwise the memory it offers, capped at this.
const MAX_FETCH_BYTES: u64 = 64 << 30;

/// How many bytes of source tensors one shard may bring in: the memory the
/// node offers (the coordinators planned the shard to fit it), or
/// [`MAX_FETCH_BYTES`] when that is unknown (0), whichever is smaller.
fn fetch_limit(memory_bytes: u64) -> u64 {
    if memory_bytes == 0 {
        MAX_FETCH_BYTES
    } else {
        memory_bytes.min(MAX_FETCH_BYTES)
    }
}

/// Why a tensor header from the data plane was refused before any
/// allocation: a coordinator, hostile or corrupt, never makes a node
/// allocate more than it offers or panic on arithmetic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum AnnounceError {
    /// Shape × element size does not fit in 64 bits (or in memory addresses).
    #[error("tensor {name}: shape {shape:?} of {elem}-byte values overflows")]
    Overflow {
        /// Tensor name.
        name: String,
        /// The announced shape.
        shape: Vec<u64>,
        /// Bytes per value.
        elem: u64,
    },
    /// The announced length is not what the shape and dtype need.
    #[error("tensor {name}: {len} bytes announced, shape {shape:?} needs {expect}")]
    Mismatch {
        /// Tensor name.
        name: String,
        /// The announced length.
        len: u64,
        /// The announced shape.
        shape: Vec<u64>,
        /// Bytes the shape needs.
        expect: u64,
    },
    /// The tensor, or the shard's tensors so far, exceed what this node takes.
    #[error(
        "tensor {name}: {len} bytes would bring the shard to {total} bytes, over this node's \
         {limit}-byte limit (the memory it offers)"
    )]
    TooLarge {
        /// Tensor name.
        name: String,
        /// The announced length.
        len: u64,
        /// Bytes of the shard's tensors with this one.
        total: u64,
        /// The limit.
        limit: u64,
    },
}

/// Checks a [`Reply::Tensor`] header: the shape's size in checked
/// arithmetic must equal the announced `len`, and `len` must not exceed
/// `limit`. Returns the shape and the length as `usize`.
fn announced(
    name: &str,
    shape: &[u64],
    elem: u64,
    len: u64,
    limit: u64,
) -> Result<(Vec<usize>, usize), AnnounceError> {
    let overflow = || AnnounceError::Overflow {
        name: name.to_string(),
        shape: shape.to_vec(),
        elem,
    };
    let expect = shape
        .iter()
        .try_fold(elem, |acc, d| acc.checked_mul(*d))
        .ok_or_else(overflow)?;
    if len != expect {
        return Err(AnnounceError::Mismatch {
            name: name.to_string(),
            len,
            shape: shape.to_vec(),
            expect,
        });
    }
    if len > limit {
        return Err(AnnounceError::TooLarge {
            name: name.to_string(),
            len,
            total: len,
            limit,
        });
    }
    let dims = shape
        .iter()
        .map(|d| usize::try_from(*d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| overflow())?;
    let n = usize::try_from(len).map_err(|_| overflow())?;
    Ok((dims, n))
}

/// Bytes one shard may still fetch; shared by its concurrent fetches.
struct Budget {
    limit: u64,
    used: std::sync::atomic::AtomicU64,
}

impl Budget {
    /// A budget of `limit` bytes.
    fn new(limit: u64) -> Budget {
        Budget {
            limit,
            used: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Takes `len` bytes for tensor `name`, or says why not (nothing taken).
    fn take(&self, name: &str, len: u64) -> Result<(), AnnounceError> {
        use std::sync::atomic::Ordering;
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(len).filter(|t| *t <= self.limit)
            })
            .map(|_| ())
            .map_err(|used| AnnounceError::TooLarge {
                name: name.to_string(),
                len,
                total: used.saturating_add(len),
                limit: self.limit,
            })
    }
}

async fn fetch(
    conn: &quinn::Connection,
    node: &str,
    job: &str,
    name: &str,
    budget: &Budget,
) -> Result<SourceTensor, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(
        &mut send,
        &Request::Fetch {
            job: job.to_string(),
            tensor: name.to_string(),
            node: node.to_string(),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let _ = send.finish();
    match read_frame::<_, Reply>(&mut recv)
        .await
        .map_err(|e| e.to_string())?
    {
        Reply::Tensor { dtype, shape, len } => {
            let dt = hcx_pipeline::model::parse_dtype(&dtype)
                .ok_or_else(|| format!("tensor {name}: unknown dtype {dtype:?}"))?;
            let elem = dt.bitsize().div_ceil(8) as u64;
            let (shape, n) =
                announced(name, &shape, elem, len, budget.limit).map_err(|e| e.to_string())?;
            budget.take(name, len).map_err(|e| e.to_string())?;
            let mut raw = Vec::new();
            raw.try_reserve_exact(n)
                .map_err(|e| format!("tensor {name}: cannot allocate {n} bytes: {e}"))?;
            raw.resize(n, 0);
            AsyncReadExt::read_exact(&mut recv, &mut raw)
                .await
                .map_err(|e| format!("tensor {name}: {e}"))?;
            metrics::counter!(names::NODE_TENSORS_FETCHED).increment(1);
            metrics::counter!(names::NODE_FETCHED_BYTES).increment(n as u64);
            Ok(SourceTensor {
                name: name.to_string(),
                dtype: dt,
                shape,
                raw,
            })
        }
        Reply::Error { message, .. } => Err(format!("tensor {name}: {message}")),
        Reply::Stored => Err(format!("tensor {name}: unexpected reply")),
    }
}

fn retry(stage: &str, reason: String) -> ShardError {
    ShardError {
        stage: stage.to_string(),
        reason,
        retryable: true,
    }
}

fn job_spec(a: &Assignment) -> Result<JobSpec, ShardError> {
    serde_json::from_str(&a.spec_json).map_err(|e| ShardError {
        stage: "assignment".into(),
        reason: format!("the job spec does not parse: {e}"),
        retryable: false,
    })
}

/// One rank's part of a calibrated job: link into the group (the QUIC ring,
/// or NCCL where the leader chose it), run
/// the calibration (and distillation) with the other ranks, write this
/// rank's shard and upload it. The model and calibration files are read
/// from the paths in the job, which the coordinators confined to their
/// model roots, or, where the job sent them, from the cluster's copies
/// downloaded into the work dir. A federated job's site files are read
/// in place, at their site.
async fn group_steps(
    ctx: &Ctx,
    a: &Assignment,
    g: &Group,
    started: Instant,
) -> Result<(), ShardError> {
    let mut spec = job_spec(a)?;
    if let Some(sent) = &spec.model.sent {
        spec.model.local = Some(local_model(ctx, &a.job_id, sent).await?);
    }
    if let Some(c) = &mut spec.calibration
        && !c.sent.is_empty()
    {
        local_calibration(ctx, &a.job_id, c).await?;
    }
    let members = g
        .members
        .iter()
        .map(|m| m.parse::<SocketAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ShardError {
            stage: "assignment".into(),
            reason: format!("a group member's address does not parse: {e}"),
            retryable: false,
        })?;
    tracing::info!(
        "{}: {} rank {} of {} (epoch {}, {})",
        ctx.cfg.name,
        a.job_id,
        g.rank,
        members.len(),
        g.epoch,
        if g.backend.is_empty() {
            "ring"
        } else {
            &g.backend
        }
    );
    let ranks: Box<dyn Collective> = match g.backend.as_str() {
        "" | "ring" => {
            let plan = RingPlan {
                epoch: g.epoch,
                rank: g.rank as usize,
                members,
                names: g.names.clone(),
            };
            Box::new(
                ctx.peers
                    .join_ring(&plan, RING_JOIN_TIMEOUT)
                    .await
                    .map_err(|e| retry("collective", e.to_string()))?,
            )
        }
        "nccl" => nccl_member(ctx, a, g).await?,
        other => {
            return Err(ShardError {
                stage: "assignment".into(),
                reason: format!("unknown collective backend {other:?}"),
                retryable: false,
            });
        }
    };
    let mut ranks: Box<dyn Collective> = Box::new(metered::Metered(ranks));
    let path = ctx.cfg.work_dir.join(format!(
        "{}-shard-{:05}-a{}.bin",
        a.job_id, a.shard, a.attempt
    ));
    let (p, tensors) = (path.clone(), a.tensors.clone());
    // A federated job's ranks read their own site's files; others ignore sites.
    let sites = if spec.calibration.as_ref().is_some_and(|c| c.is_federated()) {
        g.sites.clone()
    } else {
        Vec::new()
    };
    let t0 = Instant::now();
    let span = tracing::Span::current();
    ctx.progress.step(a, "calibrate");
    let encoded = tokio::task::spawn_blocking(move || {
        let _in = span.enter();
        hcx_pipeline::calibrate::encode_group_shard(&spec, &mut *ranks, &sites, &tensors, &p)
    })
    .await
    .map_err(|e| retry("calibrate", e.to_string()))
    .and_then(|r| {
        r.map_err(|e| match e {
            PipelineError::Collective { .. } => retry("collective", e.to_string()),
            PipelineError::Io { .. } | PipelineError::Output { .. } => {
                retry("calibrate", e.to_string())
            }
            PipelineError::Tensor { ref tensor, .. } => ShardError {
                stage: format!("encode {tensor}"),
                reason: e.to_string(),
                retryable: false,
            },
            other => ShardError {
                stage: "calibrate".into(),
                reason: other.to_string(),
                retryable: false,
            },
        })
    });
    let summary = match encoded {
        Ok(s) => s,
        Err(e) => {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e);
        }
    };
    let kernel_seconds = t0.elapsed().as_secs_f64();
    ctx.progress.step(a, "upload");
    let conn = connect(ctx, &a.data_addr)
        .await
        .map_err(|e| retry("upload", e))?;
    let result = upload(
        ctx,
        conn,
        a,
        &path,
        &summary.sha256,
        summary.bytes,
        0,
        kernel_seconds,
        started.elapsed().as_secs_f64(),
    )
    .await;
    let _ = tokio::fs::remove_file(&path).await;
    result
}

/// Joins an NCCL group: rank 0 makes the NCCL unique id and publishes it
/// through the leader; the other ranks ask the leader for it until it is
/// there. Every rank then joins the communicator on its first GPU.
#[cfg(feature = "cuda")]
async fn nccl_member(
    ctx: &Ctx,
    a: &Assignment,
    g: &Group,
) -> Result<Box<dyn Collective>, ShardError> {
    use hcx_kernels::collective::nccl;
    use hcx_net::proto::{GroupToken, GroupTokenRef};
    let backend = |e: String| retry("collective", e);
    let world = g.members.len();
    let rank = g.rank as usize;
    let id: [u8; nccl::ID_BYTES] = if rank == 0 {
        let id = tokio::task::spawn_blocking(nccl::unique_id)
            .await
            .map_err(|e| backend(e.to_string()))?
            .map_err(|e| backend(e.to_string()))?;
        let token = GroupToken {
            job_id: a.job_id.clone(),
            epoch: g.epoch,
            node: ctx.cfg.name.clone(),
            nccl_id: id.to_vec(),
        };
        ctx.client
            .call(|mut c| {
                let t = token.clone();
                async move { c.publish_group_token(t).await }
            })
            .await
            .map_err(|e| backend(format!("publishing the NCCL id: {e}")))?;
        id
    } else {
        let ask = GroupTokenRef {
            job_id: a.job_id.clone(),
            epoch: g.epoch,
            node: ctx.cfg.name.clone(),
        };
        let deadline = Instant::now() + RING_JOIN_TIMEOUT;
        loop {
            let got = ctx
                .client
                .call(|mut c| {
                    let t = ask.clone();
                    async move { c.get_group_token(t).await }
                })
                .await;
            match got {
                Ok(t) => {
                    break t.nccl_id.as_slice().try_into().map_err(|_| {
                        backend(format!("an NCCL id of {} bytes", t.nccl_id.len()))
                    })?;
                }
                Err(ClientError::Refused(s))
                    if s.code() == tonic::Code::NotFound && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(backend(format!("waiting for the NCCL id: {e}"))),
            }
        }
    };
    let joined = tokio::task::spawn_blocking(move || {
        nccl::Nccl::join(rank, world, id, 0, RING_JOIN_TIMEOUT)
    })
    .await
    .map_err(|e| backend(e.to_string()))?
    .map_err(|e| backend(e.to_string()))?;
    Ok(Box::new(joined))
}

/// Without the `cuda` feature a node never offers NCCL, so the leader only
/// puts it in an NCCL group if it was registered by another build.
#[cfg(not(feature = "cuda"))]
async fn nccl_member(
    _ctx: &Ctx,
    _a: &Assignment,
    _g: &Group,
) -> Result<Box<dyn Collective>, ShardError> {
    Err(ShardError {
        stage: "collective".into(),
        reason: "the group sums through NCCL, but this node was built without the `cuda` feature"
            .into(),
        retryable: false,
    })
}

/// Downloads blob `sha256` (of job `job`'s inputs) from the coordinators
/// into `to`, checking the bytes against the hash as they arrive. `stage`
/// and `what` name it in errors.
async fn fetch_blob(
    ctx: &Ctx,
    job: &str,
    sha256: &str,
    to: &Path,
    stage: &str,
    what: &str,
) -> Result<(), ShardError> {
    use sha2::Digest;
    let io = |verb: &str, e: std::io::Error| retry(stage, format!("{}: {verb}: {e}", to.display()));
    let mut out = std::fs::File::create(to).map_err(|e| io("cannot create", e))?;
    let mut hash = sha2::Sha256::new();
    let mut stream = ctx
        .client
        .call(|mut c| {
            let r = hcx_net::proto::BlobRef {
                sha256: sha256.to_string(),
                offset: 0,
                job_id: job.to_string(),
                peer: false,
            };
            async move { c.get_blob(r).await }
        })
        .await
        .map_err(|e| retry(stage, format!("{what}: {e}")))?;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| retry(stage, format!("{what}: {}", s.message())))?
    {
        hash.update(&chunk.data);
        std::io::Write::write_all(&mut out, &chunk.data).map_err(|e| io("cannot write", e))?;
    }
    let got = hex::encode(hash.finalize());
    if got != sha256 {
        return Err(retry(
            stage,
            format!("{what}: received bytes hash to {got}, not {sha256}"),
        ));
    }
    Ok(())
}

/// The calibration files a job sent to the cluster, downloaded from the
/// coordinators into the work dir (`calibration/SHA256`, once per file
/// content) and checked against their hashes; every `text` or `sentences`
/// path of `c` then names its local copy.
async fn local_calibration(
    ctx: &Ctx,
    job: &str,
    c: &mut hcx_protocol::Calibration,
) -> Result<(), ShardError> {
    let dir = ctx.cfg.work_dir.join("calibration");
    std::fs::create_dir_all(&dir).map_err(|e| {
        retry(
            "calibration",
            format!("{}: cannot create: {e}", dir.display()),
        )
    })?;
    let mut local = std::collections::HashMap::new();
    for f in &c.sent {
        let at = hcx_protocol::Calibration::sent_path(&dir, f);
        if at.is_file() {
            touch(&at);
        } else {
            let tmp = dir.join(format!("{}.{job}.partial", f.sha256));
            let what = format!("calibration file {}", f.path.display());
            fetch_blob(ctx, job, &f.sha256, &tmp, "calibration", &what).await?;
            std::fs::rename(&tmp, &at).map_err(|e| {
                retry(
                    "calibration",
                    format!("{}: cannot rename: {e}", tmp.display()),
                )
            })?;
        }
        local.insert(f.path.clone(), at);
    }
    for files in c.shared_files_mut() {
        files.try_map(|p| {
            local.get(p).cloned().ok_or_else(|| ShardError {
                stage: "calibration".into(),
                reason: format!("calibration file {} was not sent", p.display()),
                retryable: false,
            })
        })?;
    }
    Ok(())
}

/// A model sent to the cluster, downloaded from the coordinators into the
/// work dir (once per model: the folder is named by the model's digest),
/// each file checked against its SHA-256; returns the path to read it at.
async fn local_model(
    ctx: &Ctx,
    job: &str,
    sent: &hcx_protocol::job::SentModel,
) -> Result<std::path::PathBuf, ShardError> {
    let dir = ctx.cfg.work_dir.join("models").join(sent.digest());
    let path = match &sent.file {
        Some(f) => dir.join(f),
        None => dir.clone(),
    };
    if dir.join(".complete").is_file() {
        touch(&dir.join(".complete"));
        return Ok(path);
    }
    let tmp = dir.with_extension(format!("{job}.partial"));
    let io = |what: &str, p: &Path, e: std::io::Error| {
        retry("model", format!("{}: {what}: {e}", p.display()))
    };
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
    for f in &sent.files {
        let what = format!("model file {}", f.name);
        fetch_blob(ctx, job, &f.sha256, &tmp.join(&f.name), "model", &what).await?;
    }
    std::fs::write(tmp.join(".complete"), b"").map_err(|e| io("cannot write", &tmp, e))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| io("cannot rename", &tmp, e))?;
    Ok(path)
}

async fn shard_steps(ctx: &Ctx, a: &Assignment, started: Instant) -> Result<(), ShardError> {
    let io = retry;
    let spec = job_spec(a)?;
    let conn = connect(ctx, &a.data_addr)
        .await
        .map_err(|e| io("fetch", e))?;
    let mut tensors = Vec::with_capacity(a.tensors.len());
    let mut bytes_in = 0u64;
    let budget = Budget::new(fetch_limit(ctx.cfg.memory_bytes));
    ctx.progress.step(a, "fetch");
    for chunk in a.tensors.chunks(4) {
        let got = futures::future::join_all(
            chunk
                .iter()
                .map(|n| fetch(&conn, &ctx.cfg.name, &a.job_id, n, &budget)),
        )
        .await;
        for t in got {
            let t = t.map_err(|e| io("fetch", e))?;
            bytes_in += t.raw.len() as u64;
            ctx.progress.tensor(a, t.raw.len() as u64);
            tensors.push(t);
        }
    }
    let path = ctx.cfg.work_dir.join(format!(
        "{}-shard-{:05}-a{}.bin",
        a.job_id, a.shard, a.attempt
    ));
    let p = path.clone();
    let t0 = Instant::now();
    let span = tracing::Span::current();
    ctx.progress.step(a, "encode");
    let (progress, held) = (ctx.progress.clone(), a.clone());
    let encoded = tokio::task::spawn_blocking(move || {
        let _in = span.enter();
        encode_shard_reporting(&spec, &tensors, &p, &|bytes| progress.tensor(&held, bytes))
    })
    .await
    .map_err(|e| io("encode", e.to_string()))
    .and_then(|r| {
        r.map_err(|e| match e {
            PipelineError::Tensor { ref tensor, .. } => ShardError {
                stage: format!("encode {tensor}"),
                reason: e.to_string(),
                retryable: false,
            },
            other => io("encode", other.to_string()),
        })
    });
    // A shard that could not be written (a full disk) leaves no partial
    // file to fill the disk for the next one.
    let summary = match encoded {
        Ok(s) => s,
        Err(e) => {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e);
        }
    };
    let kernel_seconds = t0.elapsed().as_secs_f64();
    ctx.progress.step(a, "upload");
    let result = upload(
        ctx,
        conn,
        a,
        &path,
        &summary.sha256,
        summary.bytes,
        bytes_in,
        kernel_seconds,
        started.elapsed().as_secs_f64(),
    )
    .await;
    let _ = tokio::fs::remove_file(&path).await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn upload(
    ctx: &Ctx,
    mut conn: quinn::Connection,
    a: &Assignment,
    path: &std::path::Path,
    sha256: &str,
    len: u64,
    bytes_in: u64,
    kernel_seconds: f64,
    wall_seconds: f64,
) -> Result<(), ShardError> {
    let io = |reason: String| ShardError {
        stage: "upload".into(),
        reason,
        retryable: true,
    };
    for _ in 0..4 {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| io(e.to_string()))?;
        let req = Request::Upload {
            job: a.job_id.clone(),
            shard: a.shard,
            attempt: a.attempt,
            node: ctx.cfg.name.clone(),
            sha256: sha256.to_string(),
            len,
            bytes_in,
            kernel_seconds,
            wall_seconds,
        };
        write_frame(&mut send, &req)
            .await
            .map_err(|e| io(e.to_string()))?;
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| io(format!("{}: {e}", path.display())))?;
        let sent = tokio::io::copy(&mut file, &mut send).await;
        let _ = send.finish();
        let reply = read_frame::<_, Reply>(&mut recv).await;
        match reply {
            Ok(Reply::Stored) => {
                // Counted here: once the shard is stored, the next
                // heartbeat may end this task before it returns.
                metrics::counter!(names::NODE_UPLOADED_BYTES).increment(len);
                metrics::counter!(names::NODE_SHARDS, "outcome" => "done").increment(1);
                tracing::info!("{}: {} shard {} stored", ctx.cfg.name, a.job_id, a.shard);
                return Ok(());
            }
            Ok(Reply::Error {
                leader: Some(addr),
                message,
            }) => {
                tracing::info!("{}: upload redirected: {message}", ctx.cfg.name);
                conn = connect(ctx, &addr).await.map_err(io)?;
            }
            Ok(Reply::Error { message, .. }) => return Err(io(message)),
            Ok(Reply::Tensor { .. }) => return Err(io("unexpected reply to an upload".into())),
            Err(e) => {
                let why = match sent {
                    Err(s) => format!("{e} (after a send error: {s})"),
                    Ok(_) => e.to_string(),
                };
                return Err(io(why));
            }
        }
    }
    Err(io("no leader took the upload after 4 tries".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_sweep_removes_only_inputs_unused_for_longer_than_kept() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        let day = Duration::from_secs(24 * 3600);
        let now = std::time::SystemTime::now();
        let at = |p: &Path, age: Duration| {
            let f = std::fs::File::open(p).unwrap();
            f.set_modified(now - age).unwrap();
        };
        let file = |p: &Path, bytes: usize, age: Duration| {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, vec![7u8; bytes]).unwrap();
            at(p, age);
        };
        // A model last used two days ago, one used an hour ago, one whose
        // download never finished two days ago, and one still arriving.
        file(&w.join("models/old/model.safetensors"), 100, Duration::ZERO);
        file(&w.join("models/old/.complete"), 0, 2 * day);
        file(&w.join("models/new/model.safetensors"), 100, 2 * day);
        file(
            &w.join("models/new/.complete"),
            0,
            Duration::from_secs(3600),
        );
        file(
            &w.join("models/gone.j1.partial/model.safetensors"),
            10,
            2 * day,
        );
        at(&w.join("models/gone.j1.partial"), 2 * day);
        file(
            &w.join("models/fresh.j2.partial/model.safetensors"),
            10,
            Duration::ZERO,
        );
        file(&w.join("calibration/aaaa"), 30, 2 * day);
        file(&w.join("calibration/bbbb"), 30, Duration::from_secs(60));
        let freed = sweep_cache(w, day, now);
        assert_eq!(freed, 100 + 10 + 30);
        assert!(!w.join("models/old").exists());
        assert!(!w.join("models/gone.j1.partial").exists());
        assert!(!w.join("calibration/aaaa").exists());
        for kept in ["models/new", "models/fresh.j2.partial", "calibration/bbbb"] {
            assert!(w.join(kept).exists(), "{kept}");
        }
        // Using a cached input keeps it another `keep`.
        touch(&w.join("models/new/.complete"));
        assert_eq!(
            sweep_cache(w, Duration::from_secs(1800), now + Duration::from_secs(60)),
            0
        );
        assert!(w.join("models/new").exists());
        // A work dir without a cache is no error.
        assert_eq!(sweep_cache(&w.join("none"), day, now), 0);
    }

    #[test]
    fn announced_shapes_use_checked_arithmetic() {
        // What an honest coordinator sends.
        assert_eq!(
            announced("w", &[3, 4], 2, 24, 1 << 20),
            Ok((vec![3, 4], 24))
        );
        assert_eq!(announced("s", &[], 4, 4, 4), Ok((vec![], 4)));
        // A shape whose size overflows u64 is an error, not a panic or a wrap.
        let e = announced("w", &[u64::MAX, 2], 2, 0, u64::MAX).unwrap_err();
        assert!(matches!(e, AnnounceError::Overflow { .. }), "{e}");
        assert!(e.to_string().contains("overflows"), "{e}");
        // 2^63 values of 2 bytes wrap to 0 in u64: still an overflow.
        let e = announced("w", &[1 << 63], 2, 0, u64::MAX).unwrap_err();
        assert!(matches!(e, AnnounceError::Overflow { .. }), "{e}");
        // A length that does not match the shape.
        let e = announced("w", &[3, 4], 2, 25, 1 << 20).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor w: 25 bytes announced, shape [3, 4] needs 24"
        );
    }

    #[test]
    fn announced_lengths_are_bounded() {
        // Consistent with its shape, but more than the node takes.
        let huge = 1u64 << 45;
        let e = announced("emb", &[1 << 43, 2], 2, huge, fetch_limit(1 << 30)).unwrap_err();
        assert!(matches!(e, AnnounceError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("1073741824-byte limit"), "{e}");
        assert_eq!(fetch_limit(0), MAX_FETCH_BYTES);
        assert_eq!(fetch_limit(u64::MAX), MAX_FETCH_BYTES);
        // The shard's tensors together are bounded too.
        let b = Budget::new(100);
        assert!(b.take("a", 60).is_ok());
        let e = b.take("b", 41).unwrap_err();
        assert!(e.to_string().contains("101 bytes"), "{e}");
        assert!(b.take("b", 40).is_ok());
        assert!(b.take("c", u64::MAX).is_err());
    }
}
