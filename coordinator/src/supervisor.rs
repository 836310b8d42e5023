//! The leader's loop: gives waiting shards to live nodes, takes shards back
//! from nodes whose lease ran out, and merges jobs whose shards are all
//! committed. Every decision is a raft command, so a new leader picks up
//! where the old one stopped.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use hcx_pipeline::attribution::ReportSection;

use crate::scheduler::{self, NodeCapacity, PlanOptions};
use crate::service::plan_options;
use crate::state::{Command, JobRecord, JobState, MAX_GROUP_FORMATIONS, ShardRecord};
use crate::{Shared, now_ms};
use hcx_protocol::job::BlobFile;
use hcx_protocol::metrics as names;

/// How often the leader looks at the state.
const TICK: Duration = Duration::from_millis(100);

/// Per-node share of a job, written into the artifact's attribution report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeShare {
    /// Node name.
    pub node: String,
    /// Shards it compressed.
    pub shards: usize,
    /// Tensors in them.
    pub tensors: usize,
    /// Labels of those shards.
    pub labels: Vec<String>,
    /// Seconds spent in the kernels.
    pub kernel_seconds: f64,
    /// Seconds from assignment to upload.
    pub wall_seconds: f64,
    /// Source bytes fetched.
    pub bytes_in: u64,
    /// Shard bytes uploaded.
    pub bytes_out: u64,
}

/// Who compressed what in a finished job.
pub fn node_shares(job: &JobRecord) -> Vec<NodeShare> {
    let mut by: BTreeMap<String, NodeShare> = BTreeMap::new();
    for s in &job.shards {
        let Some(r) = &s.result else { continue };
        let e = by.entry(r.node.clone()).or_insert_with(|| NodeShare {
            node: r.node.clone(),
            shards: 0,
            tensors: 0,
            labels: Vec::new(),
            kernel_seconds: 0.0,
            wall_seconds: 0.0,
            bytes_in: 0,
            bytes_out: 0,
        });
        e.shards += 1;
        e.tensors += s.shard.tensors.len();
        e.labels.push(s.shard.label.clone());
        e.kernel_seconds += r.kernel_seconds;
        e.wall_seconds += r.wall_seconds;
        e.bytes_in += r.bytes_in;
        e.bytes_out += r.bytes;
    }
    by.into_values().collect()
}

/// Runs until `stop` turns true.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let merging: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut was_leader = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        if !shared.is_leader() {
            was_leader = false;
            continue;
        }
        if !was_leader {
            // A new leader has no heartbeat history: give every node a
            // full lease before judging it.
            shared.grace_all();
            was_leader = true;
        }
        tick(&shared, &merging).await;
        retain(&shared).await;
    }
}

/// Most jobs the retention policy deletes per tick (keeps each tick short).
const DELETES_PER_TICK: usize = 256;

/// Finished jobs the retention policy lets go now, oldest first: those
/// beyond `max_jobs`, those ended more than `max_age` ago, and while the
/// blobs the jobs need pass `max_bytes`, the oldest finished ones.
pub fn expired(
    jobs: &BTreeMap<String, JobRecord>,
    policy: crate::Retention,
    now_ms: u64,
) -> Vec<String> {
    let mut finished: Vec<(u64, &String)> = jobs
        .values()
        .filter_map(|j| j.finished_ms.map(|t| (t, &j.id)))
        .collect();
    finished.sort();
    let over = finished.len().saturating_sub(policy.max_jobs);
    // Blob bytes the jobs need, each blob counted once however many jobs
    // name it; deleting a job frees the blobs no other job names.
    let mut refs: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for j in jobs.values() {
        for (sha, n) in j.blobs() {
            refs.entry(sha).or_insert((0, n)).0 += 1;
        }
    }
    let mut held: u64 = refs.values().map(|(_, n)| n).sum();
    let mut out = Vec::new();
    for (i, (t, id)) in finished.iter().enumerate() {
        let by_count = i < over;
        let by_age = policy
            .max_age
            .is_some_and(|age| now_ms.saturating_sub(*t) > age.as_millis() as u64);
        let by_bytes = policy.max_bytes.is_some_and(|max| held > max);
        if !(by_count || by_age || by_bytes) {
            continue;
        }
        if let Some(j) = jobs.get(*id) {
            for (sha, _) in j.blobs() {
                if let Some(e) = refs.get_mut(sha) {
                    e.0 -= 1;
                    if e.0 == 0 {
                        held = held.saturating_sub(e.1);
                    }
                }
            }
        }
        out.push((*id).clone());
        if out.len() == DELETES_PER_TICK {
            break;
        }
    }
    out
}

/// How long a blob no job names is kept when this coordinator has not seen
/// a job name it (a model sent for a submit not yet committed).
const UNCLAIMED_BLOB_GRACE: Duration = Duration::from_secs(15 * 60);

/// How long a blob some job named before, and none names now, is kept after
/// it was last stored: room for a job storing the same bytes again (a
/// deterministic job run twice) to commit before the sweep.
const FREED_BLOB_GRACE: Duration = Duration::from_secs(10);

/// How long a piece of an interrupted transfer waits to be resumed.
const STALE_PIECE_AGE: Duration = Duration::from_secs(24 * 3600);

/// How often every coordinator sweeps its blob store.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// Runs on every coordinator until `stop`: removes the blobs and laid-out
/// model folders no job in the state needs. A blob some job named before is
/// removed once none does and [`FREED_BLOB_GRACE`] has passed since it was
/// last stored; one never named (sent, its job not yet committed) only
/// after [`UNCLAIMED_BLOB_GRACE`].
pub(crate) async fn sweep(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut claimed: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let (needed, models, results) = shared.view.read(|s| {
            let needed: HashSet<String> = s
                .jobs
                .values()
                .flat_map(|j| j.blobs().into_iter().map(|(sha, _)| sha.to_string()))
                .collect();
            let models: HashSet<String> = s
                .jobs
                .values()
                .filter_map(|j| j.spec.model.sent.as_ref().map(|m| m.digest()))
                .collect();
            // A finished job's shard files are named in its record, though
            // no longer needed: a shard that was done and merged between
            // two sweeps is still known as claimed.
            let results: Vec<String> = s
                .jobs
                .values()
                .flat_map(|j| j.shards.iter().filter_map(|r| r.result.as_ref()))
                .map(|r| r.sha256.clone())
                .collect();
            (needed, models, results)
        });
        claimed.extend(needed.iter().cloned());
        claimed.extend(results);
        let store = shared.blobs.clone();
        let data = shared.data_dir.clone();
        let seen = claimed.clone();
        let removed =
            tokio::task::spawn_blocking(move || sweep_once(&store, &data, &needed, &models, &seen))
                .await
                .unwrap_or_default();
        for sha in removed {
            claimed.remove(&sha);
        }
    }
}

/// One sweep; returns the blobs removed.
fn sweep_once(
    store: &crate::blobs::BlobStore,
    data: &Path,
    needed: &HashSet<String>,
    models: &HashSet<String>,
    claimed: &HashSet<String>,
) -> Vec<String> {
    let mut removed = Vec::new();
    store.drop_stale_pieces(STALE_PIECE_AGE);
    let Ok(list) = store.list() else {
        return removed;
    };
    for (sha, _) in list {
        if needed.contains(&sha) {
            continue;
        }
        let grace = if claimed.contains(&sha) {
            FREED_BLOB_GRACE
        } else {
            UNCLAIMED_BLOB_GRACE
        };
        if store.age(&sha).is_some_and(|age| age > grace) && store.remove(&sha).is_ok() {
            tracing::debug!("removed blob {sha}: no job needs it");
            removed.push(sha);
        }
    }
    if let Ok(rd) = std::fs::read_dir(data.join("models")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !models.contains(name.trim_end_matches(".partial")) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    removed
}

/// Deletes what the retention policy lets go.
async fn retain(shared: &Arc<Shared>) {
    let doomed = shared
        .view
        .read(|s| expired(&s.jobs, shared.retention, now_ms()));
    for job in doomed {
        let _ = delete_job(shared, &job).await;
    }
}

/// Deletes a finished job from the state; the blobs only it needed (its
/// shard files, its in-cluster artifact, a model no other job names) go
/// with every coordinator's next sweep. An artifact written to an output
/// folder is the operator's and stays.
pub(crate) async fn delete_job(
    shared: &Shared,
    job: &str,
) -> Result<crate::state::CommandResult, tonic::Status> {
    shared
        .propose(Command::DeleteJob {
            job: job.to_string(),
        })
        .await
}

async fn tick(shared: &Arc<Shared>, merging: &Arc<Mutex<HashSet<String>>>) {
    let jobs: Vec<JobRecord> = shared.view.read(|s| {
        s.jobs
            .values()
            .filter(|j| j.state.is_active())
            .cloned()
            .collect()
    });
    if jobs.is_empty() {
        return;
    }
    let nodes = shared.live_nodes();
    // Current load per node: cost of the shards it holds.
    let mut load: BTreeMap<String, f64> = BTreeMap::new();
    for j in &jobs {
        for s in &j.shards {
            if let (Some(n), None) = (&s.node, &s.result) {
                *load.entry(n.clone()).or_default() += load_on(&s.shard, n, &nodes);
            }
        }
    }
    for j in &jobs {
        let opts = plan_options(&j.spec);
        if j.state == JobState::Merging {
            start_merge(shared, merging, j.clone());
            continue;
        }
        if j.runs_as_group() {
            group_tick(shared, j, &opts, &nodes).await;
            continue;
        }
        let mut all_done = true;
        for s in &j.shards {
            if s.result.is_some() {
                continue;
            }
            all_done = false;
            match &s.node {
                Some(n) if !shared.alive(n) => {
                    let cmd = Command::Release {
                        job: j.id.clone(),
                        shard: s.shard.id,
                        attempt: s.attempt,
                        reason: format!(
                            "node {n} missed its lease ({} ms without a heartbeat)",
                            shared.lease.as_millis()
                        ),
                    };
                    tracing::warn!("{} shard {}: lease of {n} expired", j.id, s.shard.id);
                    metrics::counter!(names::LEASE_EXPIRIES).increment(1);
                    let _ = shared.propose(cmd).await;
                }
                Some(_) => {}
                None => {
                    if nodes.is_empty() {
                        continue;
                    }
                    let Some(node) = next_node(s, &nodes, &opts, &load) else {
                        continue;
                    };
                    *load.entry(node.clone()).or_default() += load_on(&s.shard, &node, &nodes);
                    let cmd = Command::Assign {
                        job: j.id.clone(),
                        shard: s.shard.id,
                        node,
                        attempt: s.attempt + 1,
                    };
                    let _ = shared.propose(cmd).await;
                }
            }
        }
        if all_done {
            let _ = shared
                .propose(Command::BeginMerge { job: j.id.clone() })
                .await;
        }
    }
}

/// Looks after a job run by a collective group: takes shards back from
/// members whose lease ran out, merges when every rank's shard is in, and
/// forms the group again once a formation broke (some rank failed or was
/// lost) and every member has let go of its shard, since a collective needs
/// all of its ranks. Each formation has a new epoch, so ranks of a broken
/// one cannot join it.
async fn group_tick(
    shared: &Arc<Shared>,
    j: &JobRecord,
    opts: &PlanOptions,
    nodes: &[NodeCapacity],
) {
    let mut held = false;
    for s in j.shards.iter().filter(|s| s.result.is_none()) {
        match &s.node {
            Some(n) if !shared.alive(n) => {
                tracing::warn!("{} rank {}: lease of {n} expired", j.id, s.shard.id);
                metrics::counter!(names::LEASE_EXPIRIES).increment(1);
                let cmd = Command::Release {
                    job: j.id.clone(),
                    shard: s.shard.id,
                    attempt: s.attempt,
                    reason: format!(
                        "node {n} missed its lease ({} ms without a heartbeat)",
                        shared.lease.as_millis()
                    ),
                };
                let _ = shared.propose(cmd).await;
                return;
            }
            Some(_) => held = true,
            None => {}
        }
    }
    if !j.shards.is_empty() && j.done() == j.shards.len() {
        let _ = shared
            .propose(Command::BeginMerge { job: j.id.clone() })
            .await;
        return;
    }
    let broken = j.group.is_none()
        || j.shards
            .iter()
            .any(|s| s.result.is_none() && s.node.is_none());
    if !broken || held {
        return;
    }
    let formation = j.group.as_ref().map_or(0, |g| g.formation);
    if formation >= MAX_GROUP_FORMATIONS {
        let last = j
            .shards
            .iter()
            .find_map(|s| s.last_error.clone())
            .unwrap_or_else(|| "no reason recorded".into());
        let cmd = Command::FinishJob {
            job: j.id.clone(),
            state: JobState::Failed {
                reason: format!("the collective group broke {formation} times; last: {last}"),
                stage: "collective".into(),
            },
            now_ms: now_ms(),
            artifact: Vec::new(),
            gate_notes: Vec::new(),
        };
        let _ = shared.propose(cmd).await;
        return;
    }
    let need = j
        .units
        .iter()
        .fold(0u64, |acc, u| acc.saturating_add(u.memory_bytes));
    let Ok(members) = scheduler::group_members(nodes, opts, need, j.units.len()) else {
        return;
    };
    tracing::info!(
        "{}: forming its collective group (formation {}) of {} node(s): {}",
        j.id,
        formation + 1,
        members.len(),
        members.join(", ")
    );
    let _ = shared
        .propose(Command::FormGroup {
            job: j.id.clone(),
            members,
        })
        .await;
}

/// What `shard` adds to the load of node `name`: its cost there
/// ([`crate::scheduler::cost_on`], less on a GPU node for the stages with a
/// GPU kernel), as the planner counted it.
fn load_on(shard: &crate::scheduler::Shard, name: &str, nodes: &[NodeCapacity]) -> f64 {
    nodes
        .iter()
        .find(|c| c.name == name)
        .map_or(shard.cost, |c| crate::scheduler::cost_on(shard, c))
}

/// The node a waiting shard goes to next: the least loaded able node, but
/// not one that already failed it (its `failed_by`, from the raft state, so
/// every leader decides alike) while another can take it.
fn next_node(
    s: &ShardRecord,
    nodes: &[NodeCapacity],
    opts: &PlanOptions,
    load: &BTreeMap<String, f64>,
) -> Option<String> {
    scheduler::reassign_avoiding(&s.shard, nodes, opts, load, &s.failed_by).ok()
}

fn start_merge(shared: &Arc<Shared>, merging: &Arc<Mutex<HashSet<String>>>, job: JobRecord) {
    {
        let mut m = merging.lock().unwrap_or_else(|p| p.into_inner());
        if !m.insert(job.id.clone()) {
            return;
        }
    }
    let shared = shared.clone();
    let merging = merging.clone();
    tokio::spawn(async move {
        let id = job.id.clone();
        let staging = staging_dir(&shared, &id);
        let finish = |state, artifact, gate_notes| Command::FinishJob {
            job: id.clone(),
            state,
            now_ms: now_ms(),
            artifact,
            gate_notes,
        };
        let cmd = match merge(&shared, &job, &staging).await {
            Ok(Merged::Done {
                artifact_bytes,
                source_bytes,
                files,
                gate_note,
            }) => finish(
                JobState::Succeeded {
                    artifact_bytes,
                    source_bytes,
                },
                files,
                gate_note.into_iter().collect(),
            ),
            Ok(Merged::Raise { note }) => {
                tracing::info!("{id}: missed its quality gate, raising the rate: {note}");
                Command::RaiseRate {
                    job: id.clone(),
                    from: job.raises,
                    note,
                }
            }
            Ok(Merged::Missed { reason, note }) => finish(
                JobState::Failed {
                    reason,
                    stage: "gate".into(),
                },
                Vec::new(),
                vec![note],
            ),
            Err(reason) => finish(
                JobState::Failed {
                    reason,
                    stage: "merge".into(),
                },
                Vec::new(),
                Vec::new(),
            ),
        };
        let _ = shared.propose(cmd).await;
        // The shard blobs go with the sweep once the job's end is
        // committed: a leader that dies before that leaves them for the
        // next one to merge again.
        let _ = std::fs::remove_dir_all(&staging);
        merging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    });
}

/// Where the leader merges a job whose artifact stays in the cluster.
fn staging_dir(shared: &Shared, job: &str) -> PathBuf {
    shared
        .data_dir
        .join("staging")
        .join(format!("{job}-artifact"))
}

/// What a merge came to.
enum Merged {
    /// The artifact is written (and passed the job's gates, if any).
    Done {
        artifact_bytes: u64,
        source_bytes: u64,
        /// The in-cluster artifact's files.
        files: Vec<BlobFile>,
        /// What the gates measured.
        gate_note: Option<String>,
    },
    /// It missed a gate and the job runs again one rate step up.
    Raise { note: String },
    /// It missed a gate for good.
    Missed { reason: String, note: String },
}

/// Merges a job's committed shards (fetching from peers any shard file this
/// coordinator lacks) into its artifact: its output folder, or for a job
/// kept in the cluster `staging`, whose files then become blobs held by a
/// majority. A job with quality gates has its artifact measured first; one
/// that misses is removed.
async fn merge(shared: &Arc<Shared>, job: &JobRecord, staging: &Path) -> Result<Merged, String> {
    let mut files = Vec::with_capacity(job.shards.len());
    for s in &job.shards {
        let r = s
            .result
            .as_ref()
            .ok_or_else(|| format!("shard {} has no result", s.shard.id))?;
        let f = shared
            .ensure_blob(&r.sha256)
            .await
            .map_err(|e| format!("shard {}: {e}", s.shard.id))?;
        files.push(f);
    }
    let mut spec = job.run_spec();
    spec.model.local = Some(shared.model_path(&job.spec).await?);
    let gated = spec.clone();
    let mut sections = vec![node_section(&node_shares(job))?];
    if let Some(g) = &job.group {
        sections.push(group_section(g));
    }
    let output = if job.in_cluster() {
        let _ = std::fs::remove_dir_all(staging);
        if let Some(p) = staging.parent() {
            std::fs::create_dir_all(p)
                .map_err(|e| format!("{}: cannot create: {e}", p.display()))?;
        }
        staging.to_path_buf()
    } else {
        PathBuf::from(&job.output)
    };
    let out_dir = output.clone();
    let out = tokio::task::spawn_blocking(move || {
        hcx_pipeline::shard::merge_shards(&spec, &files, &out_dir, &sections)
    })
    .await
    .map_err(|e| format!("merge task failed: {e}"))?
    .map_err(|e| e.to_string())?;
    let (artifact_bytes, source_bytes) =
        (out.attribution.artifact_bytes, out.attribution.source_bytes);
    let mut gate_note = None;
    if let Some(gates) = job.spec.gates.clone() {
        let dir = output.clone();
        let g = gates.clone();
        let checks =
            tokio::task::spawn_blocking(move || hcx_pipeline::gates::measure(&gated, &g, &dir))
                .await
                .map_err(|e| format!("gate task failed: {e}"))?;
        let checks = match checks {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&output);
                return Err(e.to_string());
            }
        };
        let mut notes = job.gate_notes.clone();
        let verdict =
            hcx_pipeline::gates::verdict(&job.spec, &gates, job.raises, &checks, &mut notes);
        let note = notes.pop().unwrap_or_default();
        match verdict {
            hcx_pipeline::gates::Verdict::Pass => gate_note = Some(note),
            hcx_pipeline::gates::Verdict::Raise(_) => {
                let _ = std::fs::remove_dir_all(&output);
                return Ok(Merged::Raise { note });
            }
            hcx_pipeline::gates::Verdict::Fail(reason) => {
                let _ = std::fs::remove_dir_all(&output);
                return Ok(Merged::Missed { reason, note });
            }
        }
    }
    if !job.in_cluster() {
        return Ok(Merged::Done {
            artifact_bytes,
            source_bytes,
            files: Vec::new(),
            gate_note,
        });
    }
    let store = shared.blobs.clone();
    let kept = tokio::task::spawn_blocking(move || keep_artifact(&store, &output))
        .await
        .map_err(|e| format!("storing the artifact failed: {e}"))??;
    for f in &kept {
        shared
            .replicate(&f.sha256, f.bytes)
            .await
            .map_err(|s| format!("artifact file {}: {}", f.name, s.message()))?;
    }
    Ok(Merged::Done {
        artifact_bytes,
        source_bytes,
        files: kept,
        gate_note,
    })
}

/// Moves a merged artifact folder's files into the blob store.
fn keep_artifact(store: &crate::blobs::BlobStore, dir: &Path) -> Result<Vec<BlobFile>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: cannot list: {e}", dir.display()))?;
    let mut names: Vec<String> = Vec::new();
    for e in rd {
        let e = e.map_err(|e| format!("{}: cannot list: {e}", dir.display()))?;
        let kind = e.file_type().map_err(|e| format!("{}: {e}", e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if !kind.is_file() {
            return Err(format!(
                "{}: the artifact holds {name}, which is not a plain file",
                dir.display()
            ));
        }
        names.push(name);
    }
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let (sha256, bytes) = store.adopt(&dir.join(&name)).map_err(|e| e.to_string())?;
        out.push(BlobFile {
            name,
            sha256,
            bytes,
        });
    }
    Ok(out)
}

/// The collective group that ran a calibrated job, for the report.
fn group_section(g: &crate::state::GroupRecord) -> ReportSection {
    let mut md = format!(
        "## Collective group\n\nCalibration ran data-parallel on {} node(s) linked {} (epoch {}, formation {}): {}. Every rank walked all blocks with its share of the calibration micro-batches; statistics and gradients were summed exactly over the ranks, so the tensors are those of a single-machine run.\n",
        g.members.len(),
        match g.backend {
            crate::state::GroupBackend::Ring => "in a ring over QUIC",
            crate::state::GroupBackend::Nccl => "through NCCL on their GPUs",
        },
        g.epoch,
        g.formation,
        g.members
            .iter()
            .zip(
                g.sites
                    .iter()
                    .map(String::as_str)
                    .chain(std::iter::repeat(""))
            )
            .map(|(m, s)| if s.is_empty() {
                m.clone()
            } else {
                format!("{m} (site {s})")
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(e) = &g.last_error {
        md.push_str(&format!(
            "\nThe group was formed again after it broke; the last break: {e}\n"
        ));
    }
    ReportSection {
        key: "group".into(),
        json: serde_json::json!({
            "epoch": g.epoch,
            "formation": g.formation,
            "members": g.members,
            "sites": g.sites,
            "backend": g.backend.name(),
            "last_error": g.last_error,
        }),
        markdown: md,
    }
}

/// The per-node table of the attribution report, written with the rest of
/// the report before the artifact is published.
fn node_section(shares: &[NodeShare]) -> Result<ReportSection, String> {
    let mut md = String::from(
        "## Per node\n\n| node | shards | tensors | kernel s | wall s | MB in | MB out |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for s in shares {
        md.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            s.node,
            s.shards,
            s.tensors,
            s.kernel_seconds,
            s.wall_seconds,
            s.bytes_in as f64 / 1e6,
            s.bytes_out as f64 / 1e6
        ));
    }
    Ok(ReportSection {
        key: "nodes".into(),
        json: serde_json::to_value(shares).map_err(|e| e.to_string())?,
        markdown: md,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{Placement, Shard};
    use crate::state::ClusterState;

    fn node(name: &str) -> NodeCapacity {
        NodeCapacity {
            name: name.into(),
            cores: 2,
            memory_bytes: 1 << 30,
            labels: BTreeMap::new(),
            draining: false,
            gpu: false,
        }
    }

    /// A one-shard job placed on `a`, whose attempt 1 then failed there.
    fn failed_on_a() -> ShardRecord {
        let mut st = ClusterState::default();
        let spec = serde_json::from_value(serde_json::json!({
            "name": "t", "model": "/m", "output": "/o",
            "pipeline": [{"rtn": {"bits": 8}}]
        }))
        .unwrap();
        let shard = Shard {
            id: 0,
            label: "layer.0".into(),
            layers: Some((0, 0)),
            tensors: vec!["layer.0.w".into()],
            cost: 1.0,
            gpu_cost: 0.0,
            memory_bytes: 16,
        };
        let r = st.apply(Command::SubmitJob {
            idempotency_key: None,
            spec: Box::new(spec),
            output: "/o".into(),
            shards: vec![shard],
            placements: vec![Placement {
                shard: 0,
                node: "a".into(),
            }],
            now_ms: 1,
        });
        let job = r.job.unwrap();
        let failed = st.apply(Command::ShardFailed {
            job: job.clone(),
            shard: 0,
            attempt: 1,
            reason: "a: fetch: connection lost".into(),
            stage: "fetch".into(),
            retryable: true,
        });
        assert!(failed.ok);
        st.jobs[&job].shards[0].clone()
    }

    #[test]
    fn a_failed_shard_goes_to_another_able_node() {
        let s = failed_on_a();
        let opts = PlanOptions::default();
        let load = BTreeMap::new();
        // a and b are equally idle (a wins ties), yet b gets the shard.
        let pick = next_node(&s, &[node("a"), node("b")], &opts, &load);
        assert_eq!(pick.as_deref(), Some("b"));
        // With a alone, a gets it back.
        let pick = next_node(&s, &[node("a")], &opts, &load);
        assert_eq!(pick.as_deref(), Some("a"));
    }

    /// A finished-or-not job record named `id`.
    fn job_record(id: &str) -> JobRecord {
        let mut st = crate::state::ClusterState::default();
        let spec = serde_json::from_value(serde_json::json!({
            "name": "t", "model": "/m", "output": "/o",
            "pipeline": [{"rtn": {"bits": 8}}]
        }))
        .unwrap();
        let r = st.apply(Command::SubmitJob {
            idempotency_key: None,
            spec: Box::new(spec),
            output: "/o".into(),
            shards: vec![],
            placements: vec![],
            now_ms: 1,
        });
        let mut j = st.jobs.remove(&r.job.unwrap()).unwrap();
        j.id = id.into();
        j
    }

    #[test]
    fn retention_lets_go_of_the_oldest_and_the_expired() {
        let mut jobs = BTreeMap::new();
        for (i, finished) in [Some(10u64), None, Some(30), Some(20), Some(40)]
            .into_iter()
            .enumerate()
        {
            let mut j = job_record(&format!("j{i}"));
            j.finished_ms = finished;
            jobs.insert(j.id.clone(), j);
        }
        let keep = |max_jobs, age: Option<u64>, now| {
            let p = crate::Retention {
                max_jobs,
                max_age: age.map(Duration::from_millis),
                max_bytes: None,
            };
            expired(&jobs, p, now)
        };
        // Keep 2 of the 4 finished: the two oldest go, the running one stays.
        assert_eq!(keep(2, None, 50), ["j0", "j3"]);
        assert_eq!(keep(10, None, 50), Vec::<String>::new());
        // Older than 15 ms at 50: ended at 10, 20 and 30.
        assert_eq!(keep(10, Some(15), 50), ["j0", "j3", "j2"]);
        assert_eq!(keep(0, None, 50).len(), 4);
    }

    #[test]
    fn retention_by_bytes_counts_a_shared_blob_once_and_frees_the_oldest() {
        let file = |sha: char, bytes: u64| BlobFile {
            name: format!("f{sha}"),
            sha256: sha.to_string().repeat(64),
            bytes,
        };
        let mut jobs = BTreeMap::new();
        // j0 (oldest) and j1 share model `a` (100 bytes); each has its own
        // artifact; j2 is still running with model `a`.
        for (i, finished, art) in [(0, Some(10u64), 'b'), (1, Some(20), 'c'), (2, None, 'd')] {
            let mut j = job_record(&format!("j{i}"));
            j.spec.model.sent = Some(hcx_protocol::job::SentModel {
                files: vec![file('a', 100)],
                file: None,
            });
            j.finished_ms = finished;
            if finished.is_some() {
                j.artifact = vec![file(art, 30)];
            }
            jobs.insert(j.id.clone(), j);
        }
        let keep = |max: u64| {
            let p = crate::Retention {
                max_jobs: 10,
                max_age: None,
                max_bytes: Some(max),
            };
            expired(&jobs, p, 50)
        };
        // 100 + 30 + 30 held; the shared model is not counted twice.
        assert_eq!(keep(160), Vec::<String>::new());
        // Deleting j0 frees only its artifact (j1, j2 still name `a`).
        assert_eq!(keep(159), ["j0"]);
        assert_eq!(keep(130), ["j0"]);
        // Below what the running job needs: every finished job goes.
        assert_eq!(keep(10), ["j0", "j1"]);
    }
}
