//! Cluster scheduler: groups a model's tensors into shards and places the shards on nodes.
//!
//! Everything here is a pure function (no I/O, no async, no clock), so the leader can
//! compute a plan, commit it as a raft entry, and any replica can recompute it bit for bit.
//!
//! Formulas (all in abstract "cost units"; 1.0 per value = a cheap RTN pass):
//! - shard `cost` = Σ `numel × cost_per_value` + Σ `bytes × COST_PER_BYTE`
//!   (the byte term charges fetching the source and uploading the result);
//! - shard `memory_bytes` = Σ source `bytes` + `F32_WORKING_COPIES × 4 × max working values`
//!   (all sources resident, plus three f32 working copies of the largest tensor, or of
//!   its largest piece where it is encoded a piece of rows at a time:
//!   decoded original, transformed, reconstructed);
//! - a node's score for a shard = `(load + cost already assigned in this plan + shard cost) / cores`,
//!   i.e. the node's finish time if it took the shard (with equal cores this orders nodes
//!   exactly as "least loaded"; with unequal cores it keeps a big shard off a tiny idle node);
//!   on a node whose kernels run on a GPU the shard's `gpu_cost` (its stages with a GPU
//!   kernel) counts [`GPU_SPEEDUP`] times less, so such shards prefer GPU nodes.
//!
//! Non-finite or negative costs and loads count as 0 (a `+inf` load stays `+inf`), zero
//! cores count as 1; no input makes these functions panic.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Cost units charged per source byte moved (fetch + upload), added to the compute cost.
pub const COST_PER_BYTE: f64 = 0.01;
/// f32 working copies of the largest tensor a node holds at once while encoding a shard.
pub const F32_WORKING_COPIES: u64 = 3;
/// How many times faster a GPU node is assumed to run the stages that have
/// a GPU kernel than its CPU cores would: a planning estimate (no device
/// has measured it yet), used only to rank nodes.
pub const GPU_SPEEDUP: f64 = 10.0;
/// Dotted name components that introduce a layer index (`layers.N`, `layer.N`, `h.N`, `blocks.N`).
pub const LAYER_KEYS: [&str; 4] = ["layers", "layer", "h", "blocks"];

/// One source tensor as the planner sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorCost {
    /// Tensor name as stored in the safetensors header.
    pub name: String,
    /// Number of values.
    pub numel: u64,
    /// Size in bytes as stored in the source.
    pub bytes: u64,
    /// Relative encode cost per value of its codec chain (1.0 = cheap rtn); 0 for copied tensors.
    pub cost_per_value: f64,
    /// The part of `cost_per_value` spent in stages a GPU node runs on its
    /// device (the Hadamard rotation); at most `cost_per_value`.
    #[serde(default)]
    pub gpu_cost_per_value: f64,
    /// Values of it a node holds at once while encoding it, where fewer
    /// than `numel`: a tensor encoded a piece of rows at a time
    /// (`hcx_pipeline::run::working_values`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_values: Option<u64>,
}

/// A worker node as the planner sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeCapacity {
    /// Unique node name.
    pub name: String,
    /// CPU cores (0 is treated as 1).
    pub cores: u32,
    /// Memory available for shard work, in bytes.
    pub memory_bytes: u64,
    /// Free-form labels, e.g. `site=a`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A draining node takes no new shards.
    #[serde(default)]
    pub draining: bool,
    /// Its kernels run on a GPU (see [`GPU_SPEEDUP`]).
    #[serde(default)]
    pub gpu: bool,
}

/// A shard: a contiguous group of tensors compressed together on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    /// Shard id, 0.. in plan order.
    pub id: u32,
    /// "layer.3" / "layers 3-5" style label for display
    pub label: String,
    /// first and last layer index, None for non-layer shards (embeddings, head, norms)
    pub layers: Option<(u32, u32)>,
    /// Names of the tensors in this shard, name-sorted.
    pub tensors: Vec<String>,
    /// Estimated encode cost (see the module docs for the formula).
    pub cost: f64,
    /// The part of `cost` in stages with a GPU kernel.
    #[serde(default)]
    pub gpu_cost: f64,
    /// peak working memory estimate in bytes
    pub memory_bytes: u64,
}

/// Knobs for sharding and placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlanOptions {
    /// at most this many layers per shard (>=1); default 1 = one shard per layer
    pub layers_per_shard: u32,
    /// label constraints every chosen node must satisfy, e.g. site=a
    pub require_labels: BTreeMap<String, String>,
    /// A federated job's sites: its group takes nodes of these sites only
    /// (the `site` label), at least one of each, a site's ranks side by side.
    pub sites: Vec<String>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            layers_per_shard: 1,
            require_labels: BTreeMap::new(),
            sites: Vec::new(),
        }
    }
}

/// One shard assigned to one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The shard's id.
    pub shard: u32,
    /// The node's name.
    pub node: String,
}

/// A complete plan: the shards and where each one runs (placements sorted by shard id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Shards, indexed by id.
    pub shards: Vec<Shard>,
    /// One placement per shard, sorted by shard id.
    pub placements: Vec<Placement>,
}

/// Why a plan or a re-assignment could not be made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum ScheduleError {
    /// No node can take this shard.
    #[error("no eligible node for shard {shard} (needs {need_bytes} bytes of memory): {why}")]
    NoEligibleNode {
        /// The shard's label.
        shard: String,
        /// The shard's peak memory estimate.
        need_bytes: u64,
        /// Per-reason node counts, e.g. "3 nodes: 1 draining, 2 lack site=b".
        why: String,
    },
    /// The model has no tensors.
    #[error("the model has no tensors to schedule")]
    NoTensors,
}

/// Layer index of a tensor name: N from the first `layers.N`, `layer.N`, `h.N` or `blocks.N`
/// pair of dotted components, where N is all ASCII digits and fits in a `u32`.
pub fn layer_index(name: &str) -> Option<u32> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| {
        let digits = !w[1].is_empty() && w[1].bytes().all(|b| b.is_ascii_digit());
        if LAYER_KEYS.contains(&w[0]) && digits {
            w[1].parse().ok()
        } else {
            None
        }
    })
}

/// NaN and negative values count as 0.
fn clean(x: f64) -> f64 {
    if x > 0.0 { x } else { 0.0 }
}

fn cmp_tensor(a: &TensorCost, b: &TensorCost) -> Ordering {
    (a.name.as_str(), a.numel, a.bytes)
        .cmp(&(b.name.as_str(), b.numel, b.bytes))
        .then_with(|| a.cost_per_value.total_cmp(&b.cost_per_value))
}

fn node_key(n: &NodeCapacity) -> impl Ord + '_ {
    (&n.name, n.cores, n.memory_bytes, n.draining, &n.labels)
}

#[derive(PartialEq, Eq)]
enum GroupKey {
    Layers(u32, u32),
    Other(String),
}

/// Groups tensors into shards.
///
/// Tensors with a [`layer_index`] are grouped by layer, and runs of consecutive layers are
/// merged, at most `layers_per_shard` (0 counts as 1) layers a shard; a gap in the layer
/// numbers always starts a new shard, so every layer shard covers a contiguous range by
/// construction. Other tensors are grouped by their first dotted name component
/// (`embeddings.*`, `pooler.*`, …). Shard ids run 0.. in the order of each group's first
/// tensor in name-sorted order (plain byte order: `layer.10` sorts before `layer.2`);
/// tensor lists are name-sorted. Every input tensor lands in exactly one shard.
pub fn make_shards(tensors: &[TensorCost], opts: &PlanOptions) -> Vec<Shard> {
    let lps = opts.layers_per_shard.max(1);
    let mut sorted: Vec<&TensorCost> = tensors.iter().collect();
    sorted.sort_by(|a, b| cmp_tensor(a, b));

    // Runs of consecutive layers, cut every `lps` layers: layer -> (first, last).
    let mut layers: Vec<u32> = sorted.iter().filter_map(|t| layer_index(&t.name)).collect();
    layers.sort_unstable();
    layers.dedup();
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for &l in &layers {
        match ranges.last_mut() {
            Some((first, last)) if last.checked_add(1) == Some(l) && l - *first < lps => *last = l,
            _ => ranges.push((l, l)),
        }
    }
    let range_of = |l: u32| {
        let i = ranges.partition_point(|r| r.1 < l);
        ranges[i]
    };

    let mut groups: Vec<(GroupKey, Vec<&TensorCost>)> = Vec::new();
    for t in sorted {
        let key = match layer_index(&t.name) {
            Some(l) => {
                let (a, b) = range_of(l);
                GroupKey::Layers(a, b)
            }
            None => GroupKey::Other(t.name.split('.').next().unwrap_or_default().to_string()),
        };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(t),
            None => groups.push((key, vec![t])),
        }
    }

    groups
        .into_iter()
        .enumerate()
        .map(|(i, (key, members))| {
            let (label, layers) = match key {
                GroupKey::Layers(a, b) if a == b => (format!("layer.{a}"), Some((a, b))),
                GroupKey::Layers(a, b) => (format!("layers {a}-{b}"), Some((a, b))),
                GroupKey::Other(k) if k.is_empty() => ("(unnamed)".to_string(), None),
                GroupKey::Other(k) => (k, None),
            };
            let cost: f64 = members
                .iter()
                .map(|t| {
                    clean(t.numel as f64 * clean(t.cost_per_value)) + t.bytes as f64 * COST_PER_BYTE
                })
                .sum();
            let gpu_cost: f64 = members
                .iter()
                .map(|t| clean(t.numel as f64 * clean(t.gpu_cost_per_value.min(t.cost_per_value))))
                .sum();
            let source = members
                .iter()
                .fold(0u64, |acc, t| acc.saturating_add(t.bytes));
            let largest = members
                .iter()
                .map(|t| t.working_values.map_or(t.numel, |w| w.min(t.numel)))
                .max()
                .unwrap_or(0);
            let working = largest.saturating_mul(4 * F32_WORKING_COPIES);
            Shard {
                id: u32::try_from(i).unwrap_or(u32::MAX),
                label,
                layers,
                tensors: members.iter().map(|t| t.name.clone()).collect(),
                cost: clean(cost).min(f64::MAX),
                gpu_cost: clean(gpu_cost).min(clean(cost)).min(f64::MAX),
                memory_bytes: source.saturating_add(working),
            }
        })
        .collect()
}

/// Why a node cannot take a shard, in the order the checks run.
enum Unfit {
    Excluded,
    Draining,
    Lacks(String),
    Memory,
}

fn check(node: &NodeCapacity, need: u64, o: &PlanOptions, ex: &[String]) -> Result<(), Unfit> {
    if ex.contains(&node.name) {
        return Err(Unfit::Excluded);
    }
    if node.draining {
        return Err(Unfit::Draining);
    }
    let labels = &node.labels;
    if let Some((k, v)) = o
        .require_labels
        .iter()
        .find(|(k, v)| labels.get(*k) != Some(*v))
    {
        return Err(Unfit::Lacks(format!("{k}={v}")));
    }
    if node.memory_bytes < need {
        return Err(Unfit::Memory);
    }
    Ok(())
}

fn no_eligible(
    shard: &Shard,
    nodes: &[&NodeCapacity],
    o: &PlanOptions,
    ex: &[String],
) -> ScheduleError {
    let why = if nodes.is_empty() {
        "no nodes registered".to_string()
    } else {
        let (mut excluded, mut draining, mut small, mut largest) = (0, 0, 0, 0u64);
        let mut lacks: BTreeMap<String, usize> = BTreeMap::new();
        for n in nodes {
            match check(n, shard.memory_bytes, o, ex) {
                Err(Unfit::Excluded) => excluded += 1,
                Err(Unfit::Draining) => draining += 1,
                Err(Unfit::Lacks(kv)) => *lacks.entry(kv).or_default() += 1,
                Err(Unfit::Memory) => {
                    small += 1;
                    largest = largest.max(n.memory_bytes);
                }
                Ok(()) => {}
            }
        }
        let counts = [(excluded, "excluded"), (draining, "draining")];
        let mut parts: Vec<String> = counts
            .iter()
            .filter(|c| c.0 > 0)
            .map(|(c, w)| format!("{c} {w}"))
            .collect();
        parts.extend(lacks.iter().map(|(kv, c)| format!("{c} lack {kv}")));
        if small > 0 {
            parts.push(format!(
                "{small} have too little memory (largest {largest} bytes)"
            ));
        }
        let plural = if nodes.len() == 1 { "" } else { "s" };
        format!("{} node{plural}: {}", nodes.len(), parts.join(", "))
    };
    let (shard, need_bytes) = (shard.label.clone(), shard.memory_bytes);
    ScheduleError::NoEligibleNode {
        shard,
        need_bytes,
        why,
    }
}

/// Nodes in a total order, so results never depend on the caller's order.
fn sorted_nodes(nodes: &[NodeCapacity]) -> Vec<&NodeCapacity> {
    let mut sorted: Vec<&NodeCapacity> = nodes.iter().collect();
    sorted.sort_by(|a, b| node_key(a).cmp(&node_key(b)));
    sorted
}

/// The eligible, non-excluded node with the least `(load(node) + shard cost) / cores`,
/// ties by node name.
fn pick<'a>(
    shard: &Shard,
    nodes: &[&'a NodeCapacity],
    opts: &PlanOptions,
    load: impl Fn(&str) -> f64,
    exclude: &[String],
) -> Result<&'a str, ScheduleError> {
    let mut best: Option<(f64, &'a str)> = None;
    for n in nodes {
        if check(n, shard.memory_bytes, opts, exclude).is_err() {
            continue;
        }
        let score = (load(&n.name) + cost_on(shard, n)) / f64::from(n.cores.max(1));
        let better = best.is_none_or(|(s, name)| {
            score.total_cmp(&s).then_with(|| n.name.as_str().cmp(name)) == Ordering::Less
        });
        if better {
            best = Some((score, n.name.as_str()));
        }
    }
    best.map(|(_, name)| name)
        .ok_or_else(|| no_eligible(shard, nodes, opts, exclude))
}

/// The shard's cost on a node: the part with a GPU kernel runs
/// [`GPU_SPEEDUP`] times faster on a GPU node. The load a node carries is
/// the sum of this over its shards.
pub fn cost_on(shard: &Shard, node: &NodeCapacity) -> f64 {
    let cost = clean(shard.cost);
    if node.gpu {
        let gpu = clean(shard.gpu_cost).min(cost);
        cost - gpu + gpu / GPU_SPEEDUP
    } else {
        cost
    }
}

fn load_of(load: &BTreeMap<String, f64>, node: &str) -> f64 {
    load.get(node).copied().map_or(0.0, clean)
}

/// Places shards on nodes by longest-processing-time greedy: shards in decreasing cost
/// (ties by id), each to the eligible node (not draining, has every `require_labels` k=v,
/// `memory_bytes >= shard.memory_bytes`) with the least
/// `(load + cost assigned so far + shard cost) / cores`, ties by node name. `load` is
/// existing work per node name in cost units. Deterministic whatever the order of `nodes`.
/// Placements come back sorted by shard id.
pub fn place(
    shards: &[Shard],
    nodes: &[NodeCapacity],
    opts: &PlanOptions,
    load: &BTreeMap<String, f64>,
) -> Result<Vec<Placement>, ScheduleError> {
    let nodes = sorted_nodes(nodes);
    let mut order: Vec<&Shard> = shards.iter().collect();
    order.sort_by(|a, b| {
        clean(b.cost)
            .total_cmp(&clean(a.cost))
            .then(a.id.cmp(&b.id))
            .then_with(|| {
                (a.memory_bytes, &a.label, &a.tensors).cmp(&(b.memory_bytes, &b.label, &b.tensors))
            })
    });
    let mut assigned: BTreeMap<&str, f64> = BTreeMap::new();
    let mut out = Vec::with_capacity(shards.len());
    for shard in order {
        let node = pick(
            shard,
            &nodes,
            opts,
            |n| load_of(load, n) + assigned.get(n).copied().unwrap_or(0.0),
            &[],
        )?;
        let on = nodes
            .iter()
            .find(|n| n.name == node)
            .map_or(clean(shard.cost), |n| cost_on(shard, n));
        *assigned.entry(node).or_insert(0.0) += on;
        out.push(Placement {
            shard: shard.id,
            node: node.to_string(),
        });
    }
    out.sort_by(|a, b| (a.shard, &a.node).cmp(&(b.shard, &b.node)));
    Ok(out)
}

/// Shards the tensors ([`make_shards`]) and places the shards on an idle cluster ([`place`]).
pub fn plan(
    tensors: &[TensorCost],
    nodes: &[NodeCapacity],
    opts: &PlanOptions,
) -> Result<Plan, ScheduleError> {
    if tensors.is_empty() {
        return Err(ScheduleError::NoTensors);
    }
    let shards = make_shards(tensors, opts);
    let placements = place(&shards, nodes, opts, &BTreeMap::new())?;
    Ok(Plan { shards, placements })
}

/// Picks a node for one shard being re-assigned (lease expired / node drained): eligible, not in `exclude`, least loaded.
///
/// "Least loaded" uses the same score as [`place`]: `(load + shard cost) / cores`, ties by name.
pub fn reassign(
    shard: &Shard,
    nodes: &[NodeCapacity],
    opts: &PlanOptions,
    load: &BTreeMap<String, f64>,
    exclude: &[String],
) -> Result<String, ScheduleError> {
    let nodes = sorted_nodes(nodes);
    pick(shard, &nodes, opts, |n| load_of(load, n), exclude).map(str::to_owned)
}

/// Picks a node for a shard whose earlier attempts failed on the nodes in `failed_by`
/// (see [`reassign`]): a node that just failed the shard does not get it straight back
/// while another eligible node can take it; when none can, the failed nodes are
/// candidates again, so a passing fault on the only able node does not stall the job.
pub fn reassign_avoiding(
    shard: &Shard,
    nodes: &[NodeCapacity],
    opts: &PlanOptions,
    load: &BTreeMap<String, f64>,
    failed_by: &[String],
) -> Result<String, ScheduleError> {
    reassign(shard, nodes, opts, load, failed_by)
        .or_else(|_| reassign(shard, nodes, opts, load, &[]))
}

/// A job's shards reordered for a model split by layer: the shards
/// without layers first (embeddings, head, …, in id order), then the layer
/// shards by their first layer as a number (ids follow name order, where
/// `layer.10` comes before `layer.2`). [`rank_shards`] over this order gives
/// each rank a run of consecutive layers.
pub fn in_layer_order(units: &[Shard]) -> Vec<Shard> {
    let mut out = units.to_vec();
    out.sort_by_key(|u| u.layers.map(|l| l.0));
    out
}

/// Splits a job's shards (`units`, in id order) into `n` rank shards for a
/// collective group, where every rank runs the whole calibration and writes
/// the tensors of its own rank shard: contiguous runs of units, cut where
/// the running cost first reaches each k/n of the total, and never leaving
/// a rank empty. `n` is clamped to `1..=units.len()`; ids run 0.. in rank
/// order; every tensor lands in exactly one rank shard.
pub fn rank_shards(units: &[Shard], n: usize) -> Vec<Shard> {
    if units.is_empty() {
        return Vec::new();
    }
    let n = n.clamp(1, units.len());
    let total: f64 = units.iter().map(|u| clean(u.cost)).sum();
    let mut parts: Vec<Vec<&Shard>> = vec![Vec::new()];
    let mut running = 0.0;
    for (i, u) in units.iter().enumerate() {
        let left = units.len() - i;
        let open = n - parts.len();
        let filled = !parts.last().expect("one part at least").is_empty();
        // Cut before this unit when the part reached its share, or when
        // every remaining unit is needed to give each rank one.
        let share = total * parts.len() as f64 / n as f64;
        if filled && open > 0 && (running >= share || left == open) {
            parts.push(Vec::new());
        }
        running += clean(u.cost);
        parts.last_mut().expect("one part at least").push(u);
    }
    parts
        .into_iter()
        .enumerate()
        .map(|(rank, members)| {
            let labels: Vec<&str> = members.iter().map(|u| u.label.as_str()).collect();
            let label = match labels.as_slice() {
                [one] => one.to_string(),
                [first, .., last] => format!("{first} … {last} ({} shards)", labels.len()),
                [] => String::new(),
            };
            let mut tensors: Vec<String> = members.iter().flat_map(|u| u.tensors.clone()).collect();
            tensors.sort();
            let first = members.iter().filter_map(|u| u.layers).map(|l| l.0).min();
            let last = members.iter().filter_map(|u| u.layers).map(|l| l.1).max();
            Shard {
                id: u32::try_from(rank).unwrap_or(u32::MAX),
                label,
                layers: first.zip(last),
                tensors,
                cost: members
                    .iter()
                    .map(|u| clean(u.cost))
                    .sum::<f64>()
                    .min(f64::MAX),
                gpu_cost: members
                    .iter()
                    .map(|u| clean(u.gpu_cost))
                    .sum::<f64>()
                    .min(f64::MAX),
                memory_bytes: members
                    .iter()
                    .fold(0u64, |acc, u| acc.saturating_add(u.memory_bytes)),
            }
        })
        .collect()
}

/// The members of a collective group in rank order (by name): every node
/// that may take the job's work (not draining, every required label, at
/// least `need_bytes` of memory, since each rank holds the whole model), at
/// most `max` of them. Deterministic whatever the order of `nodes`.
///
/// For a federated job (`opts.sites`) only nodes of its sites take part, at
/// least one of each site (taken by turns, site by site, while more than
/// `max` are able), in rank order by site and then name, so a site's ranks
/// are neighbours in the ring.
pub fn group_members(
    nodes: &[NodeCapacity],
    opts: &PlanOptions,
    need_bytes: u64,
    max: usize,
) -> Result<Vec<String>, ScheduleError> {
    let sorted = sorted_nodes(nodes);
    if !opts.sites.is_empty() {
        return site_members(&sorted, opts, need_bytes, max);
    }
    let members: Vec<String> = sorted
        .iter()
        .filter(|n| check(n, need_bytes, opts, &[]).is_ok())
        .take(max.max(1))
        .map(|n| n.name.clone())
        .collect();
    if members.is_empty() {
        let whole = Shard {
            id: 0,
            label: "the whole model (a collective group)".into(),
            layers: None,
            tensors: Vec::new(),
            cost: 0.0,
            gpu_cost: 0.0,
            memory_bytes: need_bytes,
        };
        return Err(no_eligible(&whole, &sorted, opts, &[]));
    }
    Ok(members)
}

/// [`group_members`] for a federated job.
fn site_members(
    sorted: &[&NodeCapacity],
    opts: &PlanOptions,
    need_bytes: u64,
    max: usize,
) -> Result<Vec<String>, ScheduleError> {
    let mut able: Vec<Vec<&NodeCapacity>> = Vec::with_capacity(opts.sites.len());
    for site in &opts.sites {
        let mut o = opts.clone();
        o.require_labels.insert("site".into(), site.clone());
        let ok: Vec<&NodeCapacity> = sorted
            .iter()
            .copied()
            .filter(|n| check(n, need_bytes, &o, &[]).is_ok())
            .collect();
        if ok.is_empty() {
            let whole = Shard {
                id: 0,
                label: format!("site {site}'s part of the collective group"),
                layers: None,
                tensors: Vec::new(),
                cost: 0.0,
                gpu_cost: 0.0,
                memory_bytes: need_bytes,
            };
            return Err(no_eligible(&whole, sorted, &o, &[]));
        }
        able.push(ok);
    }
    let max = max.max(able.len());
    let mut taken = vec![0usize; able.len()];
    let mut count = 0;
    'turns: loop {
        let mut any = false;
        for (i, nodes) in able.iter().enumerate() {
            if count == max {
                break 'turns;
            }
            if taken[i] < nodes.len() {
                taken[i] += 1;
                count += 1;
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    let mut members: Vec<(&str, &str)> = able
        .iter()
        .zip(&taken)
        .zip(&opts.sites)
        .flat_map(|((nodes, &k), site)| {
            nodes[..k]
                .iter()
                .map(move |n| (site.as_str(), n.name.as_str()))
        })
        .collect();
    members.sort();
    Ok(members.into_iter().map(|(_, n)| n.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const GIB: u64 = 1 << 30;

    fn tc(name: &str, numel: u64, bytes: u64, cost_per_value: f64) -> TensorCost {
        let name = name.to_string();
        TensorCost {
            name,
            numel,
            bytes,
            cost_per_value,
            gpu_cost_per_value: 0.0,
            working_values: None,
        }
    }

    fn t(name: &str, numel: u64) -> TensorCost {
        tc(name, numel, numel * 4, 1.0)
    }

    fn site(site: Option<&str>) -> BTreeMap<String, String> {
        site.map(|s| ("site".to_string(), s.to_string()))
            .into_iter()
            .collect()
    }

    fn node(name: &str, cores: u32, mem: u64, at: Option<&str>, draining: bool) -> NodeCapacity {
        let (name, labels) = (name.to_string(), site(at));
        NodeCapacity {
            name,
            cores,
            memory_bytes: mem,
            labels,
            draining,
            gpu: false,
        }
    }

    fn opts(layers_per_shard: u32, at: Option<&str>) -> PlanOptions {
        PlanOptions {
            layers_per_shard,
            require_labels: site(at),
            sites: Vec::new(),
        }
    }

    fn names(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    /// all-MiniLM-L6-v2's tensor list (6 layers × 16 tensors + embeddings + pooler), reversed.
    fn minilm() -> Vec<TensorCost> {
        let mut v = Vec::new();
        let modules = "attention.self.query attention.self.key attention.self.value \
            attention.output.dense attention.output.LayerNorm intermediate.dense \
            output.dense output.LayerNorm";
        for l in 0..6 {
            for m in names(modules) {
                for p in ["weight", "bias"] {
                    v.push(t(&format!("encoder.layer.{l}.{m}.{p}"), 384 * 384));
                }
            }
        }
        let emb = "word_embeddings.weight position_embeddings.weight \
            token_type_embeddings.weight LayerNorm.weight LayerNorm.bias";
        for e in names(emb) {
            v.push(t(&format!("embeddings.{e}"), 30522 * 384));
        }
        v.push(t("pooler.dense.weight", 384 * 384));
        v.push(t("pooler.dense.bias", 384));
        v.reverse(); // input order must not matter
        v
    }

    #[test]
    fn layer_index_names() {
        let l = layer_index;
        assert_eq!(l("encoder.layer.3.attention.self.query.weight"), Some(3));
        assert_eq!(l("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(l("transformer.h.0.attn.c_attn.weight"), Some(0));
        assert_eq!(l("blocks.7.norm.weight"), Some(7));
        assert_eq!(l("h.x.layers.4.h.5"), Some(4));
        for none in [
            "embeddings.word_embeddings.weight",
            "h.x.y",
            "layers.",
            "",
            "layers.+3",
        ] {
            assert_eq!(l(none), None, "{none}");
        }
        assert_eq!(l("layers.99999999999.w"), None);
    }

    #[test]
    fn minilm_one_shard_per_layer() {
        let shards = make_shards(&minilm(), &PlanOptions::default());
        let labels: Vec<String> = shards.iter().map(|s| s.label.clone()).collect();
        let want = "embeddings layer.0 layer.1 layer.2 layer.3 layer.4 layer.5 pooler";
        assert_eq!(labels, names(want));
        assert!(shards.iter().enumerate().all(|(i, s)| s.id as usize == i));
        assert_eq!((shards[0].tensors.len(), shards[0].layers), (5, None));
        assert_eq!(
            shards[7].tensors,
            ["pooler.dense.bias", "pooler.dense.weight"]
        );
        for (i, s) in (0..).zip(&shards[1..7]) {
            assert_eq!((s.tensors.len(), s.layers), (16, Some((i, i))));
            assert!(s.tensors.is_sorted());
        }
    }

    #[test]
    fn minilm_two_layers_per_shard() {
        let shards = make_shards(&minilm(), &opts(2, None));
        let layer: Vec<_> = shards
            .iter()
            .filter_map(|s| s.layers.zip(Some(&*s.label)))
            .collect();
        let want = [
            ((0, 1), "layers 0-1"),
            ((2, 3), "layers 2-3"),
            ((4, 5), "layers 4-5"),
        ];
        assert_eq!(layer, want);
        assert_eq!(shards.len(), 5);
    }

    #[test]
    fn gaps_split_layer_runs() {
        let ts: Vec<_> = [0, 1, 3, 4, 5]
            .iter()
            .map(|l| t(&format!("h.{l}.w"), 1))
            .collect();
        let shards = make_shards(&ts, &opts(3, None));
        let ranges: Vec<_> = shards.iter().filter_map(|s| s.layers).collect();
        assert_eq!(ranges, [(0, 1), (3, 5)]);
    }

    #[test]
    fn cost_and_memory_formulas() {
        let ts = [tc("a.w", 100, 200, 2.0), tc("a.b", 10, 40, f64::NAN)];
        let s = &make_shards(&ts, &PlanOptions::default())[0];
        assert_eq!(s.tensors, ["a.b", "a.w"]);
        assert!((s.cost - (200.0 + 240.0 * COST_PER_BYTE)).abs() < 1e-9);
        assert_eq!(s.memory_bytes, 240 + 3 * 4 * 100);
        // A tensor encoded a piece of rows at a time holds one piece.
        let mut pieced = ts.clone();
        pieced[0].working_values = Some(30);
        let s = &make_shards(&pieced, &PlanOptions::default())[0];
        assert_eq!(s.memory_bytes, 240 + 3 * 4 * 30);
        // Never more than the tensor.
        pieced[0].working_values = Some(1_000);
        let s = &make_shards(&pieced, &PlanOptions::default())[0];
        assert_eq!(s.memory_bytes, 240 + 3 * 4 * 100);
    }

    #[test]
    fn placement_respects_labels() {
        let nodes = [
            node("a1", 4, GIB, Some("a"), false),
            node("b1", 64, GIB, Some("b"), false),
            node("a2", 4, GIB, Some("a"), true),
        ];
        let p = plan(&minilm(), &nodes, &opts(1, Some("a"))).unwrap();
        assert!(p.placements.iter().all(|pl| pl.node == "a1"));
        let ids: Vec<u32> = p.placements.iter().map(|pl| pl.shard).collect();
        assert_eq!(ids, (0..8).collect::<Vec<_>>());
    }

    /// Shards whose chains have a GPU kernel (the Hadamard rotation) go to
    /// a node whose kernels run on a GPU while it is not much busier than
    /// the others; shards without one are placed by load alone.
    #[test]
    fn gpu_nodes_take_the_shards_with_gpu_kernels() {
        let rotated = |name: &str| TensorCost {
            gpu_cost_per_value: 0.5,
            ..tc(name, 1000, 4000, 6.5)
        };
        let mut gpu = node("b", 2, GIB, None, false);
        gpu.gpu = true;
        let nodes = [node("a", 2, GIB, None, false), gpu.clone()];
        let shards = make_shards(&[rotated("layer.0.w")], &opts(1, None));
        assert!((shards[0].gpu_cost - 500.0).abs() < 1e-9);
        // Alone, the rotated shard goes to the GPU node (by name it would
        // go to `a`); a plain one goes to `a`.
        let p = place(&shards, &nodes, &opts(1, None), &BTreeMap::new()).unwrap();
        assert_eq!(p[0].node, "b");
        let plain = make_shards(&[tc("layer.0.w", 1000, 4000, 6.5)], &opts(1, None));
        let p = place(&plain, &nodes, &opts(1, None), &BTreeMap::new()).unwrap();
        assert_eq!(p[0].node, "a");
        // The saving is what it is worth, not a rule: with more load on the
        // GPU node than the saving, the shard goes to the idle CPU node.
        let busy: BTreeMap<String, f64> = [("b".to_string(), 1000.0)].into();
        let p = place(&shards, &nodes, &opts(1, None), &busy).unwrap();
        assert_eq!(p[0].node, "a");
        let light: BTreeMap<String, f64> = [("b".to_string(), 100.0)].into();
        let p = place(&shards, &nodes, &opts(1, None), &light).unwrap();
        assert_eq!(p[0].node, "b");
        assert_eq!(
            reassign(&shards[0], &nodes, &opts(1, None), &BTreeMap::new(), &[]).unwrap(),
            "b"
        );
    }

    #[test]
    fn drained_nodes_get_nothing_and_lpt_balances() {
        let nodes = [
            node("n3", 4, GIB, None, false),
            node("n2", 4, GIB, None, true),
            node("n1", 4, GIB, None, false),
        ];
        let p = plan(&minilm(), &nodes, &PlanOptions::default()).unwrap();
        let on = |n: &str| p.placements.iter().filter(|pl| pl.node == n).count();
        // The embeddings shard outweighs all six layers: n1 takes it, n3 the rest.
        assert_eq!((on("n1"), on("n2"), on("n3")), (1, 0, 7));
        assert_eq!(p.placements[0].node, "n1");
        // Equal shards on equal nodes split evenly.
        let shards = make_shards(&minilm()[7..87], &PlanOptions::default());
        let p = place(&shards, &nodes, &PlanOptions::default(), &BTreeMap::new()).unwrap();
        let on = |n: &str| p.iter().filter(|pl| pl.node == n).count();
        assert_eq!((on("n1"), on("n2"), on("n3")), (3, 0, 2));
    }

    #[test]
    fn memory_is_respected() {
        let shards = make_shards(&minilm(), &PlanOptions::default());
        let emb = shards[0].memory_bytes;
        let nodes = [
            node("big", 1, emb, None, false),
            node("small", 64, emb - 1, None, false),
        ];
        let p = place(&shards, &nodes, &PlanOptions::default(), &BTreeMap::new()).unwrap();
        assert_eq!(p[0].node, "big");
        assert!(p[1..].iter().any(|pl| pl.node == "small"));
    }

    #[test]
    fn error_text() {
        let nodes = [
            node("d", 4, GIB, Some("a"), true),
            node("x", 4, GIB, Some("a"), false),
            node("y", 4, GIB, None, false),
        ];
        let err = plan(&minilm(), &nodes, &opts(1, Some("b"))).unwrap_err();
        let ScheduleError::NoEligibleNode { shard, why, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(
            (shard.as_str(), why.as_str()),
            ("embeddings", "3 nodes: 1 draining, 2 lack site=b")
        );

        let tiny = [node("t", 1, 10, None, false)];
        let err = plan(&[t("pooler.w", 100)], &tiny, &PlanOptions::default()).unwrap_err();
        let want = "no eligible node for shard pooler (needs 1600 bytes of memory): \
             1 node: 1 have too little memory (largest 10 bytes)";
        assert_eq!(err.to_string(), want);
        let err = plan(&[t("x", 1)], &[], &PlanOptions::default()).unwrap_err();
        assert!(err.to_string().ends_with("no nodes registered"), "{err}");
        assert_eq!(
            plan(&[], &tiny, &PlanOptions::default()),
            Err(ScheduleError::NoTensors)
        );
    }

    #[test]
    fn reassign_excludes_and_prefers_idle() {
        let shard = &make_shards(&minilm(), &PlanOptions::default())[1];
        let nodes = ["c", "b", "a"].map(|n| node(n, 4, GIB, None, false));
        let load = BTreeMap::from([("b".to_string(), 5.0), ("c".to_string(), 1.0)]);
        let o = PlanOptions::default();
        assert_eq!(reassign(shard, &nodes, &o, &load, &[]).unwrap(), "a");
        assert_eq!(
            reassign(shard, &nodes, &o, &load, &names("a")).unwrap(),
            "c"
        );
        let err = reassign(shard, &nodes, &o, &load, &names("a b c")).unwrap_err();
        assert!(err.to_string().ends_with("3 nodes: 3 excluded"), "{err}");
    }

    #[test]
    fn a_node_that_failed_a_shard_gets_it_back_only_when_alone() {
        let shard = &make_shards(&minilm(), &PlanOptions::default())[1];
        let o = PlanOptions::default();
        let none = BTreeMap::new();
        let both = ["a", "b"].map(|n| node(n, 4, GIB, None, false));
        // Without the failure, the tie goes to a; after a failed it, b takes it.
        assert_eq!(
            reassign_avoiding(shard, &both, &o, &none, &[]).unwrap(),
            "a"
        );
        assert_eq!(
            reassign_avoiding(shard, &both, &o, &none, &names("a")).unwrap(),
            "b"
        );
        // Even when a is idle and b loaded.
        let busy = BTreeMap::from([("b".to_string(), 1e9)]);
        assert_eq!(
            reassign_avoiding(shard, &both, &o, &busy, &names("a")).unwrap(),
            "b"
        );
        // Only a can take it: a again, rather than a stalled job.
        let alone = [
            node("a", 4, GIB, None, false),
            node("b", 4, GIB, None, true),
        ];
        assert_eq!(
            reassign_avoiding(shard, &alone, &o, &none, &names("a")).unwrap(),
            "a"
        );
        // Both failed it: the least loaded of them.
        assert_eq!(
            reassign_avoiding(shard, &both, &o, &busy, &names("a b")).unwrap(),
            "a"
        );
    }

    #[test]
    fn layer_order_gives_each_rank_consecutive_layers() {
        let mut tensors: Vec<TensorCost> = (0..12)
            .map(|l| t(&format!("model.layers.{l}.mlp.weight"), 1000))
            .collect();
        tensors.push(t("model.embed_tokens.weight", 3000));
        tensors.push(t("model.norm.weight", 10));
        let units = make_shards(&tensors, &opts(1, None));
        // Name order puts layer 10 before layer 2.
        assert_eq!(units[3].label, "layer.10", "{units:?}");
        let ordered = in_layer_order(&units);
        let firsts: Vec<Option<u32>> = ordered.iter().map(|u| u.layers.map(|l| l.0)).collect();
        // `model.*` outside the layers (embeddings and final norm) first.
        assert_eq!(firsts[0], None);
        assert_eq!(firsts[1..], (0..12).map(Some).collect::<Vec<_>>()[..]);
        let ranks = rank_shards(&ordered, 3);
        let mut next = 0;
        for r in &ranks {
            if let Some((a, b)) = r.layers {
                assert_eq!(a, next, "{ranks:?}");
                next = b + 1;
            }
        }
        assert_eq!(next, 12);
    }

    #[test]
    fn rank_shards_balance_cost_in_unit_order() {
        let layers: Vec<TensorCost> = (0..12).map(|l| t(&format!("h.{l}.w"), 1000)).collect();
        let units = make_shards(&layers, &opts(1, None));
        let ranks = rank_shards(&units, 3);
        assert_eq!(ranks.len(), 3);
        for r in &ranks {
            assert_eq!(r.tensors.len(), 4, "{r:?}");
        }
        // Contiguous runs of units, in unit order.
        let flat: Vec<&String> = ranks.iter().flat_map(|r| &r.tensors).collect();
        let want: Vec<&String> = units.iter().flat_map(|u| &u.tensors).collect();
        assert_eq!(flat, want);
        // One expensive unit takes a rank of its own.
        let units = make_shards(&minilm(), &opts(1, None));
        let ranks = rank_shards(&units, 2);
        assert_eq!(ranks[0].label, "embeddings", "{ranks:?}");
        // More ranks than units: one unit a rank.
        assert_eq!(rank_shards(&units, 100).len(), units.len());
        assert!(rank_shards(&[], 3).is_empty());
    }

    #[test]
    fn group_members_are_the_able_nodes_by_name() {
        let nodes = vec![
            node("c", 2, 8 * GIB, Some("a"), false),
            node("a", 2, 8 * GIB, Some("a"), false),
            node("b", 2, 8 * GIB, Some("a"), true),
            node("d", 2, GIB, Some("a"), false),
            node("e", 2, 8 * GIB, Some("b"), false),
        ];
        let got = group_members(&nodes, &opts(1, Some("a")), 2 * GIB, 8).unwrap();
        assert_eq!(got, names("a c"));
        let got = group_members(&nodes, &opts(1, None), 2 * GIB, 2).unwrap();
        assert_eq!(got, names("a c"));
        let e = group_members(&nodes, &opts(1, Some("z")), 2 * GIB, 8).unwrap_err();
        assert!(e.to_string().contains("lack site=z"), "{e}");
    }

    #[test]
    fn a_federated_group_takes_every_site_with_its_ranks_side_by_side() {
        let nodes = vec![
            node("a1", 2, 8 * GIB, Some("b"), false),
            node("b1", 2, 8 * GIB, Some("a"), false),
            node("b2", 2, 8 * GIB, Some("a"), false),
            node("c1", 2, 8 * GIB, Some("c"), false),
            node("b3", 2, GIB, Some("a"), false),
            node("a2", 2, 8 * GIB, Some("b"), true),
        ];
        let mut o = opts(1, None);
        o.sites = vec!["a".into(), "b".into()];
        // Site a's nodes first, then b's; c's node is not in the job.
        let got = group_members(&nodes, &o, 2 * GIB, 8).unwrap();
        assert_eq!(got, names("b1 b2 a1"));
        // Fewer places than able nodes: by turns, every site keeps one.
        assert_eq!(
            group_members(&nodes, &o, 2 * GIB, 2).unwrap(),
            names("b1 a1")
        );
        assert_eq!(
            group_members(&nodes, &o, 2 * GIB, 1).unwrap(),
            names("b1 a1")
        );
        // A site without an able node: no group, and the reason names it.
        o.sites.push("d".into());
        let e = group_members(&nodes, &o, 2 * GIB, 8).unwrap_err();
        assert!(e.to_string().contains("site=d"), "{e}");
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        let ts = [
            tc("", u64::MAX, u64::MAX, f64::INFINITY),
            tc(".", 0, 0, f64::NAN),
            tc("layers.4294967295", 1, 1, -1.0),
            tc("layers.0", 1, 1, f64::MAX),
        ];
        let nodes = [node("z", 0, u64::MAX, None, false)];
        let load = BTreeMap::from([("z".to_string(), f64::NAN)]);
        let shards = make_shards(&ts, &opts(0, None));
        assert!(shards.iter().all(|s| s.cost.is_finite() && s.cost >= 0.0));
        assert_eq!(shards[0].label, "(unnamed)");
        assert_eq!(
            place(&shards, &nodes, &opts(0, None), &load).unwrap().len(),
            3
        );
        assert!(plan(&ts, &nodes, &opts(u32::MAX, None)).is_ok());
    }

    // ---- properties ----

    /// Name prefixes: layer keys, non-layer groups, and near misses (`h.x`, `layers.`, empty).
    const PREFIXES: &str = "encoder.layer|model.layers|transformer.h|blocks|layer|embeddings|\
        pooler|lm_head|model.norm|h.x|layers.|";

    fn arb_tensors(max: usize) -> impl Strategy<Value = Vec<TensorCost>> {
        let prefix = prop::sample::select(PREFIXES.split('|').collect::<Vec<_>>());
        let suffix = prop::sample::select(vec!["weight", "bias", "attn.q.weight"]);
        let cpv = prop_oneof![Just(0.0), Just(1.0), Just(f64::NAN), 0.0f64..4.0];
        let sizes = (0u64..1_000_000, 1u64..5, cpv);
        let one = (prefix, prop::option::of(0u32..8), suffix, sizes).prop_map(|(p, l, s, z)| {
            let name = l.map_or(format!("{p}.{s}"), |l| format!("{p}.{l}.{s}"));
            tc(&name, z.0, z.0 * z.1, z.2)
        });
        prop::collection::vec(one, 0..max)
    }

    fn arb_site() -> impl Strategy<Value = Option<&'static str>> {
        prop::option::of(prop_oneof![Just("a"), Just("b")])
    }

    fn arb_nodes() -> impl Strategy<Value = Vec<NodeCapacity>> {
        let one = (
            0u32..8,
            0u64..200_000_000,
            arb_site(),
            prop::bool::weighted(0.2),
        );
        prop::collection::vec(one, 0..6).prop_map(|v| {
            let named = v.into_iter().enumerate();
            named
                .map(|(i, (c, mem, at, dr))| node(&format!("n{i}"), c, mem, at, dr))
                .collect()
        })
    }

    fn arb_opts() -> impl Strategy<Value = PlanOptions> {
        (0u32..4, arb_site()).prop_map(|(lps, at)| opts(lps, at))
    }

    /// Independent restatement of eligibility, to check the scheduler against.
    fn eligible(n: &NodeCapacity, s: &Shard, o: &PlanOptions) -> bool {
        let labels = o
            .require_labels
            .iter()
            .all(|(k, v)| n.labels.get(k) == Some(v));
        !n.draining && labels && n.memory_bytes >= s.memory_bytes
    }

    proptest! {
        #[test]
        fn every_tensor_in_exactly_one_shard(ts in arb_tensors(60), o in arb_opts()) {
            let shards = make_shards(&ts, &o);
            let mut got: Vec<&String> = shards.iter().flat_map(|s| &s.tensors).collect();
            let mut want: Vec<&String> = ts.iter().map(|t| &t.name).collect();
            got.sort_unstable();
            want.sort_unstable();
            prop_assert_eq!(got, want);
            for (i, s) in shards.iter().enumerate() {
                prop_assert_eq!(s.id as usize, i);
                prop_assert!(s.tensors.is_sorted() && !s.tensors.is_empty());
            }
        }

        #[test]
        fn rank_shards_cover_every_tensor_once(ts in arb_tensors(60), o in arb_opts(), n in 0usize..8) {
            let units = make_shards(&ts, &o);
            let ranks = rank_shards(&units, n);
            prop_assert_eq!(ranks.len(), n.clamp(1, units.len().max(1)).min(units.len()));
            let mut got: Vec<&String> = ranks.iter().flat_map(|s| &s.tensors).collect();
            let mut want: Vec<&String> = ts.iter().map(|t| &t.name).collect();
            got.sort_unstable();
            want.sort_unstable();
            prop_assert_eq!(got, want);
            for (i, s) in ranks.iter().enumerate() {
                prop_assert_eq!(s.id as usize, i);
                prop_assert!(!s.tensors.is_empty() && s.tensors.is_sorted());
            }
        }

        #[test]
        fn layer_ranges_contiguous(ts in arb_tensors(60), o in arb_opts()) {
            let lps = o.layers_per_shard.max(1);
            for s in make_shards(&ts, &o) {
                let idx: BTreeSet<Option<u32>> = s.tensors.iter().map(|n| layer_index(n)).collect();
                match s.layers {
                    Some((a, b)) => {
                        prop_assert!(a <= b && b - a < lps, "{:?}", s);
                        prop_assert_eq!(idx, (a..=b).map(Some).collect::<BTreeSet<_>>());
                    }
                    None => prop_assert!(idx.iter().all(Option::is_none)),
                }
            }
        }

        #[test]
        fn placements_are_eligible(ts in arb_tensors(40), nodes in arb_nodes(), o in arb_opts()) {
            let shards = make_shards(&ts, &o);
            let hopeless: Vec<&Shard> =
                shards.iter().filter(|s| !nodes.iter().any(|n| eligible(n, s, &o))).collect();
            match plan(&ts, &nodes, &o) {
                Ok(p) => {
                    prop_assert!(hopeless.is_empty());
                    prop_assert_eq!(&p.shards, &shards);
                    prop_assert_eq!(p.placements.len(), shards.len());
                    for (i, pl) in p.placements.iter().enumerate() {
                        prop_assert_eq!(pl.shard as usize, i);
                        let n = nodes.iter().find(|n| n.name == pl.node).unwrap();
                        prop_assert!(eligible(n, &shards[i], &o), "{:?} on {:?}", shards[i], n);
                    }
                }
                Err(ScheduleError::NoTensors) => prop_assert!(ts.is_empty()),
                Err(ScheduleError::NoEligibleNode { shard, need_bytes, .. }) => {
                    let named = |s: &&Shard| s.label == shard && s.memory_bytes == need_bytes;
                    prop_assert!(hopeless.iter().any(named));
                }
            }
        }

        #[test]
        fn plan_is_permutation_invariant(
            (ts, nodes, ts2, nodes2) in (arb_tensors(40), arb_nodes()).prop_flat_map(|(t, n)| {
                (Just(t.clone()), Just(n.clone()), Just(t).prop_shuffle(), Just(n).prop_shuffle())
            }),
            o in arb_opts(),
        ) {
            prop_assert_eq!(plan(&ts, &nodes, &o), plan(&ts2, &nodes2, &o));
        }

        #[test]
        fn reassign_never_picks_excluded_or_ineligible(
            ts in arb_tensors(30).prop_filter("need a shard", |v| !v.is_empty()),
            nodes in arb_nodes(),
            o in arb_opts(),
            pick in any::<prop::sample::Index>(),
            mask in prop::collection::vec(any::<bool>(), 6),
            loads in prop::collection::vec(prop_oneof![Just(f64::NAN), 0.0f64..1e9], 6),
        ) {
            let shards = make_shards(&ts, &o);
            let shard = &shards[pick.index(shards.len())];
            let exclude: Vec<String> =
                nodes.iter().zip(&mask).filter(|p| *p.1).map(|p| p.0.name.clone()).collect();
            let load: BTreeMap<String, f64> =
                nodes.iter().zip(&loads).map(|(n, l)| (n.name.clone(), *l)).collect();
            let ok: Vec<&NodeCapacity> = nodes
                .iter()
                .filter(|n| !exclude.contains(&n.name) && eligible(n, shard, &o))
                .collect();
            match reassign(shard, &nodes, &o, &load, &exclude) {
                Ok(name) => prop_assert!(ok.iter().any(|n| n.name == name)),
                Err(e) => prop_assert!(ok.is_empty(), "{}", e),
            }
        }

        #[test]
        fn reassign_avoids_failed_nodes_while_another_is_able(
            ts in arb_tensors(30).prop_filter("need a shard", |v| !v.is_empty()),
            nodes in arb_nodes(),
            o in arb_opts(),
            pick in any::<prop::sample::Index>(),
            mask in prop::collection::vec(any::<bool>(), 6),
            loads in prop::collection::vec(prop_oneof![Just(f64::NAN), 0.0f64..1e9], 6),
        ) {
            let shards = make_shards(&ts, &o);
            let shard = &shards[pick.index(shards.len())];
            let failed: Vec<String> =
                nodes.iter().zip(&mask).filter(|p| *p.1).map(|p| p.0.name.clone()).collect();
            let load: BTreeMap<String, f64> =
                nodes.iter().zip(&loads).map(|(n, l)| (n.name.clone(), *l)).collect();
            let able: Vec<&NodeCapacity> =
                nodes.iter().filter(|n| eligible(n, shard, &o)).collect();
            let fresh: Vec<&&NodeCapacity> =
                able.iter().filter(|n| !failed.contains(&n.name)).collect();
            match reassign_avoiding(shard, &nodes, &o, &load, &failed) {
                Ok(name) if fresh.is_empty() => prop_assert!(able.iter().any(|n| n.name == name)),
                Ok(name) => prop_assert!(fresh.iter().any(|n| n.name == name), "{} failed it", name),
                Err(e) => prop_assert!(able.is_empty(), "{}", e),
            }
            // Shuffling the failed list changes nothing.
            let mut rev = failed.clone();
            rev.reverse();
            prop_assert_eq!(
                reassign_avoiding(shard, &nodes, &o, &load, &failed),
                reassign_avoiding(shard, &nodes, &o, &load, &rev)
            );
        }
    }
}
