//! The replicated coordinator state and the commands that change it.
//!
//! This is the raft state machine without any I/O: [`ClusterState::apply`]
//! is a pure function of the state and one [`Command`], so every
//! coordinator that applies the same log reaches the same state. Wall-clock
//! time enters only as values the leader wrote into a command. Leases are
//! the leader's business: it watches heartbeats in memory and commits a
//! [`Command::Release`] when a lease runs out, so a lease decision is a log
//! entry like any other and survives a leader change.

use std::collections::BTreeMap;

use hcx_protocol::JobSpec;
use hcx_protocol::job::BlobFile;
use serde::{Deserialize, Serialize};

use crate::scheduler::{Placement, Shard, rank_shards};

/// The SHA-256 (hex) of a job's resolved spec and output, which an
/// idempotency key is bound to: the same key with another spec is refused
/// rather than answered with the first job.
pub fn spec_digest(spec: &JobSpec, output: &str) -> String {
    use sha2::{Digest, Sha256};
    // serde_json's maps are ordered by key, so the text is canonical.
    let value = serde_json::json!({ "spec": spec, "output": output });
    let digest = Sha256::digest(value.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The refusal for an idempotency key reused with another spec, naming
/// both specs' digests.
pub fn key_conflict(key: &str, job: &str, theirs: &str, ours: &str) -> String {
    format!(
        "idempotency key `{key}` belongs to job {job} (spec sha256 {}), and this submission's spec differs (sha256 {}): use another key for another job",
        &theirs[..theirs.len().min(16)],
        &ours[..ours.len().min(16)]
    )
}

/// How many times a shard may fail with a retryable error before its job fails.
pub const MAX_SHARD_FAILURES: u32 = 3;

/// How many times a job's collective group may be formed (the first time
/// and after each break) before the job fails.
pub const MAX_GROUP_FORMATIONS: u32 = 4;

/// A worker node as registered with the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Unique node name (`--name`).
    pub name: String,
    /// Address the node listens on for node-to-node traffic.
    pub listen: String,
    /// CPU cores it offers.
    pub cores: u32,
    /// Memory it offers, in bytes.
    pub memory_bytes: u64,
    /// GPUs detected at start (names), empty on CPU-only nodes.
    pub gpus: Vec<String>,
    /// Whether it can run NCCL collectives (built with `cuda`, a device and
    /// libnccl present).
    #[serde(default)]
    pub nccl: bool,
    /// The device its kernels run on, where they run on a GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_kernels: Option<String>,
    /// Operator labels such as `site=a`.
    pub labels: BTreeMap<String, String>,
    /// A drained node keeps its running shard but gets nothing new.
    pub draining: bool,
    /// Leader's clock when it first registered, milliseconds since the epoch.
    pub registered_ms: u64,
}

/// Where a job stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    /// Shards are being compressed.
    Running,
    /// Every shard is done and the leader is writing the artifact.
    Merging,
    /// The artifact is complete and verified.
    Succeeded {
        /// Artifact size on disk.
        artifact_bytes: u64,
        /// Source bytes as stored.
        source_bytes: u64,
    },
    /// The job stopped with an error.
    Failed {
        /// What went wrong.
        reason: String,
        /// The stage or step that failed (`encode layer.3 (rtn)`, `merge`, `plan`).
        stage: String,
    },
    /// An operator cancelled it.
    Cancelled,
}

impl JobState {
    /// Whether the job can still change.
    pub fn is_active(&self) -> bool {
        matches!(self, JobState::Running | JobState::Merging)
    }

    /// Short name for listings.
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Merging => "merging",
            JobState::Succeeded { .. } => "succeeded",
            JobState::Failed { .. } => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A shard's finished result, committed once the leader holds its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardResult {
    /// Node that compressed it.
    pub node: String,
    /// Attempt that produced it.
    pub attempt: u32,
    /// SHA-256 of the shard file, lowercase hex.
    pub sha256: String,
    /// Size of the shard file.
    pub bytes: u64,
    /// Source bytes the node fetched.
    pub bytes_in: u64,
    /// Seconds the node spent in the kernels.
    pub kernel_seconds: f64,
    /// Seconds from assignment to upload, as the node measured them.
    pub wall_seconds: f64,
}

/// One shard of a job and who holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// The planned shard.
    pub shard: Shard,
    /// Number of the current (or last) assignment, starting at 1.
    pub attempt: u32,
    /// Node holding the current attempt; `None` while waiting for one.
    pub node: Option<String>,
    /// Retryable failures so far.
    pub failures: u32,
    /// Why the last attempt ended without a result.
    pub last_error: Option<String>,
    /// Set when the shard is done.
    pub result: Option<ShardResult>,
    /// Nodes whose attempt at this shard failed or lost its lease, in the
    /// order it happened (each once); re-assignment avoids them while
    /// another node can take the shard.
    #[serde(default)]
    pub failed_by: Vec<String>,
}

impl ShardRecord {
    fn failed_on_holder(&mut self) {
        if let Some(n) = self.node.take()
            && !self.failed_by.contains(&n)
        {
            self.failed_by.push(n);
        }
    }
}

/// The nodes running a calibrated job together: each is one rank of the
/// data-parallel calibration (statistics and gradients summed over the
/// node-to-node plane) and writes the tensors of its own rank shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Cluster-wide unique number of this formation; ring connections are
    /// keyed by it, so a rank of an older formation cannot join a newer one.
    pub epoch: u64,
    /// How many times the job's group has been formed (1 the first time).
    pub formation: u32,
    /// Members by rank.
    pub members: Vec<String>,
    /// Each member's site (its certificate's), by rank; empty where a node
    /// has none.
    #[serde(default)]
    pub sites: Vec<String>,
    /// Why the previous formation broke, if one did.
    pub last_error: Option<String>,
    /// How the ranks sum.
    #[serde(default)]
    pub backend: GroupBackend,
    /// The NCCL unique id rank 0 published for this formation (NCCL
    /// groups only; the other ranks wait for it).
    #[serde(default, with = "hex_bytes::option")]
    pub nccl_id: Option<Vec<u8>>,
}

/// Bytes in the log and the snapshots as lowercase hex rather than a JSON
/// array of numbers; arrays written before are still read.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Hex(String),
        Numbers(Vec<u8>),
    }

    fn decode<E: serde::de::Error>(w: Written) -> Result<Vec<u8>, E> {
        match w {
            Written::Hex(h) => hex::decode(&h).map_err(|e| E::custom(format!("{h:?}: {e}"))),
            Written::Numbers(v) => Ok(v),
        }
    }

    pub(super) fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        decode(Written::deserialize(d)?)
    }

    pub(super) mod option {
        use super::*;

        pub(in super::super) fn serialize<S: Serializer>(
            b: &Option<Vec<u8>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match b {
                Some(b) => s.serialize_some(&hex::encode(b)),
                None => s.serialize_none(),
            }
        }

        pub(in super::super) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Vec<u8>>, D::Error> {
            Option::<Written>::deserialize(d)?.map(decode).transpose()
        }
    }
}

/// The collective backend of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBackend {
    /// A ring over QUIC between the members' node-to-node addresses.
    #[default]
    Ring,
    /// NCCL between the members' GPUs: chosen when every member can run it
    /// and the job is neither federated (whose cross-site traffic stays on
    /// the ring, where every message is one of ours) nor split by layer
    /// (whose stages hand host activations to their neighbour).
    Nccl,
}

impl GroupBackend {
    /// The name the assignment carries.
    pub fn name(self) -> &'static str {
        match self {
            GroupBackend::Ring => "ring",
            GroupBackend::Nccl => "nccl",
        }
    }
}

/// Length of an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

/// A submitted job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Cluster-assigned id (`j000001`).
    pub id: String,
    /// Client-chosen key that makes a retried submit return this job.
    pub idempotency_key: Option<String>,
    /// The job, with paths resolved.
    pub spec: JobSpec,
    /// Artifact folder; empty when the artifact stays in the cluster
    /// (see `artifact`).
    pub output: String,
    /// Where it stands.
    pub state: JobState,
    /// Its shards, by id.
    pub shards: Vec<ShardRecord>,
    /// Leader's clock at submit, ms since the epoch.
    pub submitted_ms: u64,
    /// Leader's clock when it ended.
    pub finished_ms: Option<u64>,
    /// For a job run by a collective group: the plan's shards, which each
    /// formation splits among its ranks (`shards` then holds the ranks'
    /// shards). Empty for other jobs.
    #[serde(default)]
    pub units: Vec<Shard>,
    /// The current collective group, once one is formed.
    #[serde(default)]
    pub group: Option<GroupRecord>,
    /// The artifact's files, for a succeeded job whose artifact stays in
    /// the cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifact: Vec<BlobFile>,
    /// Rate steps up from the spec as submitted, after quality-gate misses
    /// (`gates.on_miss: raise_rate`); the shards run [`JobRecord::run_spec`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub raises: u32,
    /// One line per measured try of the job's quality gates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gate_notes: Vec<String>,
}

fn yes() -> bool {
    true
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl JobRecord {
    /// The spec its shards run: as submitted, raised `raises` rate steps.
    /// (`spec` stays as submitted, which a retried submit is compared to.)
    pub fn run_spec(&self) -> JobSpec {
        self.spec
            .raised_rate(self.raises)
            .unwrap_or_else(|| self.spec.clone())
    }

    /// Whether its artifact stays in the cluster rather than in an output
    /// folder.
    pub fn in_cluster(&self) -> bool {
        self.output.is_empty()
    }

    /// The blobs it needs kept: its sent model's and calibration files, its shards' files
    /// while it is active, its artifact's files.
    pub fn blobs(&self) -> Vec<(&str, u64)> {
        let mut out: Vec<(&str, u64)> = Vec::new();
        out.extend(self.spec.sent_blobs());
        if self.state.is_active() {
            out.extend(
                self.shards
                    .iter()
                    .filter_map(|s| s.result.as_ref())
                    .map(|r| (r.sha256.as_str(), r.bytes)),
            );
        }
        out.extend(self.artifact.iter().map(|f| (f.sha256.as_str(), f.bytes)));
        out
    }
}

impl JobRecord {
    /// Shards done so far.
    pub fn done(&self) -> usize {
        self.shards.iter().filter(|s| s.result.is_some()).count()
    }

    /// Whether the job runs as one collective group (it has a
    /// `calibration:` section: statistics are summed over all its data).
    pub fn runs_as_group(&self) -> bool {
        self.spec.calibration.is_some()
    }
}

/// A change to the cluster state: the payload of a raft log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// A node joined or came back (its drain flag is kept).
    RegisterNode {
        /// The node.
        node: NodeRecord,
    },
    /// Stop giving a node new shards, or start again.
    DrainNode {
        /// Its name.
        name: String,
        /// Whether it drains (true) or takes shards again (false).
        #[serde(default = "yes")]
        draining: bool,
    },
    /// A new job with its plan. A job that runs as a collective group
    /// keeps `shards` as the units its groups split and is placed by
    /// [`Command::FormGroup`], so its `placements` are empty.
    SubmitJob {
        /// Makes a retried submit idempotent.
        idempotency_key: Option<String>,
        /// The job.
        spec: Box<JobSpec>,
        /// Artifact folder.
        output: String,
        /// Its shards.
        shards: Vec<Shard>,
        /// Initial placement (attempt 1 of each placed shard).
        placements: Vec<Placement>,
        /// Leader's clock.
        now_ms: u64,
    },
    /// Form (or re-form) a collective-group job's group: a new epoch, the
    /// units split into one shard per member, each held by its member.
    FormGroup {
        /// Job id.
        job: String,
        /// Members by rank.
        members: Vec<String>,
    },
    /// Rank 0 of an NCCL group published the formation's NCCL unique id.
    SetGroupToken {
        /// Job id.
        job: String,
        /// The formation it belongs to.
        epoch: u64,
        /// ncclUniqueId, [`NCCL_ID_BYTES`] bytes.
        #[serde(with = "hex_bytes")]
        nccl_id: Vec<u8>,
    },
    /// Give a waiting shard to a node.
    Assign {
        /// Job id.
        job: String,
        /// Shard id.
        shard: u32,
        /// Node name.
        node: String,
        /// Must be the shard's attempt + 1.
        attempt: u32,
    },
    /// Take a shard back from its node (lease expired, node lost).
    Release {
        /// Job id.
        job: String,
        /// Shard id.
        shard: u32,
        /// The attempt being ended; stale releases are ignored.
        attempt: u32,
        /// Why.
        reason: String,
    },
    /// A shard's file is stored at the leader with this hash.
    ShardDone {
        /// Job id.
        job: String,
        /// Shard id.
        shard: u32,
        /// The result.
        result: ShardResult,
    },
    /// A node could not compress a shard.
    ShardFailed {
        /// Job id.
        job: String,
        /// Shard id.
        shard: u32,
        /// The attempt that failed.
        attempt: u32,
        /// What went wrong.
        reason: String,
        /// Which stage or step.
        stage: String,
        /// Whether another attempt could succeed (I/O) or not (a codec error).
        retryable: bool,
    },
    /// Every shard is done; the leader starts writing the artifact.
    BeginMerge {
        /// Job id.
        job: String,
    },
    /// The job ended.
    FinishJob {
        /// Job id.
        job: String,
        /// Succeeded or Failed.
        state: JobState,
        /// Leader's clock.
        now_ms: u64,
        /// A job whose artifact stays in the cluster: the artifact's files,
        /// each held by a majority of the voters.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        artifact: Vec<BlobFile>,
        /// What the quality gates measured on the last try.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gate_notes: Vec<String>,
    },
    /// A merged artifact missed a quality gate: the job runs again one
    /// rate step up (from `from` raises), `note` saying what was measured.
    RaiseRate {
        /// The job.
        job: String,
        /// Its raises when the missed try ran (a stale proposal is refused).
        from: u32,
        /// What the gates measured on the missed try.
        note: String,
    },
    /// An operator cancels a job.
    CancelJob {
        /// Job id.
        job: String,
        /// Leader's clock.
        now_ms: u64,
    },
    /// Forget a finished job (an operator's `delete`, or the retention
    /// policy): its record and its idempotency key go.
    DeleteJob {
        /// Job id.
        job: String,
    },
    /// An operator revokes a certificate: from then on every coordinator
    /// refuses it.
    RevokeCertificate {
        /// Its serial (see `hcx_net::certs::serial_hex`).
        serial: String,
        /// Leader's clock.
        now_ms: u64,
    },
}

/// What applying a command answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CommandResult {
    /// Whether the command changed (or had already changed) the state.
    pub ok: bool,
    /// The job id a submit created or found.
    pub job: Option<String>,
    /// Why it was refused, when `ok` is false.
    pub message: String,
}

impl CommandResult {
    fn ok() -> Self {
        CommandResult {
            ok: true,
            ..Default::default()
        }
    }
    fn refused(msg: impl Into<String>) -> Self {
        CommandResult {
            ok: false,
            job: None,
            message: msg.into(),
        }
    }
}

/// Everything the coordinators agree on.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ClusterState {
    /// Registered nodes by name.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Jobs by id.
    pub jobs: BTreeMap<String, JobRecord>,
    /// Idempotency key → job id.
    pub keys: BTreeMap<String, String>,
    /// Number of the next job.
    pub next_job: u64,
    /// The last collective-group epoch handed out.
    #[serde(default)]
    pub last_epoch: u64,
    /// Revoked certificate serials → when they were revoked (leader's
    /// clock, ms).
    #[serde(default)]
    pub revoked: BTreeMap<String, u64>,
}

impl ClusterState {
    /// Applies one command. Refusals leave the state unchanged.
    pub fn apply(&mut self, cmd: Command) -> CommandResult {
        match cmd {
            Command::RegisterNode { mut node } => {
                if let Some(old) = self.nodes.get(&node.name) {
                    node.draining = old.draining;
                    node.registered_ms = old.registered_ms;
                }
                self.nodes.insert(node.name.clone(), node);
                CommandResult::ok()
            }
            Command::DrainNode { name, draining } => match self.nodes.get_mut(&name) {
                Some(n) => {
                    n.draining = draining;
                    CommandResult::ok()
                }
                None => CommandResult::refused(format!("no node named {name:?}")),
            },
            Command::SubmitJob {
                idempotency_key,
                spec,
                output,
                shards,
                placements,
                now_ms,
            } => {
                if let Some(key) = &idempotency_key
                    && let Some(id) = self.keys.get(key)
                {
                    return match self.jobs.get(id) {
                        Some(j) if j.spec != *spec || j.output != output => {
                            CommandResult::refused(key_conflict(
                                key,
                                id,
                                &spec_digest(&j.spec, &j.output),
                                &spec_digest(&spec, &output),
                            ))
                        }
                        _ => CommandResult {
                            ok: true,
                            job: Some(id.clone()),
                            message: "a job with this idempotency key exists".into(),
                        },
                    };
                }
                self.next_job += 1;
                let id = format!("j{:06}", self.next_job);
                let group = spec.calibration.is_some();
                if group && !placements.is_empty() {
                    return CommandResult::refused(
                        "a job run by a collective group is placed when its group forms",
                    );
                }
                let units = if group { shards.clone() } else { Vec::new() };
                let shards = if group { Vec::new() } else { shards };
                let placed: BTreeMap<u32, &str> = placements
                    .iter()
                    .map(|p| (p.shard, p.node.as_str()))
                    .collect();
                let shards = shards
                    .into_iter()
                    .map(|s| {
                        let node = placed.get(&s.id).map(|n| n.to_string());
                        ShardRecord {
                            attempt: u32::from(node.is_some()),
                            node,
                            shard: s,
                            failures: 0,
                            last_error: None,
                            result: None,
                            failed_by: Vec::new(),
                        }
                    })
                    .collect();
                if let Some(key) = idempotency_key.clone() {
                    self.keys.insert(key, id.clone());
                }
                self.jobs.insert(
                    id.clone(),
                    JobRecord {
                        id: id.clone(),
                        idempotency_key,
                        spec: *spec,
                        output,
                        state: JobState::Running,
                        shards,
                        submitted_ms: now_ms,
                        finished_ms: None,
                        units,
                        group: None,
                        artifact: Vec::new(),
                        raises: 0,
                        gate_notes: Vec::new(),
                    },
                );
                CommandResult {
                    ok: true,
                    job: Some(id),
                    message: String::new(),
                }
            }
            Command::FormGroup { job, members } => self.form_group(&job, members),
            Command::SetGroupToken {
                job,
                epoch,
                nccl_id,
            } => {
                let Some(g) = self.jobs.get_mut(&job).and_then(|j| j.group.as_mut()) else {
                    return CommandResult::refused(format!("{job} has no group"));
                };
                if g.epoch != epoch || g.backend != GroupBackend::Nccl {
                    return CommandResult::refused(format!(
                        "{job}'s group of epoch {} ({}) takes no NCCL id for epoch {epoch}",
                        g.epoch,
                        g.backend.name()
                    ));
                }
                if nccl_id.len() != NCCL_ID_BYTES {
                    return CommandResult::refused(format!(
                        "an NCCL id is {NCCL_ID_BYTES} bytes, not {}",
                        nccl_id.len()
                    ));
                }
                match &g.nccl_id {
                    // A retried publish of the same id is fine; another is not.
                    Some(id) if *id == nccl_id => CommandResult::ok(),
                    Some(_) => CommandResult::refused(format!(
                        "{job}'s group of epoch {epoch} already has its NCCL id"
                    )),
                    None => {
                        g.nccl_id = Some(nccl_id);
                        CommandResult::ok()
                    }
                }
            }
            Command::Assign {
                job,
                shard,
                node,
                attempt,
            } => {
                let Some(s) = self.running_shard(&job, shard) else {
                    return CommandResult::refused(format!("{job} shard {shard} is not running"));
                };
                if s.node.is_some() || s.result.is_some() || attempt != s.attempt + 1 {
                    return CommandResult::refused(format!(
                        "{job} shard {shard} attempt {attempt} is stale"
                    ));
                }
                s.node = Some(node);
                s.attempt = attempt;
                CommandResult::ok()
            }
            Command::Release {
                job,
                shard,
                attempt,
                reason,
            } => {
                let Some(s) = self.running_shard(&job, shard) else {
                    return CommandResult::refused(format!("{job} shard {shard} is not running"));
                };
                if s.attempt != attempt || s.node.is_none() || s.result.is_some() {
                    return CommandResult::refused("stale release");
                }
                s.failed_on_holder();
                s.last_error = Some(reason);
                CommandResult::ok()
            }
            Command::ShardDone { job, shard, result } => {
                let Some(s) = self.running_shard(&job, shard) else {
                    return CommandResult::refused(format!("{job} shard {shard} is not running"));
                };
                if let Some(r) = &s.result {
                    return if r.sha256 == result.sha256 {
                        CommandResult::ok()
                    } else {
                        CommandResult::refused("shard already done with another hash")
                    };
                }
                if s.attempt != result.attempt || s.node.as_deref() != Some(result.node.as_str()) {
                    return CommandResult::refused(format!(
                        "{job} shard {shard}: attempt {} on {} is not the current one",
                        result.attempt, result.node
                    ));
                }
                s.result = Some(result);
                CommandResult::ok()
            }
            Command::ShardFailed {
                job,
                shard,
                attempt,
                reason,
                stage,
                retryable,
            } => {
                let Some(s) = self.running_shard(&job, shard) else {
                    return CommandResult::refused(format!("{job} shard {shard} is not running"));
                };
                if s.attempt != attempt || s.node.is_none() || s.result.is_some() {
                    return CommandResult::refused("stale failure report");
                }
                s.failed_on_holder();
                s.failures += 1;
                s.last_error = Some(reason.clone());
                if !retryable || s.failures >= MAX_SHARD_FAILURES {
                    let j = self.jobs.get_mut(&job).expect("checked above");
                    j.state = JobState::Failed { reason, stage };
                }
                CommandResult::ok()
            }
            Command::BeginMerge { job } => match self.jobs.get_mut(&job) {
                Some(j)
                    if j.state == JobState::Running
                        && !j.shards.is_empty()
                        && j.done() == j.shards.len() =>
                {
                    j.state = JobState::Merging;
                    CommandResult::ok()
                }
                Some(j) if j.state == JobState::Merging => CommandResult::ok(),
                _ => CommandResult::refused(format!("{job} is not ready to merge")),
            },
            Command::FinishJob {
                job,
                state,
                now_ms,
                artifact,
                gate_notes,
            } => match self.jobs.get_mut(&job) {
                Some(j) if j.state.is_active() && !state.is_active() => {
                    j.state = state;
                    j.finished_ms = Some(now_ms);
                    j.artifact = artifact;
                    j.gate_notes.extend(gate_notes);
                    CommandResult::ok()
                }
                _ => CommandResult::refused(format!("{job} is not active")),
            },
            Command::RaiseRate { job, from, note } => match self.jobs.get_mut(&job) {
                Some(j) if j.state == JobState::Merging && j.raises == from => {
                    j.raises += 1;
                    j.gate_notes.push(note);
                    j.state = JobState::Running;
                    let why = format!("the rate was raised {} step(s)", j.raises);
                    if j.runs_as_group() {
                        // The group forms again for the new try.
                        j.group = None;
                        j.shards.clear();
                    } else {
                        for s in &mut j.shards {
                            s.result = None;
                            s.node = None;
                            s.failures = 0;
                            s.failed_by.clear();
                            s.last_error = Some(why.clone());
                        }
                    }
                    CommandResult::ok()
                }
                _ => {
                    CommandResult::refused(format!("{job} is not merging at {from} rate raise(s)"))
                }
            },
            Command::CancelJob { job, now_ms } => match self.jobs.get_mut(&job) {
                Some(j) if j.state.is_active() => {
                    j.state = JobState::Cancelled;
                    j.finished_ms = Some(now_ms);
                    CommandResult::ok()
                }
                Some(j) => {
                    CommandResult::refused(format!("{job} has already ended ({})", j.state.name()))
                }
                None => CommandResult::refused(format!("no job {job}")),
            },
            Command::DeleteJob { job } => match self.jobs.get(&job) {
                Some(j) if j.state.is_active() => CommandResult::refused(format!(
                    "{job} is still {}; cancel it first",
                    j.state.name()
                )),
                Some(_) => {
                    self.jobs.remove(&job);
                    self.keys.retain(|_, id| *id != job);
                    CommandResult::ok()
                }
                None => CommandResult::refused(format!("no job {job}")),
            },
            Command::RevokeCertificate { serial, now_ms } => match self.revoked.entry(serial) {
                std::collections::btree_map::Entry::Occupied(e) => CommandResult {
                    ok: true,
                    message: format!("certificate {} was already revoked", e.key()),
                    job: None,
                },
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(now_ms);
                    CommandResult::ok()
                }
            },
        }
    }

    fn form_group(&mut self, job: &str, members: Vec<String>) -> CommandResult {
        let Some(j) = self.jobs.get(job) else {
            return CommandResult::refused(format!("no job {job}"));
        };
        if j.state != JobState::Running || !j.runs_as_group() {
            return CommandResult::refused(format!("{job} is not a running group job"));
        }
        if members.is_empty() || members.len() > j.units.len() {
            return CommandResult::refused(format!(
                "a group of {} for {} shards",
                members.len(),
                j.units.len()
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(m) = members
            .iter()
            .find(|m| !self.nodes.contains_key(*m) || !seen.insert(m.as_str()))
        {
            return CommandResult::refused(format!("member {m} is unknown or listed twice"));
        }
        if let Some(s) = j
            .shards
            .iter()
            .find(|s| s.result.is_none() && s.node.is_some())
        {
            return CommandResult::refused(format!(
                "{job} shard {} is still held by {}",
                s.shard.id,
                s.node.as_deref().unwrap_or_default()
            ));
        }
        let last_error = j
            .shards
            .iter()
            .find_map(|s| s.last_error.clone())
            .or_else(|| j.group.as_ref().and_then(|g| g.last_error.clone()));
        let formation = j.group.as_ref().map_or(0, |g| g.formation) + 1;
        let sites: Vec<String> = members
            .iter()
            .map(|m| {
                self.nodes
                    .get(m)
                    .and_then(|n| n.labels.get("site").cloned())
                    .unwrap_or_default()
            })
            .collect();
        let federated = j
            .spec
            .calibration
            .as_ref()
            .is_some_and(|c| c.is_federated());
        // A model split by layer passes activations between host memories
        // from one stage to the next: the QUIC ring's links do exactly that.
        let staged = j
            .spec
            .calibration
            .as_ref()
            .is_some_and(|c| c.parallel == hcx_protocol::CalibrationParallel::Layers);
        let backend = if !federated
            && !staged
            && members
                .iter()
                .all(|m| self.nodes.get(m).is_some_and(|n| n.nccl))
        {
            GroupBackend::Nccl
        } else {
            GroupBackend::Ring
        };
        self.last_epoch += 1;
        let epoch = self.last_epoch;
        let j = self.jobs.get_mut(job).expect("checked above");
        // A model split by layer needs each rank's blocks to be a run of
        // consecutive layers, in rank order.
        let units = if staged {
            crate::scheduler::in_layer_order(&j.units)
        } else {
            j.units.clone()
        };
        j.shards = rank_shards(&units, members.len())
            .into_iter()
            .zip(&members)
            .map(|(shard, node)| ShardRecord {
                shard,
                attempt: formation,
                node: Some(node.clone()),
                failures: 0,
                last_error: None,
                result: None,
                failed_by: Vec::new(),
            })
            .collect();
        j.group = Some(GroupRecord {
            epoch,
            formation,
            members,
            sites,
            last_error,
            backend,
            nccl_id: None,
        });
        CommandResult::ok()
    }

    fn running_shard(&mut self, job: &str, shard: u32) -> Option<&mut ShardRecord> {
        let j = self.jobs.get_mut(job)?;
        if j.state != JobState::Running {
            return None;
        }
        j.shards.get_mut(usize::try_from(shard).ok()?)
    }

    /// Shards currently held by `node`, as (job, shard, attempt).
    pub fn assignments_of(&self, node: &str) -> Vec<(String, u32, u32)> {
        let mut out = Vec::new();
        for j in self.jobs.values() {
            if j.state != JobState::Running {
                continue;
            }
            for s in &j.shards {
                if s.result.is_none() && s.node.as_deref() == Some(node) {
                    out.push((j.id.clone(), s.shard.id, s.attempt));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn nccl_ids_travel_as_hex_and_arrays_written_before_still_read() {
        let cmd = super::Command::SetGroupToken {
            job: "j1".into(),
            epoch: 3,
            nccl_id: vec![0, 1, 254, 255],
        };
        let json = serde_json::to_string(&cmd).unwrap();
        assert!(json.contains("\"0001feff\""), "{json}");
        let back: super::Command = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        let old = json.replace("\"0001feff\"", "[0,1,254,255]");
        let back: super::Command = serde_json::from_str(&old).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        let bad = json.replace("0001feff", "0x01");
        assert!(serde_json::from_str::<super::Command>(&bad).is_err());
    }

    use super::*;
    use crate::scheduler::Shard;

    fn spec() -> JobSpec {
        serde_json::from_value(serde_json::json!({
            "name": "t", "model": "/m", "output": "/o",
            "pipeline": [{"rtn": {"bits": 4}}]
        }))
        .unwrap()
    }

    fn shard(id: u32) -> Shard {
        Shard {
            id,
            label: format!("layer.{id}"),
            layers: Some((id, id)),
            tensors: vec![format!("layer.{id}.w")],
            cost: 1.0,
            gpu_cost: 0.0,
            memory_bytes: 16,
        }
    }

    fn node(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            listen: "127.0.0.1:1".into(),
            cores: 2,
            memory_bytes: 1 << 30,
            gpus: vec![],
            nccl: false,
            gpu_kernels: None,
            labels: BTreeMap::new(),
            draining: false,
            registered_ms: 1,
        }
    }

    fn submit(st: &mut ClusterState, key: Option<&str>) -> String {
        let r = st.apply(Command::SubmitJob {
            idempotency_key: key.map(String::from),
            spec: Box::new(spec()),
            output: "/o".into(),
            shards: vec![shard(0), shard(1)],
            placements: vec![Placement {
                shard: 0,
                node: "a".into(),
            }],
            now_ms: 5,
        });
        assert!(r.ok);
        r.job.unwrap()
    }

    fn result(node: &str, attempt: u32, sha: &str) -> ShardResult {
        ShardResult {
            node: node.into(),
            attempt,
            sha256: sha.into(),
            bytes: 10,
            bytes_in: 20,
            kernel_seconds: 0.5,
            wall_seconds: 1.0,
        }
    }

    /// A calibrated job over four layer units, with nodes a, b, c registered.
    fn group_job(st: &mut ClusterState) -> String {
        for n in ["a", "b", "c"] {
            let mut info = node(n);
            if n != "c" {
                info.labels.insert("site".into(), format!("site-{n}"));
            }
            st.apply(Command::RegisterNode { node: info });
        }
        let mut spec = spec();
        spec.calibration =
            Some(serde_json::from_value(serde_json::json!({"sentences": "/s.txt"})).unwrap());
        let placed = st.apply(Command::SubmitJob {
            idempotency_key: None,
            spec: Box::new(spec.clone()),
            output: "/o".into(),
            shards: (0..4).map(shard).collect(),
            placements: vec![Placement {
                shard: 0,
                node: "a".into(),
            }],
            now_ms: 5,
        });
        assert!(!placed.ok, "a group job is placed when its group forms");
        let r = st.apply(Command::SubmitJob {
            idempotency_key: None,
            spec: Box::new(spec),
            output: "/o".into(),
            shards: (0..4).map(shard).collect(),
            placements: vec![],
            now_ms: 5,
        });
        assert!(r.ok);
        r.job.unwrap()
    }

    #[test]
    fn a_group_of_nccl_nodes_sums_through_nccl_with_the_id_rank_0_publishes() {
        let mut st = ClusterState::default();
        let j = group_job(&mut st);
        for n in ["a", "b"] {
            let mut info = st.nodes[n].clone();
            info.nccl = true;
            st.apply(Command::RegisterNode { node: info });
        }
        let form = |members: &[&str]| Command::FormGroup {
            job: j.clone(),
            members: members.iter().map(|m| m.to_string()).collect(),
        };
        let token = |epoch: u64, id: Vec<u8>| Command::SetGroupToken {
            job: j.clone(),
            epoch,
            nccl_id: id,
        };
        // c has no NCCL: a group with it sums on the ring, and takes no id.
        assert!(st.apply(form(&["a", "c"])).ok);
        let g = st.jobs[&j].group.clone().unwrap();
        assert_eq!(g.backend, GroupBackend::Ring);
        assert!(!st.apply(token(g.epoch, vec![1; NCCL_ID_BYTES])).ok);
        // Free the members, then form a group of NCCL nodes only.
        for (shard, attempt) in [(0, 1), (1, 1)] {
            st.apply(Command::Release {
                job: j.clone(),
                shard,
                attempt,
                reason: "test".into(),
            });
        }
        assert!(st.apply(form(&["a", "b"])).ok);
        let g = st.jobs[&j].group.clone().unwrap();
        assert_eq!((g.backend, g.nccl_id.as_ref()), (GroupBackend::Nccl, None));
        assert!(
            !st.apply(token(g.epoch - 1, vec![1; NCCL_ID_BYTES])).ok,
            "old epoch"
        );
        assert!(!st.apply(token(g.epoch, vec![1; 7])).ok, "short id");
        assert!(st.apply(token(g.epoch, vec![1; NCCL_ID_BYTES])).ok);
        assert!(
            st.apply(token(g.epoch, vec![1; NCCL_ID_BYTES])).ok,
            "a retry"
        );
        assert!(
            !st.apply(token(g.epoch, vec![2; NCCL_ID_BYTES])).ok,
            "another id"
        );
        assert_eq!(
            st.jobs[&j].group.as_ref().unwrap().nccl_id,
            Some(vec![1; NCCL_ID_BYTES])
        );
        // A federated job stays on the ring whatever its nodes have.
        let mut spec = st.jobs[&j].spec.clone();
        spec.calibration = Some(
            serde_json::from_value(
                serde_json::json!({"sites": {"site-a": "/a.txt", "site-b": "/b.txt"}}),
            )
            .unwrap(),
        );
        let r = st.apply(Command::SubmitJob {
            idempotency_key: None,
            spec: Box::new(spec),
            output: "/o2".into(),
            shards: (0..4).map(shard).collect(),
            placements: vec![],
            now_ms: 6,
        });
        let f = r.job.unwrap();
        assert!(
            st.apply(Command::FormGroup {
                job: f.clone(),
                members: vec!["a".into(), "b".into()],
            })
            .ok
        );
        assert_eq!(
            st.jobs[&f].group.as_ref().unwrap().backend,
            GroupBackend::Ring
        );
        // So does a model split by layer: its stages hand host activations on.
        let mut spec = st.jobs[&j].spec.clone();
        spec.calibration = Some(
            serde_json::from_value(
                serde_json::json!({"sentences": "/s.txt", "parallel": "layers"}),
            )
            .unwrap(),
        );
        let r = st.apply(Command::SubmitJob {
            idempotency_key: None,
            spec: Box::new(spec),
            output: "/o3".into(),
            shards: (0..4).map(shard).collect(),
            placements: vec![],
            now_ms: 7,
        });
        let staged = r.job.unwrap();
        assert!(
            st.apply(Command::FormGroup {
                job: staged.clone(),
                members: vec!["a".into(), "b".into()],
            })
            .ok
        );
        assert_eq!(
            st.jobs[&staged].group.as_ref().unwrap().backend,
            GroupBackend::Ring
        );
    }

    #[test]
    fn a_group_forms_splits_the_units_and_re_forms_with_a_new_epoch() {
        let mut st = ClusterState::default();
        let j = group_job(&mut st);
        assert!(st.jobs[&j].shards.is_empty() && st.jobs[&j].group.is_none());
        // Nothing to merge before a group has formed.
        assert!(!st.apply(Command::BeginMerge { job: j.clone() }).ok);
        let form = |members: &[&str]| Command::FormGroup {
            job: j.clone(),
            members: members.iter().map(|m| m.to_string()).collect(),
        };
        assert!(!st.apply(form(&[])).ok);
        assert!(!st.apply(form(&["a", "a"])).ok, "a member twice");
        assert!(!st.apply(form(&["a", "z"])).ok, "an unknown member");
        assert!(
            !st.apply(form(&["a", "b", "c", "a", "b"])).ok,
            "more ranks than units"
        );
        assert!(st.apply(form(&["a", "b", "c"])).ok);
        let job = &st.jobs[&j];
        let g = job.group.clone().unwrap();
        assert_eq!((g.epoch, g.formation), (1, 1));
        // Each rank's site, as its node's certificate gave it.
        assert_eq!(g.sites, ["site-a", "site-b", ""]);
        assert_eq!(job.shards.len(), 3);
        let tensors: usize = job.shards.iter().map(|s| s.shard.tensors.len()).sum();
        assert_eq!(tensors, 4);
        assert_eq!(st.assignments_of("b"), vec![(j.clone(), 1, 1)]);
        // While members hold their shards, the group cannot be re-formed.
        assert!(!st.apply(form(&["a", "b"])).ok);
        // Rank 0 finishes; rank 2 fails; rank 1's lease runs out.
        assert!(
            st.apply(Command::ShardDone {
                job: j.clone(),
                shard: 0,
                result: result("a", 1, "h0"),
            })
            .ok
        );
        assert!(
            st.apply(Command::ShardFailed {
                job: j.clone(),
                shard: 2,
                attempt: 1,
                reason: "rank 1 left the ring".into(),
                stage: "collective".into(),
                retryable: true,
            })
            .ok
        );
        assert!(st.jobs[&j].state.is_active());
        assert!(
            st.apply(Command::Release {
                job: j.clone(),
                shard: 1,
                attempt: 1,
                reason: "lease".into(),
            })
            .ok
        );
        assert!(st.apply(form(&["a", "c"])).ok);
        let job = &st.jobs[&j];
        let g = job.group.clone().unwrap();
        assert_eq!((g.epoch, g.formation), (2, 2));
        assert_eq!(g.last_error.as_deref(), Some("lease"));
        assert_eq!(job.shards.len(), 2);
        assert!(
            job.shards
                .iter()
                .all(|s| s.result.is_none() && s.attempt == 2)
        );
        // A report from the old formation is stale.
        assert!(
            !st.apply(Command::ShardFailed {
                job: j.clone(),
                shard: 1,
                attempt: 1,
                reason: "late".into(),
                stage: "collective".into(),
                retryable: true,
            })
            .ok
        );
        for (k, n) in ["a", "c"].iter().enumerate() {
            let k = k as u32;
            let done = st.apply(Command::ShardDone {
                job: j.clone(),
                shard: k,
                result: result(n, 2, "h"),
            });
            assert!(done.ok);
        }
        assert!(st.apply(Command::BeginMerge { job: j.clone() }).ok);
        // Epochs are cluster-wide: another job's group gets the next one.
        let k = group_job(&mut st);
        assert!(
            st.apply(Command::FormGroup {
                job: k.clone(),
                members: vec!["b".into()]
            })
            .ok
        );
        assert_eq!(st.jobs[&k].group.as_ref().unwrap().epoch, 3);
        // Only group jobs form groups.
        let plain = submit(&mut st, None);
        assert!(
            !st.apply(Command::FormGroup {
                job: plain,
                members: vec!["a".into()]
            })
            .ok
        );
    }

    #[test]
    fn idempotency_key_gives_one_job() {
        let mut st = ClusterState::default();
        let a = submit(&mut st, Some("k"));
        let b = submit(&mut st, Some("k"));
        assert_eq!(a, b);
        assert_eq!(st.jobs.len(), 1);
        let c = submit(&mut st, None);
        assert_ne!(a, c);
        assert_eq!(st.jobs.len(), 2);
        // The key is bound to the spec: another spec or output under it is
        // refused, naming both digests.
        let mut other = spec();
        other.seed += 1;
        for (spec, output) in [(other, "/o"), (spec(), "/elsewhere")] {
            let r = st.apply(Command::SubmitJob {
                idempotency_key: Some("k".into()),
                spec: Box::new(spec.clone()),
                output: output.into(),
                shards: vec![shard(0)],
                placements: vec![],
                now_ms: 6,
            });
            assert!(!r.ok && r.job.is_none(), "{r:?}");
            let (first, second) = (
                spec_digest(&st.jobs[&a].spec, "/o"),
                spec_digest(&spec, output),
            );
            assert_ne!(first, second);
            assert!(
                r.message.contains(&first[..16]) && r.message.contains(&second[..16]),
                "{}",
                r.message
            );
        }
        assert_eq!(st.jobs.len(), 2);
    }

    #[test]
    fn lease_release_then_next_attempt() {
        let mut st = ClusterState::default();
        st.apply(Command::RegisterNode { node: node("a") });
        let j = submit(&mut st, None);
        assert_eq!(st.assignments_of("a"), vec![(j.clone(), 0, 1)]);
        // Shard 1 was unplaced: attempt 0, waiting.
        assert!(
            !st.apply(Command::Assign {
                job: j.clone(),
                shard: 1,
                node: "b".into(),
                attempt: 2
            })
            .ok
        );
        assert!(
            st.apply(Command::Assign {
                job: j.clone(),
                shard: 1,
                node: "b".into(),
                attempt: 1
            })
            .ok
        );
        let rel = Command::Release {
            job: j.clone(),
            shard: 0,
            attempt: 1,
            reason: "lease expired".into(),
        };
        assert!(st.apply(rel.clone()).ok);
        assert!(
            !st.apply(rel).ok,
            "a second release of the same attempt is stale"
        );
        // The old holder's late result is refused; the new attempt's is taken.
        assert!(
            !st.apply(Command::ShardDone {
                job: j.clone(),
                shard: 0,
                result: result("a", 1, "x")
            })
            .ok
        );
        assert!(
            st.apply(Command::Assign {
                job: j.clone(),
                shard: 0,
                node: "c".into(),
                attempt: 2
            })
            .ok
        );
        assert!(
            st.apply(Command::ShardDone {
                job: j.clone(),
                shard: 0,
                result: result("c", 2, "x")
            })
            .ok
        );
        // Re-reporting the same hash is harmless; another hash is refused.
        let again = Command::ShardDone {
            job: j.clone(),
            shard: 0,
            result: result("c", 2, "x"),
        };
        assert!(st.apply(again).ok);
        assert!(
            !st.apply(Command::ShardDone {
                job: j.clone(),
                shard: 0,
                result: result("c", 2, "y")
            })
            .ok
        );
        assert!(!st.apply(Command::BeginMerge { job: j.clone() }).ok);
        assert!(
            st.apply(Command::ShardDone {
                job: j.clone(),
                shard: 1,
                result: result("b", 1, "z")
            })
            .ok
        );
        assert!(st.apply(Command::BeginMerge { job: j.clone() }).ok);
        // A gate miss: the job runs again one rate step up, every shard
        // waiting for a new attempt; a stale raise is refused.
        let raise = |from: u32, note: &str| Command::RaiseRate {
            job: j.clone(),
            from,
            note: note.into(),
        };
        assert!(!st.apply(raise(1, "wrong count")).ok);
        assert!(st.apply(raise(0, "try 1")).ok);
        let rec = &st.jobs[&j];
        assert_eq!((rec.raises, &rec.state), (1, &JobState::Running));
        assert!(
            rec.shards
                .iter()
                .all(|s| s.result.is_none() && s.node.is_none())
        );
        assert_eq!(rec.gate_notes, vec!["try 1".to_string()]);
        assert_eq!(rec.run_spec(), rec.spec.raised_rate(1).unwrap());
        assert_ne!(rec.run_spec(), rec.spec);
        assert!(!st.apply(raise(0, "again")).ok);
        let fin = Command::FinishJob {
            job: j.clone(),
            state: JobState::Succeeded {
                artifact_bytes: 1,
                source_bytes: 4,
            },
            now_ms: 9,
            artifact: Vec::new(),
            gate_notes: Vec::new(),
        };
        assert!(st.apply(fin.clone()).ok);
        assert!(!st.apply(fin).ok);
        assert!(
            !st.apply(Command::CancelJob {
                job: j.clone(),
                now_ms: 10
            })
            .ok
        );
    }

    #[test]
    fn codec_failure_fails_the_job_io_failure_retries() {
        let mut st = ClusterState::default();
        let j = submit(&mut st, None);
        let fail = |attempt, retryable| Command::ShardFailed {
            job: j.clone(),
            shard: 0,
            attempt,
            reason: "boom".into(),
            stage: "encode layer.0 (rtn)".into(),
            retryable,
        };
        assert!(st.apply(fail(1, true)).ok);
        assert_eq!(st.jobs[&j].state, JobState::Running);
        assert!(
            st.apply(Command::Assign {
                job: j.clone(),
                shard: 0,
                node: "a".into(),
                attempt: 2
            })
            .ok
        );
        assert!(st.apply(fail(2, false)).ok);
        assert_eq!(
            st.jobs[&j].state,
            JobState::Failed {
                reason: "boom".into(),
                stage: "encode layer.0 (rtn)".into()
            }
        );
        assert!(st.assignments_of("a").is_empty());
    }

    #[test]
    fn failures_and_lost_leases_remember_the_node() {
        let mut st = ClusterState::default();
        let j = submit(&mut st, None);
        let fail = |attempt| Command::ShardFailed {
            job: j.clone(),
            shard: 0,
            attempt,
            reason: "fetch: reset".into(),
            stage: "fetch".into(),
            retryable: true,
        };
        assert!(st.apply(fail(1)).ok);
        assert_eq!(st.jobs[&j].shards[0].failed_by, ["a"]);
        let assign = |node: &str, attempt| Command::Assign {
            job: j.clone(),
            shard: 0,
            node: node.into(),
            attempt,
        };
        assert!(st.apply(assign("b", 2)).ok);
        let release = Command::Release {
            job: j.clone(),
            shard: 0,
            attempt: 2,
            reason: "lease".into(),
        };
        assert!(st.apply(release).ok);
        assert!(st.apply(assign("a", 3)).ok);
        assert!(!st.apply(fail(2)).ok, "stale reports change nothing");
        assert!(st.apply(fail(3)).ok);
        assert_eq!(st.jobs[&j].shards[0].failed_by, ["a", "b"]);
        // A record from before the field existed reads as no failures.
        let mut v = serde_json::to_value(&st.jobs[&j].shards[1]).unwrap();
        v.as_object_mut().unwrap().remove("failed_by");
        let old: ShardRecord = serde_json::from_value(v).unwrap();
        assert!(old.failed_by.is_empty());
    }

    #[test]
    fn drain_and_reregister_keep_the_flag() {
        let mut st = ClusterState::default();
        assert!(
            !st.apply(Command::DrainNode {
                name: "a".into(),
                draining: true,
            })
            .ok
        );
        st.apply(Command::RegisterNode { node: node("a") });
        assert!(
            st.apply(Command::DrainNode {
                name: "a".into(),
                draining: true,
            })
            .ok
        );
        st.apply(Command::RegisterNode { node: node("a") });
        assert!(st.nodes["a"].draining);
        assert!(
            st.apply(Command::DrainNode {
                name: "a".into(),
                draining: false,
            })
            .ok
        );
        assert!(!st.nodes["a"].draining);
        // Entries written before undrain existed still mean "drain".
        let old: Command = serde_json::from_str(r#"{"op":"drain_node","name":"a"}"#).unwrap();
        assert_eq!(
            old,
            Command::DrainNode {
                name: "a".into(),
                draining: true,
            }
        );
    }

    #[test]
    fn cancel_stops_assignments_and_results() {
        let mut st = ClusterState::default();
        let j = submit(&mut st, None);
        assert!(
            st.apply(Command::CancelJob {
                job: j.clone(),
                now_ms: 7
            })
            .ok
        );
        assert!(st.assignments_of("a").is_empty());
        assert!(
            !st.apply(Command::ShardDone {
                job: j.clone(),
                shard: 0,
                result: result("a", 1, "x")
            })
            .ok
        );
    }

    #[test]
    fn revocations_stick_and_travel_in_snapshots() {
        let mut st = ClusterState::default();
        let revoke = |serial: &str| Command::RevokeCertificate {
            serial: serial.into(),
            now_ms: 7,
        };
        let r = st.apply(revoke("4a0b"));
        assert!(r.ok && r.message.is_empty(), "{r:?}");
        let r = st.apply(revoke("4a0b"));
        assert!(r.ok && r.message.contains("already revoked"), "{r:?}");
        assert_eq!(st.revoked.get("4a0b"), Some(&7));
        let copy: ClusterState = serde_json::from_slice(&serde_json::to_vec(&st).unwrap()).unwrap();
        assert_eq!(copy.revoked, st.revoked);
        // A state written before revocations existed still reads.
        let mut old = serde_json::to_value(ClusterState::default()).unwrap();
        old.as_object_mut().unwrap().remove("revoked");
        let back: ClusterState = serde_json::from_value(old).unwrap();
        assert!(back.revoked.is_empty());
    }

    #[test]
    fn only_finished_jobs_are_deleted_and_their_keys_go_with_them() {
        let mut st = ClusterState::default();
        let j = submit(&mut st, Some("k"));
        let r = st.apply(Command::DeleteJob { job: j.clone() });
        assert!(!r.ok && r.message.contains("cancel it first"), "{r:?}");
        assert!(
            st.apply(Command::CancelJob {
                job: j.clone(),
                now_ms: 5
            })
            .ok
        );
        assert!(st.keys.values().any(|id| *id == j));
        assert!(st.apply(Command::DeleteJob { job: j.clone() }).ok);
        assert!(!st.jobs.contains_key(&j));
        assert!(!st.keys.values().any(|id| *id == j));
        let r = st.apply(Command::DeleteJob { job: j.clone() });
        assert!(!r.ok && r.message.contains("no job"), "{r:?}");
    }
}
