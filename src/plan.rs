//! `run --dry-run` and `submit --dry-run`: the plan of a job and what it
//! will cost, without running it. The shards and their placement are the leader's own
//! (`make_shards` and `place` over the job's tensors); the seconds and
//! bytes come from the cost model measured on this machine
//! ([`hcx_pipeline::estimate`]).

use std::collections::BTreeMap;

use anyhow::Result;
use hcx_coordinator::scheduler::{self, NodeCapacity};
use hcx_coordinator::service::{plan_options, tensor_costs};
use hcx_pipeline::estimate::{Estimate, estimate};
use hcx_protocol::{CalibrationParallel, JobSpec};
use serde::Serialize;

/// One shard of the plan with its estimates.
#[derive(Debug, Serialize)]
pub struct ShardPlan {
    /// The shard's id.
    pub id: u32,
    /// Its label (`layer.3`, `other`).
    pub label: String,
    /// The node it would run on.
    pub node: String,
    /// Its tensors.
    pub tensors: usize,
    /// Source bytes it reads.
    pub source_bytes: u64,
    /// Estimated CPU seconds of its encoding.
    pub cpu_seconds: f64,
    /// Estimated seconds on its node's cores.
    pub seconds: f64,
    /// Estimated peak working memory, bytes (the scheduler's figure: the
    /// shard's values as f32 with the chain's working copies).
    pub peak_memory_bytes: u64,
    /// Estimated bytes of its tensors in the artifact.
    pub artifact_bytes: u64,
}

/// A calibrated job's group in a dry run.
#[derive(Debug, Serialize)]
pub struct GroupPlan {
    /// Its members, by rank.
    pub members: Vec<String>,
    /// `data` (every rank walks every block over its share of the
    /// micro-batches) or `layers` (each rank walks its own blocks over
    /// every micro-batch, one stage after another).
    pub split: String,
}

/// A dry run's answer.
#[derive(Debug, Serialize)]
pub struct DryRun {
    /// The job's name.
    pub job: String,
    /// The nodes the plan places shards on.
    pub nodes: Vec<String>,
    /// Cores of the largest node.
    pub cores_per_node: u32,
    /// Every shard.
    pub shards: Vec<ShardPlan>,
    /// Estimated wall seconds: the busiest node's shards one after another.
    pub seconds: f64,
    /// The cost model's per-tensor estimates and totals.
    pub estimate: Estimate,
    /// A calibrated job's collective group: its members in rank order and
    /// how the work is split between them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupPlan>,
    /// The rates a `target` chose, when the job has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation: Option<hcx_pipeline::target::Allocation>,
}

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kb| kb * 1024)
}

/// The cores of this machine.
fn cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as u32
}

/// `n` in-process nodes of this machine, as `run --nodes N` starts them:
/// each sees every core.
pub fn local_nodes(n: usize) -> Vec<NodeCapacity> {
    (1..=n.max(1))
        .map(|i| NodeCapacity {
            name: format!("node-{i}"),
            cores: cores(),
            memory_bytes: memory_bytes(),
            labels: BTreeMap::new(),
            draining: false,
            gpu: hcx_kernels::gpu::describe().is_some(),
        })
        .collect()
}

/// Plans `spec` on `nodes` and estimates it. `in_process`: the nodes run
/// side by side in this process (`run --nodes N`) and share its cores;
/// otherwise each has its own (a cluster's registered nodes), and the
/// seconds measured here are divided by its cores.
pub fn dry_run(spec: &JobSpec, capacity: &[NodeCapacity], in_process: bool) -> Result<DryRun> {
    let est = estimate(spec)?;
    let cores = cores();
    let model = hcx_pipeline::model::Model::open(&spec.model.path)?;
    let costs = tensor_costs(&model.tensors, spec);
    let opts = plan_options(spec);
    let shards = scheduler::make_shards(&costs, &opts);
    let usable: Vec<NodeCapacity> = capacity.iter().filter(|n| !n.draining).cloned().collect();
    let by_name: BTreeMap<&str, &hcx_pipeline::estimate::TensorEstimate> =
        est.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    // A calibrated job runs as one group: the leader's plan shards become
    // units that each formation splits into one rank shard per member.
    let staged = spec
        .calibration
        .as_ref()
        .is_some_and(|c| c.parallel == CalibrationParallel::Layers);
    let (shards, placements, group) = match &est.walk {
        Some(_) => {
            let need = shards
                .iter()
                .fold(0u64, |acc, u| acc.saturating_add(u.memory_bytes));
            let members = if usable.is_empty() {
                Vec::new()
            } else {
                scheduler::group_members(&usable, &opts, need, shards.len())?
            };
            let units = if staged {
                scheduler::in_layer_order(&shards)
            } else {
                shards
            };
            let ranks = scheduler::rank_shards(&units, members.len().max(1));
            let placements: Vec<(u32, String)> = ranks
                .iter()
                .zip(&members)
                .map(|(s, m)| (s.id, m.clone()))
                .collect();
            let group = GroupPlan {
                members,
                split: if staged { "layers" } else { "data" }.into(),
            };
            (ranks, placements, Some(group))
        }
        None => {
            let placements = if usable.is_empty() {
                Vec::new()
            } else {
                scheduler::place(&shards, &usable, &opts, &BTreeMap::new())?
                    .into_iter()
                    .map(|p| (p.shard, p.node))
                    .collect()
            };
            (shards, placements, None)
        }
    };
    let cores_of: BTreeMap<&str, u32> = usable
        .iter()
        .map(|n| (n.name.as_str(), n.cores.max(1)))
        .collect();
    let walked: u64 = est
        .walk
        .as_ref()
        .map_or(0, |w| w.tensor_cpu_seconds.len() as u64);
    let mut busy: BTreeMap<String, f64> = BTreeMap::new();
    let mut out = Vec::with_capacity(shards.len());
    for s in &shards {
        let node = placements
            .iter()
            .find(|p| p.0 == s.id)
            .map(|p| p.1.clone())
            .unwrap_or_default();
        let ts: Vec<_> = s
            .tensors
            .iter()
            .filter_map(|n| by_name.get(n.as_str()))
            .collect();
        let mut cpu: f64 = ts.iter().map(|t| t.cpu_seconds).sum();
        if let (Some(w), Some(g)) = (&est.walk, &group) {
            // A rank's walk in place of its calibrated tensors' encoding.
            let own = |name: &str| w.tensor_cpu_seconds.contains_key(name);
            cpu -= ts
                .iter()
                .filter(|t| own(&t.name))
                .map(|t| t.cpu_seconds)
                .sum::<f64>();
            cpu += if staged {
                let mine = ts.iter().filter(|t| own(&t.name)).count() as f64;
                w.cpu_seconds() * mine / walked.max(1) as f64
            } else {
                w.rank_cpu_seconds(g.members.len())
            };
        }
        let seconds = if in_process {
            // Nodes side by side in one process share its cores.
            cpu / f64::from(cores) * usable.len().max(1) as f64
        } else {
            cpu / f64::from(cores_of.get(node.as_str()).copied().unwrap_or(1))
        };
        *busy.entry(node.clone()).or_default() += seconds;
        out.push(ShardPlan {
            id: s.id,
            label: s.label.clone(),
            node,
            tensors: ts.len(),
            source_bytes: ts.iter().map(|t| t.source_bytes).sum(),
            cpu_seconds: cpu,
            seconds,
            peak_memory_bytes: s.memory_bytes,
            artifact_bytes: ts.iter().map(|t| t.bytes + t.overhead_bytes).sum(),
        });
    }
    // A model split by layer runs its stages one after another.
    let seconds = if staged && group.is_some() {
        busy.values().sum()
    } else {
        busy.values().copied().fold(0.0, f64::max)
    };
    Ok(DryRun {
        job: spec.name.clone(),
        nodes: usable.iter().map(|n| n.name.clone()).collect(),
        cores_per_node: usable.iter().map(|n| n.cores).max().unwrap_or(0),
        shards: out,
        seconds,
        estimate: est,
        group,
        allocation: None,
    })
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

/// Prints a dry run for people.
pub fn print(d: &DryRun) {
    let e = &d.estimate;
    println!(
        "job `{}`: {} tensors, source {} → estimated artifact {} (ratio {:.2}×), {:.3} bits per weight over the {} compressed parameters",
        d.job,
        e.tensors.len(),
        mb(e.source_bytes),
        mb(e.artifact_bytes),
        e.source_bytes as f64 / e.artifact_bytes.max(1) as f64,
        e.bits_per_weight,
        e.compressed_params
    );
    let sampled: u64 = e.tensors.iter().map(|t| t.sampled).sum();
    let total: u64 = e.tensors.iter().map(|t| t.numel).sum();
    println!(
        "estimated run: {:.1} CPU-seconds (encoding, hashing and any calibration walk), {:.1} s on {} node(s) of up to {} cores (cost model measured on this machine, on {:.1} % of the values in {:.1} s)",
        e.cpu_seconds,
        d.seconds,
        d.nodes.len(),
        d.cores_per_node,
        100.0 * sampled as f64 / total.max(1) as f64,
        e.measured_in_seconds
    );
    if let Some(w) = &e.walk {
        println!(
            "calibration walk (measured on block 0 over {} of {} micro-batches, {} of {} token rows, scaled to {} blocks): loading {:.1}, forward passes and statistics {:.1} (1 + {} passes a block), calibrated encoding {:.1}, distillation {:.1}, end-to-end tuning {:.1} CPU-seconds",
            w.sampled_micro_batches,
            w.micro_batches,
            w.sampled_rows,
            w.rows,
            w.blocks,
            w.load_cpu_seconds,
            w.forward_cpu_seconds,
            w.plain_passes,
            w.encode_cpu_seconds,
            w.distill_cpu_seconds,
            w.end_to_end_cpu_seconds
        );
    }
    if let Some(g) = &d.group {
        println!(
            "one collective group of {} rank(s), split by {}: {}",
            g.members.len(),
            g.split,
            if g.members.is_empty() {
                "no node can take it yet".to_string()
            } else {
                g.members.join(", ")
            }
        );
    }
    println!(
        "{:>5}  {:<12} {:<8} {:>7} {:>10} {:>8} {:>10} {:>10}",
        "shard", "label", "node", "tensors", "source", "seconds", "peak mem", "artifact"
    );
    if d.nodes.is_empty() {
        println!("no node can take work yet: the shards are not placed");
    }
    for s in &d.shards {
        println!(
            "{:>5}  {:<12} {:<8} {:>7} {:>10} {:>8.2} {:>10} {:>10}",
            s.id,
            s.label,
            s.node,
            s.tensors,
            mb(s.source_bytes),
            s.seconds,
            mb(s.peak_memory_bytes),
            mb(s.artifact_bytes)
        );
    }
}

/// Prints a dry run as JSON or for people.
pub fn show(d: &DryRun, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(d)?);
    } else {
        print(d);
    }
    Ok(())
}
