//! The coordinator's gRPC services: the cluster API for clients and nodes,
//! and the raft RPCs between coordinators.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use hcx_net::proto::cluster_server::Cluster;
use hcx_net::proto::raft_server::Raft as RaftRpc;
use hcx_net::proto::{
    Ack, ArtifactFile, Assignment, BlobChunk, BlobHave, BlobRef, ClusterInfoReply,
    ClusterInfoRequest, DrainNodeRequest, Group, GroupToken, GroupTokenRef, HeartbeatReply,
    HeartbeatRequest, JobRef, JobStatus, ListJobsReply, ListJobsRequest, ListNodesReply,
    ListNodesRequest, MembershipChange, NodeInfo, NodeStatus, RaftMessage, RevokeRequest,
    ShardFailure, ShardStatus, SnapshotChunk, SubmitJobReply, SubmitJobRequest,
};
use hcx_protocol::JobSpec;
use tonic::{Request, Response, Status};

use hcx_net::certs::CertFacts;
use hcx_net::tls::Role;

use crate::Shared;
use crate::network::SnapshotHeader;
use crate::scheduler::{self, NodeCapacity, PlanOptions, TensorCost};
use crate::state::{Command, JobRecord, JobState, NodeRecord, key_conflict, spec_digest};

/// The cluster API.
#[derive(Clone)]
pub struct ClusterService {
    pub(crate) shared: Arc<Shared>,
}

/// The raft RPC endpoint.
#[derive(Clone)]
pub struct RaftService {
    pub(crate) shared: Arc<Shared>,
}

/// A job's state as the API reports it.
pub fn job_status(j: &JobRecord) -> JobStatus {
    let (reason, failed_stage, source_bytes, artifact_bytes) = match &j.state {
        JobState::Failed { reason, stage } => (reason.clone(), stage.clone(), 0, 0),
        JobState::Succeeded {
            artifact_bytes,
            source_bytes,
        } => (String::new(), String::new(), *source_bytes, *artifact_bytes),
        _ => Default::default(),
    };
    JobStatus {
        job_id: j.id.clone(),
        name: j.spec.name.clone(),
        state: j.state.name().into(),
        reason,
        failed_stage,
        output: j.output.clone(),
        shards_done: j.done() as u32,
        shards_total: j.shards.len() as u32,
        shards: j
            .shards
            .iter()
            .map(|s| ShardStatus {
                id: s.shard.id,
                label: s.shard.label.clone(),
                tensors: s.shard.tensors.len() as u32,
                node: s
                    .result
                    .as_ref()
                    .map(|r| r.node.clone())
                    .or_else(|| s.node.clone())
                    .unwrap_or_default(),
                attempt: s.attempt,
                done: s.result.is_some(),
                last_error: s.last_error.clone().unwrap_or_default(),
                kernel_seconds: s.result.as_ref().map_or(0.0, |r| r.kernel_seconds),
                bytes_in: s.result.as_ref().map_or(0, |r| r.bytes_in),
                bytes_out: s.result.as_ref().map_or(0, |r| r.bytes),
                ..Default::default()
            })
            .collect(),
        source_bytes,
        artifact_bytes,
        in_cluster: j.in_cluster(),
        artifact: j
            .artifact
            .iter()
            .map(|f| ArtifactFile {
                name: f.name.clone(),
                sha256: f.sha256.clone(),
                bytes: f.bytes,
            })
            .collect(),
        submitted_ms: j.submitted_ms,
        finished_ms: j.finished_ms.unwrap_or(0),
        gates: j.gate_notes.clone(),
        raises: j.raises,
    }
}

/// The planner's options for a job (its `placement` section).
pub fn plan_options(spec: &JobSpec) -> PlanOptions {
    let p = spec.placement.clone().unwrap_or(hcx_protocol::Placement {
        labels: BTreeMap::new(),
        layers_per_shard: None,
    });
    PlanOptions {
        layers_per_shard: p.layers_per_shard.unwrap_or(1).max(1),
        require_labels: p.labels,
        sites: spec
            .calibration
            .as_ref()
            .map(|c| c.sites.keys().cloned().collect())
            .unwrap_or_default(),
    }
}

/// The planner's view of a model's tensors under `spec`: sizes and each
/// chain's relative cost (integer tensors are copied and cost nothing).
pub fn tensor_costs(
    tensors: &[hcx_pipeline::model::TensorInfo],
    spec: &JobSpec,
) -> Vec<TensorCost> {
    tensors
        .iter()
        .map(|t| TensorCost {
            name: t.name.clone(),
            numel: t.numel() as u64,
            bytes: t.bytes() as u64,
            cost_per_value: if t.is_integer() {
                0.0
            } else {
                chain_cost(&spec.stages_for(&t.name))
            },
            // A tensor smaller than the kernels hand to a device stays on
            // the CPU of a GPU node too.
            gpu_cost_per_value: if t.is_integer() || t.numel() < hcx_kernels::gpu::MIN_VALUES {
                0.0
            } else {
                chain_gpu_cost(&spec.stages_for(&t.name))
            },
            working_values: {
                let w = hcx_pipeline::run::working_values(
                    t,
                    &spec.stages_for(&t.name),
                    spec.calibration.is_some(),
                );
                (w < t.numel()).then_some(w as u64)
            },
        })
        .collect()
}

/// Relative encode cost per value of a stage chain (1.0 = int8 round-to-nearest).
pub fn chain_cost(stages: &[hcx_protocol::StageSpec]) -> f64 {
    use hcx_protocol::StageSpec as S;
    stages
        .iter()
        .map(|s| match s {
            S::Seedlm(_) => 400.0,
            S::Vq(_) => 30.0,
            S::Lowrank(_) => 10.0,
            S::Gptq(_) => 20.0,
            S::Uniform(_) | S::Nonuniform(_) => 6.0,
            S::Zstd(_) => 4.0,
            S::Rans(_) => 0.5,
            S::Rtn(_) | S::Ternary(_) | S::Sparse(_) => 1.0,
            S::Hadamard(_) | S::Cast(_) | S::Correction(_) => 0.5,
        })
        .sum()
}

/// The part of [`chain_cost`] in stages a GPU node runs on its device.
pub fn chain_gpu_cost(stages: &[hcx_protocol::StageSpec]) -> f64 {
    use hcx_protocol::StageSpec as S;
    let gpu: Vec<hcx_protocol::StageSpec> = stages
        .iter()
        .filter(|s| matches!(s, S::Hadamard(_)))
        .cloned()
        .collect();
    chain_cost(&gpu)
}

impl ClusterService {
    async fn submit(&self, req: SubmitJobRequest) -> Result<SubmitJobReply, Status> {
        let sh = &self.shared;
        sh.require_leader()?;
        let key = (!req.idempotency_key.is_empty()).then(|| req.idempotency_key.clone());
        let file = if req.file_name.is_empty() {
            PathBuf::from("job.yaml")
        } else {
            PathBuf::from(&req.file_name)
        };
        let base = PathBuf::from(if req.base_dir.is_empty() {
            "."
        } else {
            &req.base_dir
        });
        let mut spec = if req.spec_json.is_empty() {
            JobSpec::parse(&req.yaml, &file, &base)
                .map_err(|e| Status::invalid_argument(e.to_string()))?
        } else {
            let spec: JobSpec = serde_json::from_str(&req.spec_json)
                .map_err(|e| Status::invalid_argument(format!("job spec: {e}")))?;
            spec.validate().map_err(|(field, msg)| {
                Status::invalid_argument(format!("job spec: field {field}: {msg}"))
            })?;
            spec
        };
        if spec.target.is_some() {
            return Err(Status::invalid_argument(format!(
                "job `{}` has a `target`, which is resolved into per-tensor rates where the model is read before submitting (hcx-cluster submit does it)",
                spec.name
            )));
        }
        if spec.model.path.is_relative() {
            spec.model.path = base.join(&spec.model.path);
        }
        if spec.output.is_relative() {
            spec.output = base.join(&spec.output);
        }
        if !req.output.is_empty() {
            spec.output = base.join(&req.output);
        }
        // A coordinator with no --output-root keeps every artifact in the
        // cluster.
        let in_cluster = req.in_cluster || !sh.roots.writes_outputs();
        // Only inside this coordinator's roots, checked before anything is
        // created; the job keeps the resolved paths.
        // Calibration files are read by the group's nodes: model roots too.
        // A federated job's site files are read only at their sites, so
        // this coordinator does not look for them.
        if let Some(c) = &mut spec.calibration {
            for f in c.files_mut() {
                f.resolve(&base);
            }
        }
        let roots = sh.roots.clone();
        let (model, output) = (spec.model.clone(), spec.output.clone());
        let calibration = spec.calibration.clone();
        let (model, output, calibration, in_place) = tokio::task::spawn_blocking(move || {
            let mut calibration = calibration;
            // Sent files are read from the blobs; the others in place,
            // inside the model roots (asked for below when they are not).
            let mut in_place = Ok(());
            if let Some(c) = &mut calibration
                && c.sent.is_empty()
            {
                for f in c.shared_files_mut() {
                    if let Err(e) = f.try_map(|p| roots.calibration(p)) {
                        in_place = Err(e);
                        break;
                    }
                }
            }
            let output = if in_cluster {
                None
            } else {
                Some(roots.output(&output)?)
            };
            // A sent model is read from the blobs; one read in place must
            // lie inside the model roots (a model that is not `shared`
            // and cannot be read here is asked for below).
            let model = if model.sent.is_some() {
                Ok(None)
            } else {
                roots.model(&model.path).map(Some)
            };
            Ok((model, output, calibration, in_place))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e: crate::roots::RootError| Status::permission_denied(e.to_string()))?;
        // Inputs the coordinators cannot read in place are asked for, both
        // at once, unless the job says its storage is shared.
        let calibration_wanted = match in_place {
            Ok(()) => None,
            Err(e) if !spec.model.shared => Some(e.to_string()),
            Err(e) => return Err(Status::permission_denied(e.to_string())),
        };
        let wanted = |why: String| SubmitJobReply {
            model_wanted: true,
            calibration_wanted: calibration_wanted.is_some(),
            why: match &calibration_wanted {
                Some(c) => format!("{why}; {c}"),
                None => why,
            },
            ..Default::default()
        };
        let local = match model {
            Ok(Some(p)) => {
                spec.model.path = p.clone();
                p
            }
            Ok(None) => sh
                .model_path(&spec)
                .await
                .map_err(|e| Status::failed_precondition(format!("the sent model: {e}")))?,
            Err(e) if !spec.model.shared => return Ok(wanted(e.to_string())),
            Err(e) => return Err(Status::permission_denied(e.to_string())),
        };
        if let Some(why) = calibration_wanted {
            return Ok(SubmitJobReply {
                calibration_wanted: true,
                why,
                ..Default::default()
            });
        }
        if let Some(c) = &calibration {
            for f in &c.sent {
                sh.ensure_blob(&f.sha256).await.map_err(|e| {
                    Status::failed_precondition(format!(
                        "the sent calibration file {}: {e}",
                        f.path.display()
                    ))
                })?;
            }
        }
        if let Some(o) = output {
            spec.output = o;
        }
        spec.calibration = calibration;
        let output = if in_cluster {
            String::new()
        } else {
            spec.output.display().to_string()
        };
        // A key seen before answers with its job when the resolved spec is
        // the same (a retried submit; its output may exist by now), and is
        // refused when it is not.
        if let Some(k) = &key {
            let known = sh.view.read(|s| {
                let id = s.keys.get(k)?;
                let j = s.jobs.get(id)?;
                // The stored spec's digest only when it differs.
                let theirs =
                    (j.spec != spec || j.output != output).then(|| spec_digest(&j.spec, &j.output));
                Some((id.clone(), theirs))
            });
            match known {
                Some((id, None)) => {
                    return Ok(SubmitJobReply {
                        job_id: id,
                        existing: true,
                        ..Default::default()
                    });
                }
                Some((id, Some(theirs))) => {
                    return Err(Status::already_exists(key_conflict(
                        k,
                        &id,
                        &theirs,
                        &spec_digest(&spec, &output),
                    )));
                }
                None => {}
            }
        }
        if !in_cluster {
            let out = spec.output.clone();
            tokio::task::spawn_blocking(move || hcx_pipeline::run::check_output(&out))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let model = match sh.model(&local).await {
            Ok(m) => m,
            Err(e) if !spec.model.shared && spec.model.sent.is_none() => {
                return Ok(wanted(e.to_string()));
            }
            Err(e) => return Err(Status::invalid_argument(e.to_string())),
        };
        let tensors = tensor_costs(&model.tensors, &spec);
        let opts = plan_options(&spec);
        let shards = scheduler::make_shards(&tensors, &opts);
        // A job no registered node could ever take is refused now rather
        // than left waiting; with no node registered yet it waits for one.
        let registered: Vec<NodeCapacity> = sh.view.read(|s| {
            s.nodes
                .values()
                .filter(|n| !n.draining)
                .map(capacity)
                .collect()
        });
        let group = spec.calibration.is_some();
        let placeable = if group {
            let need = shards
                .iter()
                .fold(0u64, |acc, u| acc.saturating_add(u.memory_bytes));
            scheduler::group_members(&registered, &opts, need, shards.len()).map(|_| ())
        } else {
            scheduler::place(&shards, &registered, &opts, &BTreeMap::new()).map(|_| ())
        };
        if !registered.is_empty()
            && let Err(e) = placeable
        {
            return Err(Status::failed_precondition(format!(
                "job `{}` cannot be placed: {e}",
                spec.name
            )));
        }
        let nodes = sh.live_nodes();
        // A group job is placed when the supervisor forms its group.
        let placements = if nodes.is_empty() || group {
            Vec::new()
        } else {
            scheduler::place(&shards, &nodes, &opts, &BTreeMap::new()).unwrap_or_default()
        };
        let r = sh
            .propose(Command::SubmitJob {
                idempotency_key: key,
                spec: Box::new(spec),
                output,
                shards,
                placements,
                now_ms: crate::now_ms(),
            })
            .await?;
        if !r.ok {
            return Err(Status::failed_precondition(r.message));
        }
        Ok(SubmitJobReply {
            existing: !r.message.is_empty(),
            job_id: r.job.unwrap_or_default(),
            ..Default::default()
        })
    }
}

/// A registering node's labels under TLS (`certified` is what its
/// certificate says): the certificate's labels, `site` included, are the
/// node's labels. A claimed label must be one of them with the same value,
/// so that a site's data is never handed to a node merely saying it
/// belongs there. Without TLS (loopback only) the claim is all there is.
pub fn certified_labels(
    node: &str,
    claimed: BTreeMap<String, String>,
    certified: Option<&BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>, String> {
    let Some(certified) = certified else {
        return Ok(claimed);
    };
    for (k, v) in &claimed {
        match certified.get(k) {
            Some(c) if c == v => {}
            Some(c) => {
                return Err(format!(
                    "RegisterNode: node {node:?} claims {k}={v}, but its certificate says {k}={c}"
                ));
            }
            None => {
                return Err(format!(
                    "RegisterNode: node {node:?} claims {k}={v}, but its certificate carries no {k} label; a node's labels come from its certificate (`certs issue --role node --name {node} --label {k}={v}`)"
                ));
            }
        }
    }
    Ok(certified.clone())
}

/// Checks the caller's certificate role (and that it is not revoked);
/// returns what the certificate says (`None` under `--insecure`).
fn role<T>(
    sh: &Shared,
    req: &Request<T>,
    allowed: &[Role],
    call: &str,
) -> Result<Option<CertFacts>, Status> {
    let certs = req.peer_certs();
    sh.require_role(certs.as_deref().map(|v| v.as_slice()), allowed, call)
}

const OPERATORS: &[Role] = &[Role::Client, Role::Coordinator];
const NODES: &[Role] = &[Role::Node];

type StatusStream = Pin<Box<dyn Stream<Item = Result<JobStatus, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<BlobChunk, Status>> + Send>>;

fn blob_status(e: crate::blobs::BlobError) -> Status {
    match e {
        crate::blobs::BlobError::Io { .. } => Status::internal(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

impl ClusterService {
    /// Takes a blob's chunks; see `PutBlob` in the proto.
    async fn put_blob(
        &self,
        peer_ok: bool,
        mut stream: tonic::Streaming<BlobChunk>,
    ) -> Result<BlobHave, Status> {
        let sh = &self.shared;
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("PutBlob: the stream held no chunk"))?;
        let (sha, total, peer) = (first.sha256.clone(), first.total, first.peer);
        if peer && !peer_ok {
            return Err(Status::permission_denied(
                "PutBlob: a peer copy needs a coordinator certificate",
            ));
        }
        if !peer {
            sh.require_leader()?;
        }
        let store = sh.blobs.clone();
        let s = sha.clone();
        let (mut held, complete) = tokio::task::spawn_blocking(move || store.held(&s))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(blob_status)?;
        if complete {
            sh.blobs.touch(&sha);
        }
        let mut next = Some(first);
        while let Some(c) = next.take() {
            if c.sha256 != sha || c.total != total {
                return Err(Status::invalid_argument(format!(
                    "PutBlob: a chunk of {} ({} bytes) in the stream of {sha} ({total} bytes)",
                    c.sha256, c.total
                )));
            }
            if !complete {
                metrics::counter!(hcx_protocol::metrics::BLOB_RECEIVED_BYTES)
                    .increment(c.data.len() as u64);
                let store = sh.blobs.clone();
                let s = sha.clone();
                held = tokio::task::spawn_blocking(move || {
                    store.write(&s, c.total, c.offset, &c.data)
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(blob_status)?;
            }
            next = match stream.message().await {
                Ok(c) => c,
                // The sender went away: what arrived stays for it to resume.
                Err(e) => {
                    tracing::info!("PutBlob {sha}: the stream broke at {held} bytes: {e}");
                    None
                }
            };
        }
        if !complete {
            if held < total {
                return Ok(BlobHave {
                    sha256: sha,
                    held,
                    complete: false,
                    replicas: 0,
                    voters: 0,
                });
            }
            let store = sh.blobs.clone();
            let s = sha.clone();
            tokio::task::spawn_blocking(move || store.finish(&s, total))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::data_loss(e.to_string()))?;
        }
        let (replicas, voters) = if peer {
            (1, 1)
        } else {
            sh.replicate(&sha, total).await?
        };
        Ok(BlobHave {
            sha256: sha,
            held: total,
            complete: true,
            replicas,
            voters,
        })
    }

    /// Streams a blob; see `GetBlob` in the proto. `node` is the calling
    /// node's certified name.
    async fn get_blob(&self, r: BlobRef, node: Option<String>) -> Result<ChunkStream, Status> {
        let sh = &self.shared;
        if let Some(node) = &node {
            let allowed = sh.view.read(|s| {
                s.jobs.get(&r.job_id).is_some_and(|j| {
                    j.state.is_active()
                        && j.shards
                            .iter()
                            .any(|x| x.result.is_none() && x.node.as_deref() == Some(node))
                        && j.spec.sent_blobs().iter().any(|(sha, _)| *sha == r.sha256)
                })
            });
            if !allowed {
                return Err(Status::permission_denied(format!(
                    "GetBlob: node {node:?} holds no running shard of {:?} whose model or calibration data has blob {}",
                    r.job_id, r.sha256
                )));
            }
        }
        if !r.peer {
            sh.ensure_blob(&r.sha256).await.map_err(Status::not_found)?;
        } else if sh.blobs.has(&r.sha256).map_err(blob_status)?.is_none() {
            return Err(Status::not_found(format!(
                "blob {} is not on this coordinator",
                r.sha256
            )));
        }
        let rx = crate::transfer::chunks(&sh.blobs, &r.sha256, r.offset, false)?;
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn blob_status(&self, req: Request<BlobRef>) -> Result<Response<BlobHave>, Status> {
        role(&self.shared, &req, OPERATORS, "BlobStatus")?;
        let r = req.into_inner();
        // A sender's resume point is the leader's copy, which is where its
        // PutBlob goes; a peer asks the copy it is about to extend.
        if !r.peer {
            self.shared.require_leader()?;
        }
        let sha = r.sha256;
        let (held, complete) = self.shared.blobs.held(&sha).map_err(blob_status)?;
        Ok(Response::new(BlobHave {
            sha256: sha,
            held,
            complete,
            replicas: 0,
            voters: 0,
        }))
    }

    async fn put_blob(
        &self,
        req: Request<tonic::Streaming<BlobChunk>>,
    ) -> Result<Response<BlobHave>, Status> {
        let facts = role(&self.shared, &req, OPERATORS, "PutBlob")?;
        let peer_ok = facts.is_none_or(|f| f.role == Role::Coordinator);
        ClusterService::put_blob(self, peer_ok, req.into_inner())
            .await
            .map(Response::new)
    }

    type GetBlobStream = ChunkStream;

    async fn get_blob(&self, req: Request<BlobRef>) -> Result<Response<ChunkStream>, Status> {
        let facts = role(
            &self.shared,
            &req,
            &[Role::Client, Role::Coordinator, Role::Node],
            "GetBlob",
        )?;
        let r = req.into_inner();
        if r.peer && facts.as_ref().is_some_and(|f| f.role != Role::Coordinator) {
            return Err(Status::permission_denied(
                "GetBlob: a peer copy needs a coordinator certificate",
            ));
        }
        let node = facts.filter(|f| f.role == Role::Node).map(|f| f.name);
        ClusterService::get_blob(self, r, node)
            .await
            .map(Response::new)
    }

    async fn submit_job(
        &self,
        req: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobReply>, Status> {
        role(&self.shared, &req, OPERATORS, "SubmitJob")?;
        self.submit(req.into_inner()).await.map(Response::new)
    }

    async fn get_job(&self, req: Request<JobRef>) -> Result<Response<JobStatus>, Status> {
        let id = req.into_inner().job_id;
        self.shared.linearizable_read().await?;
        self.shared
            .view
            .read(|s| s.jobs.get(&id).map(|j| self.shared.status_of(j)))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no job {id:?}")))
    }

    async fn list_jobs(
        &self,
        _req: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsReply>, Status> {
        self.shared.linearizable_read().await?;
        let jobs = self.shared.view.read(|s| {
            s.jobs
                .values()
                .rev()
                .map(|j| self.shared.status_of(j))
                .collect()
        });
        Ok(Response::new(ListJobsReply { jobs }))
    }

    type WatchJobStream = StatusStream;

    async fn watch_job(
        &self,
        req: Request<JobRef>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = req.into_inner().job_id;
        // The first status sent is linearizable; later ones follow this
        // coordinator's applied state, which only moves forward.
        self.shared.linearizable_read().await?;
        let view = self.shared.view.clone();
        if view.read(|s| !s.jobs.contains_key(&id)) {
            return Err(Status::not_found(format!("no job {id:?}")));
        }
        let mut changes = view.changes();
        let shared = self.shared.clone();
        let stream = async_stream(move |tx| async move {
            let mut last: Option<JobStatus> = None;
            // Progress reports arrive with heartbeats, not commits: look
            // again at least this often.
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                let Some(now) = view.read(|s| s.jobs.get(&id).map(|j| shared.status_of(j))) else {
                    return;
                };
                let ended = !matches!(now.state.as_str(), "running" | "merging");
                if last.as_ref() != Some(&now) {
                    if tx.send(Ok(now.clone())).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
                if ended {
                    return;
                }
                tokio::select! {
                    c = changes.changed() => if c.is_err() { return },
                    _ = tick.tick() => {}
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_job(&self, req: Request<JobRef>) -> Result<Response<Ack>, Status> {
        role(&self.shared, &req, OPERATORS, "CancelJob")?;
        self.shared.require_leader()?;
        let job = req.into_inner().job_id;
        let r = self
            .shared
            .propose(Command::CancelJob {
                job,
                now_ms: crate::now_ms(),
            })
            .await?;
        if r.ok {
            Ok(Response::new(Ack {
                message: "cancelled".into(),
            }))
        } else {
            Err(Status::failed_precondition(r.message))
        }
    }

    async fn list_nodes(
        &self,
        _req: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesReply>, Status> {
        let sh = &self.shared;
        // Heartbeat times live at the leader only.
        sh.require_leader()?;
        let seen = sh.seen_ago();
        let nodes = sh.view.read(|s| {
            s.nodes
                .values()
                .map(|n| NodeStatus {
                    info: Some(node_info(n)),
                    draining: n.draining,
                    last_seen_ms_ago: seen.get(&n.name).copied(),
                    shards: s.assignments_of(&n.name).len() as u32,
                })
                .collect()
        });
        Ok(Response::new(ListNodesReply { nodes }))
    }

    async fn drain_node(&self, req: Request<DrainNodeRequest>) -> Result<Response<Ack>, Status> {
        role(&self.shared, &req, OPERATORS, "DrainNode")?;
        self.shared.require_leader()?;
        let DrainNodeRequest { name, resume } = req.into_inner();
        let r = self
            .shared
            .propose(Command::DrainNode {
                name: name.clone(),
                draining: !resume,
            })
            .await?;
        if r.ok {
            Ok(Response::new(Ack {
                message: if resume {
                    format!("{name} takes new shards again")
                } else {
                    format!("{name} is draining: it finishes its shards and gets no new ones")
                },
            }))
        } else {
            Err(Status::not_found(r.message))
        }
    }

    async fn register_node(&self, req: Request<NodeInfo>) -> Result<Response<Ack>, Status> {
        let sh = &self.shared;
        let cert = role(sh, &req, NODES, "RegisterNode")?;
        sh.require_leader()?;
        let n = req.into_inner();
        sh.require_node_name(cert.as_ref(), &n.name, "RegisterNode")?;
        if n.name.is_empty() || n.name.len() > 128 {
            return Err(Status::invalid_argument(
                "node name must be 1 to 128 characters",
            ));
        }
        let labels = certified_labels(
            &n.name,
            n.labels.into_iter().collect(),
            cert.as_ref().map(|c| &c.labels),
        )
        .map_err(Status::permission_denied)?;
        let node = NodeRecord {
            name: n.name.clone(),
            listen: n.listen,
            cores: n.cores.max(1),
            memory_bytes: n.memory_bytes,
            gpus: n.gpus,
            nccl: n.nccl,
            gpu_kernels: (!n.gpu_kernels.is_empty()).then_some(n.gpu_kernels),
            labels,
            draining: false,
            registered_ms: crate::now_ms(),
        };
        sh.propose(Command::RegisterNode { node }).await?;
        sh.saw(&n.name);
        Ok(Response::new(Ack {
            message: format!("registered {}", n.name),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let sh = &self.shared;
        let cert = role(sh, &req, NODES, "Heartbeat")?;
        sh.require_leader()?;
        let HeartbeatRequest { name, progress } = req.into_inner();
        sh.require_node_name(cert.as_ref(), &name, "Heartbeat")?;
        if sh.view.read(|s| !s.nodes.contains_key(&name)) {
            return Err(Status::not_found(format!(
                "node {name:?} is not registered"
            )));
        }
        sh.saw(&name);
        sh.set_progress(&name, progress);
        let data_addr = sh.advertise.clone();
        let assignments = sh.view.read(|s| {
            s.assignments_of(&name)
                .into_iter()
                .filter_map(|(job, shard, attempt)| {
                    let j = s.jobs.get(&job)?;
                    let rec = j.shards.get(shard as usize)?;
                    let group = match &j.group {
                        Some(g) => Some(Group {
                            epoch: g.epoch,
                            rank: u32::try_from(g.members.iter().position(|m| *m == name)?).ok()?,
                            members: g
                                .members
                                .iter()
                                .map(|m| s.nodes.get(m).map(|n| n.listen.clone()))
                                .collect::<Option<Vec<_>>>()?,
                            // The sites the members had when the group
                            // formed (their labels now for a group
                            // recorded before formations kept them).
                            sites: if g.sites.len() == g.members.len() {
                                g.sites.clone()
                            } else {
                                g.members
                                    .iter()
                                    .map(|m| {
                                        s.nodes.get(m).map(|n| {
                                            n.labels.get("site").cloned().unwrap_or_default()
                                        })
                                    })
                                    .collect::<Option<Vec<_>>>()?
                            },
                            backend: g.backend.name().into(),
                            names: g.members.clone(),
                        }),
                        None => None,
                    };
                    Some(Assignment {
                        job_id: job,
                        shard,
                        attempt,
                        spec_json: serde_json::to_string(&j.run_spec()).ok()?,
                        tensors: rec.shard.tensors.clone(),
                        data_addr: data_addr.clone(),
                        group,
                    })
                })
                .collect()
        });
        let revoked = sh.view.read(|s| s.revoked.keys().cloned().collect());
        Ok(Response::new(HeartbeatReply {
            assignments,
            lease_ms: sh.lease.as_millis() as u64,
            revoked,
        }))
    }

    async fn change_membership(
        &self,
        req: Request<MembershipChange>,
    ) -> Result<Response<Ack>, Status> {
        let sh = &self.shared;
        role(sh, &req, &[Role::Client], "ChangeMembership")?;
        sh.require_leader()?;
        let change = req.into_inner();
        let voters: BTreeSet<u64> = sh
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        for (id, addr) in &change.add {
            if voters.contains(id) {
                return Err(Status::already_exists(format!(
                    "coordinator {id} is already a voter; remove it first to move it"
                )));
            }
            if addr
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(Status::invalid_argument(format!(
                    "coordinator {id}: {addr:?} is not HOST:PORT"
                )));
            }
        }
        let remove: BTreeSet<u64> = change.remove.iter().copied().collect();
        if let Some(id) = remove.iter().find(|id| !voters.contains(id)) {
            return Err(Status::not_found(format!(
                "coordinator {id} is not a voter (voters: {voters:?})"
            )));
        }
        let after = voters.len() + change.add.len() - remove.len();
        if after == 0 {
            return Err(Status::failed_precondition(
                "the change would leave no voter",
            ));
        }
        let raft_err = |what: String| {
            move |e: openraft::error::RaftError<u64, _>| Status::unavailable(format!("{what}: {e}"))
        };
        // New voters first catch up as learners (blocking until they have
        // the log), then join the voters in one joint-consensus change.
        for (id, addr) in &change.add {
            sh.raft
                .add_learner(*id, openraft::BasicNode { addr: addr.clone() }, true)
                .await
                .map_err(raft_err(format!(
                    "adding coordinator {id} at {addr} as a learner"
                )))?;
        }
        if !change.add.is_empty() {
            let ids: BTreeSet<u64> = change.add.keys().copied().collect();
            sh.raft
                .change_membership(openraft::ChangeMembers::AddVoterIds(ids), false)
                .await
                .map_err(raft_err("making the new coordinators voters".into()))?;
        }
        if !remove.is_empty() {
            sh.raft
                .change_membership(openraft::ChangeMembers::RemoveVoters(remove.clone()), false)
                .await
                .map_err(raft_err("removing voters".into()))?;
        }
        let now: Vec<String> = sh
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .map(|id| id.to_string())
            .collect();
        Ok(Response::new(Ack {
            message: format!("voters now {}", now.join(",")),
        }))
    }

    async fn delete_job(&self, req: Request<JobRef>) -> Result<Response<Ack>, Status> {
        role(&self.shared, &req, OPERATORS, "DeleteJob")?;
        self.shared.require_leader()?;
        let job = req.into_inner().job_id;
        let r = crate::supervisor::delete_job(&self.shared, &job).await?;
        if r.ok {
            Ok(Response::new(Ack {
                message: format!("deleted {job}"),
            }))
        } else if r.message.starts_with("no job") {
            Err(Status::not_found(r.message))
        } else {
            Err(Status::failed_precondition(r.message))
        }
    }

    async fn revoke_certificate(
        &self,
        req: Request<RevokeRequest>,
    ) -> Result<Response<Ack>, Status> {
        let sh = &self.shared;
        role(sh, &req, &[Role::Client], "RevokeCertificate")?;
        sh.require_leader()?;
        let serial = hcx_net::certs::parse_serial(&req.into_inner().serial)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if sh.own_serial.as_deref() == Some(serial.as_str()) {
            return Err(Status::failed_precondition(format!(
                "certificate {serial} is the leader's own; replace the coordinator (with a new certificate) before revoking its old one"
            )));
        }
        let r = sh
            .propose(Command::RevokeCertificate {
                serial: serial.clone(),
                now_ms: crate::now_ms(),
            })
            .await?;
        Ok(Response::new(Ack {
            message: if r.message.is_empty() {
                format!("revoked certificate {serial}")
            } else {
                r.message
            },
        }))
    }

    async fn cluster_info(
        &self,
        _req: Request<ClusterInfoRequest>,
    ) -> Result<Response<ClusterInfoReply>, Status> {
        Ok(Response::new(self.info()))
    }

    async fn report_failure(&self, req: Request<ShardFailure>) -> Result<Response<Ack>, Status> {
        let sh = &self.shared;
        let cert = role(sh, &req, NODES, "ReportFailure")?;
        sh.require_leader()?;
        let f = req.into_inner();
        sh.require_node_name(cert.as_ref(), &f.node, "ReportFailure")?;
        sh.saw(&f.node);
        let holder = sh.view.read(|s| {
            s.jobs
                .get(&f.job_id)
                .and_then(|j| j.shards.get(f.shard as usize))
                .and_then(|r| r.node.clone())
        });
        if holder.as_deref() != Some(f.node.as_str()) {
            return Err(Status::failed_precondition(format!(
                "{} shard {} attempt {} is not held by {}",
                f.job_id, f.shard, f.attempt, f.node
            )));
        }
        let r = sh
            .propose(Command::ShardFailed {
                job: f.job_id,
                shard: f.shard,
                attempt: f.attempt,
                reason: format!("{}: {}", f.node, f.reason),
                stage: f.stage,
                retryable: f.retryable,
            })
            .await?;
        Ok(Response::new(Ack { message: r.message }))
    }

    async fn publish_group_token(&self, req: Request<GroupToken>) -> Result<Response<Ack>, Status> {
        let t = req.get_ref().clone();
        self.group_member(
            &req,
            "PublishGroupToken",
            &t.job_id,
            t.epoch,
            &t.node,
            Some(0),
        )?;
        let r = self
            .shared
            .propose(Command::SetGroupToken {
                job: t.job_id,
                epoch: t.epoch,
                nccl_id: t.nccl_id,
            })
            .await?;
        if !r.ok {
            return Err(Status::failed_precondition(r.message));
        }
        Ok(Response::new(Ack {
            message: "published".into(),
        }))
    }

    async fn get_group_token(
        &self,
        req: Request<GroupTokenRef>,
    ) -> Result<Response<GroupToken>, Status> {
        let t = req.get_ref().clone();
        self.group_member(&req, "GetGroupToken", &t.job_id, t.epoch, &t.node, None)?;
        // The id and its publisher (rank 0) from one read of the state.
        let published = self.shared.view.read(|s| {
            let g = s.jobs.get(&t.job_id)?.group.as_ref()?;
            Some((
                g.nccl_id.clone()?,
                g.members.first().cloned().unwrap_or_default(),
            ))
        });
        let Some((nccl_id, node)) = published else {
            return Err(Status::not_found(format!(
                "rank 0 of {}'s group has not published its NCCL id yet",
                t.job_id
            )));
        };
        Ok(Response::new(GroupToken {
            job_id: t.job_id,
            epoch: t.epoch,
            node,
            nccl_id,
        }))
    }
}

impl ClusterService {
    /// Checks that `node` (the caller's certified name, where it has one)
    /// is rank `rank` of `job`'s group of `epoch` (any rank when `None`).
    fn group_member<T>(
        &self,
        req: &Request<T>,
        call: &str,
        job: &str,
        epoch: u64,
        node: &str,
        rank: Option<usize>,
    ) -> Result<(), Status> {
        let sh = &self.shared;
        let cert = role(sh, req, NODES, call)?;
        sh.require_leader()?;
        sh.require_node_name(cert.as_ref(), node, call)?;
        let at = sh.view.read(|s| {
            let g = s.jobs.get(job)?.group.as_ref()?;
            Some((g.epoch, g.members.iter().position(|m| m == node)))
        });
        match at {
            Some((e, Some(r))) if e == epoch && rank.is_none_or(|want| want == r) => Ok(()),
            Some((e, _)) if e != epoch => Err(Status::failed_precondition(format!(
                "{job}'s group is at epoch {e}, not {epoch}"
            ))),
            Some(_) => Err(Status::permission_denied(format!(
                "{node} is not {} of {job}'s group",
                rank.map_or("a member".to_string(), |r| format!("rank {r}"))
            ))),
            None => Err(Status::not_found(format!("{job} has no group"))),
        }
    }

    fn info(&self) -> ClusterInfoReply {
        let sh = &self.shared;
        let m = sh.raft.metrics().borrow().clone();
        ClusterInfoReply {
            id: sh.id,
            leader_id: m.current_leader,
            leader_addr: sh.leader_addr().unwrap_or_default(),
            term: m.current_term,
            last_applied: m.last_applied.map_or(0, |l| l.index),
            voters: m
                .membership_config
                .nodes()
                .map(|(id, n)| format!("{id}={}", n.addr))
                .collect(),
        }
    }
}

fn node_info(n: &NodeRecord) -> NodeInfo {
    NodeInfo {
        name: n.name.clone(),
        listen: n.listen.clone(),
        cores: n.cores,
        memory_bytes: n.memory_bytes,
        gpus: n.gpus.clone(),
        labels: n.labels.clone().into_iter().collect(),
        nccl: n.nccl,
        gpu_kernels: n.gpu_kernels.clone().unwrap_or_default(),
    }
}

/// The planner's view of a registered node.
pub fn capacity(n: &NodeRecord) -> NodeCapacity {
    NodeCapacity {
        name: n.name.clone(),
        cores: n.cores,
        memory_bytes: n.memory_bytes,
        labels: n.labels.clone(),
        draining: n.draining,
        gpu: n.gpu_kernels.is_some(),
    }
}

/// A stream fed by a task through a channel.
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<JobStatus, Status>> + Send
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<JobStatus, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn json<T: serde::Serialize>(v: &T) -> Result<Response<RaftMessage>, Status> {
    serde_json::to_vec(v)
        .map(|json| Response::new(RaftMessage { json }))
        .map_err(|e| Status::internal(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(m: Request<RaftMessage>) -> Result<T, Status> {
    serde_json::from_slice(&m.into_inner().json)
        .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let facts = role(&self.shared, &req, &[Role::Coordinator], "AppendEntries")?;
        let rpc: openraft::raft::AppendEntriesRequest<crate::store::TypeConfig> = parse(req)?;
        self.shared.require_raft_sender(
            facts.as_ref(),
            rpc.vote.leader_id.voted_for(),
            "AppendEntries",
        )?;
        let r = self.shared.raft.append_entries(rpc).await;
        json(&r)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let facts = role(&self.shared, &req, &[Role::Coordinator], "Vote")?;
        let rpc: openraft::raft::VoteRequest<crate::store::NodeId> = parse(req)?;
        self.shared
            .require_raft_sender(facts.as_ref(), rpc.vote.leader_id.voted_for(), "Vote")?;
        let r = self.shared.raft.vote(rpc).await;
        json(&r)
    }

    async fn install_snapshot(
        &self,
        req: Request<SnapshotChunk>,
    ) -> Result<Response<RaftMessage>, Status> {
        let facts = role(&self.shared, &req, &[Role::Coordinator], "InstallSnapshot")?;
        let chunk = req.into_inner();
        let header: SnapshotHeader = serde_json::from_slice(&chunk.header_json)
            .map_err(|e| Status::invalid_argument(format!("malformed snapshot chunk: {e}")))?;
        let rpc = header.join(chunk.data);
        self.shared.require_raft_sender(
            facts.as_ref(),
            rpc.vote.leader_id.voted_for(),
            "InstallSnapshot",
        )?;
        let r = self.shared.raft.install_snapshot(rpc).await;
        json(&r)
    }
}

/// Folder beside a job's output where its committed shard files wait for the merge.
pub fn shard_store(output: &Path, job: &str) -> PathBuf {
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "artifact".into());
    parent.join(format!(".{name}.hcx-shards")).join(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_nodes_labels_come_from_its_certificate() {
        let cert = labels(&[("gpu", "h100"), ("site", "a")]);
        // Claiming nothing, or what the certificate says, gives its labels.
        for claim in [&[][..], &[("site", "a")], &[("gpu", "h100"), ("site", "a")]] {
            let got = certified_labels("n1", labels(claim), Some(&cert)).unwrap();
            assert_eq!(got, cert);
        }
        // A claim against the certificate, or beyond it, is refused.
        let e = certified_labels("n1", labels(&[("site", "b")]), Some(&cert)).unwrap_err();
        assert!(e.contains("claims site=b") && e.contains("site=a"), "{e}");
        let e = certified_labels("n1", labels(&[("zone", "x")]), Some(&cert)).unwrap_err();
        assert!(e.contains("--label zone=x"), "{e}");
        let e = certified_labels("n1", labels(&[("site", "b")]), Some(&labels(&[]))).unwrap_err();
        assert!(e.contains("carries no site label"), "{e}");
        // Without TLS the claim stands.
        let got = certified_labels("n1", labels(&[("site", "b")]), None).unwrap();
        assert_eq!(got, labels(&[("site", "b")]));
    }

    /// The rotation's share of a tensor's cost is its GPU part, except for
    /// tensors the kernels keep on the CPU (small or integer).
    #[test]
    fn the_gpu_part_of_a_tensors_cost_is_its_rotation() {
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "t", "model": "/m", "output": "/o",
            "pipeline": [{"hadamard": {}}, {"uniform": {"bits": 4.0}}, {"rans": {}}]
        }))
        .unwrap();
        let info = |name: &str, dtype, shape: Vec<usize>| hcx_pipeline::model::TensorInfo {
            name: name.into(),
            dtype,
            shape,
            file: 0,
            range: (0, 0),
            stored_bytes: 0,
        };
        use safetensors::Dtype;
        let costs = tensor_costs(
            &[
                info("big", Dtype::F32, vec![512, 512]),
                info("small", Dtype::F32, vec![100, 100]),
                info("ids", Dtype::I64, vec![512, 512]),
            ],
            &spec,
        );
        assert_eq!(costs[0].cost_per_value, 0.5 + 6.0 + 0.5);
        assert_eq!(costs[0].gpu_cost_per_value, 0.5);
        assert_eq!(costs[1].cost_per_value, 7.0);
        assert_eq!(costs[1].gpu_cost_per_value, 0.0);
        assert_eq!(
            (costs[2].cost_per_value, costs[2].gpu_cost_per_value),
            (0.0, 0.0)
        );
    }
}
