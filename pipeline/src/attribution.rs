//! The attribution report: which stage saved which bytes and lost which
//! quality, per stage and per layer.
//!
//! Bytes: the whole-model ratio source/artifact is split across stages by
//! log-ratio. Starting from the source's bytes on disk, each stage kind (in
//! chain order: transforms, decompositions, quantizers, entropy coders)
//! removes what it saved over every tensor it ran on; a final `container`
//! row takes the remaining step to the artifact's bytes on disk (the
//! safetensors headers and the manifest, less the source's headers). The
//! rows' log-ratios add up to ln(source/artifact) exactly.
//!
//! Quality: each stage's share of the total squared error, and the SQNR
//! that stage's error alone gives over the tensors it ran on.

use std::collections::BTreeMap;

use hcx_protocol::{Manifest, StageCategory, StageSpec, TensorEntry};
use serde::{Deserialize, Serialize};

use crate::layer_of;

/// One stage kind's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRow {
    /// Stage name (`container` for file overhead).
    pub stage: String,
    /// Tensors it ran on.
    pub tensors: usize,
    /// Model bytes before it.
    pub bytes_in: u64,
    /// Model bytes after it.
    pub bytes_out: u64,
    /// ln(bytes_in / bytes_out).
    pub log_ratio: f64,
    /// Share of the total log-ratio.
    pub share: f64,
    /// Share of the total squared error.
    pub error_share: f64,
    /// SQNR this stage's error alone gives over its tensors, dB.
    pub sqnr_db: Option<f64>,
    /// Wall time summed over tensors, seconds.
    pub seconds: f64,
}

/// One layer's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRow {
    /// `layer.N` or the first name component.
    pub layer: String,
    /// Tensors in it.
    pub tensors: usize,
    /// Parameters.
    pub params: u64,
    /// Source bytes of its tensors.
    pub source_bytes: u64,
    /// Artifact bytes of its tensors (parts and their header entries).
    pub artifact_bytes: u64,
    /// source / artifact.
    pub ratio: f64,
    /// Parameter-weighted mean SQNR of its lossy tensors, dB.
    pub sqnr_db: Option<f64>,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Totals over a set of tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subset {
    /// Tensors.
    pub tensors: usize,
    /// Parameters.
    pub params: u64,
    /// Stored bytes: parts, safetensors header entries and manifest entries.
    pub bytes: u64,
    /// 8 × bytes / params.
    pub bits_per_weight: f64,
    /// Parameter-weighted mean of the lossy tensors' own SQNR figures, dB:
    /// Σ pᵢ·SQNRᵢ / Σ pᵢ. Each tensor counts by its size whatever its scale.
    pub mean_sqnr_db: Option<f64>,
    /// Pooled SQNR of the lossy tensors, dB: 10·log10(Σ signal / Σ noise).
    /// Large-norm tensors dominate it; it is the figure the per-stage
    /// "SQNR alone" column uses.
    pub pooled_sqnr_db: Option<f64>,
}

/// The report written as `attribution.json` (and rendered as Markdown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attribution {
    /// Job name.
    pub job: String,
    /// Source safetensors bytes on disk.
    pub source_bytes: u64,
    /// Artifact bytes on disk (tensor files and manifest).
    pub artifact_bytes: u64,
    /// source_bytes / artifact_bytes.
    pub ratio: f64,
    /// The compressed tensors: those whose quantizer is not a cast.
    pub compressed: Subset,
    /// Per stage kind.
    pub stages: Vec<StageRow>,
    /// Per layer.
    pub layers: Vec<LayerRow>,
    /// Wall time of the whole run, seconds.
    pub seconds: f64,
    /// Sections the caller adds before the artifact is published (the
    /// cluster's per-node table under `nodes`), by key.
    #[serde(flatten, default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A section added to the report by whoever runs the job: a JSON value
/// stored under `key` in `attribution.json` and a Markdown section appended
/// to `attribution.md`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReportSection {
    /// Key of the JSON value.
    pub key: String,
    /// The value.
    pub json: serde_json::Value,
    /// Markdown, starting with its own `## ` heading.
    pub markdown: String,
}

/// Stored bytes of a tensor: its parts, their entries in the safetensors
/// header, and its entry in `hcx-manifest.json` (steps, parameters, part
/// table), so that a tensor's bits per weight count every byte it costs.
pub fn tensor_bytes(t: &TensorEntry) -> u64 {
    t.parts
        .iter()
        .map(|p| p.bytes + p.header_bytes)
        .sum::<u64>()
        + manifest_entry_bytes(t)
}

/// Bytes of a tensor's entry in the compact manifest: its JSON plus the
/// comma that separates it from the next entry.
pub fn manifest_entry_bytes(t: &TensorEntry) -> u64 {
    // Serialising a manifest entry cannot fail: plain data, string keys.
    serde_json::to_vec(t).map_or(0, |v| v.len() as u64 + 1)
}

/// True when the tensor's chain has a quantizer other than a cast.
pub fn is_compressed(t: &TensorEntry) -> bool {
    t.steps.iter().any(|s| {
        s.spec.category() == StageCategory::Quantizer && !matches!(s.spec, StageSpec::Cast(_))
    }) || t
        .steps
        .iter()
        .any(|s| matches!(&s.spec, StageSpec::Lowrank(l) if !l.keep_residual))
}

/// Totals over the tensors `pick` selects.
pub fn subset<'a>(tensors: impl Iterator<Item = &'a TensorEntry>) -> Subset {
    let (mut n, mut params, mut bytes, mut wsum, mut wparams) = (0usize, 0u64, 0u64, 0.0f64, 0u64);
    let (mut signal, mut noise) = (0.0f64, 0.0f64);
    for t in tensors {
        let p: u64 = t.shape.iter().product::<usize>() as u64;
        n += 1;
        params += p;
        bytes += tensor_bytes(t);
        if let Some(s) = t.sqnr_db {
            wsum += s * p as f64;
            wparams += p;
            signal += t.energy;
            noise += t.energy * 10f64.powf(-s / 10.0);
        }
    }
    Subset {
        tensors: n,
        params,
        bytes,
        bits_per_weight: if params > 0 {
            8.0 * bytes as f64 / params as f64
        } else {
            0.0
        },
        mean_sqnr_db: if wparams > 0 {
            Some(wsum / wparams as f64)
        } else {
            None
        },
        pooled_sqnr_db: if wparams > 0 {
            hcx_kernels::stats::sqnr_from(signal, noise)
        } else {
            None
        },
    }
}

/// Builds the report. `seconds[i]` are the per-stage times of tensor `i`.
pub fn build(
    manifest: &Manifest,
    artifact_bytes: u64,
    seconds: &[Vec<f64>],
    run_seconds: f64,
) -> Attribution {
    let source_bytes = manifest.source.bytes;
    // Stage kinds in chain order.
    let mut kinds: Vec<(StageCategory, usize, &'static str)> = Vec::new();
    for t in &manifest.tensors {
        for s in &t.steps {
            let k = s.spec.kind();
            if !kinds.iter().any(|x| x.2 == k) {
                kinds.push((s.spec.category(), kinds.len(), k));
            }
        }
    }
    kinds.sort();
    let total_err: f64 = manifest
        .tensors
        .iter()
        .map(|t| t.steps.iter().map(|s| s.error_added).sum::<f64>() * t.energy)
        .sum();
    let mut rows = Vec::new();
    let mut level = source_bytes;
    // A source that stores its tensors quantized (GGUF) is expanded to f32
    // before the stages see it: a stage of its own, growing the bytes, with
    // no error (the expansion is the reference).
    let expansion: i64 = manifest
        .tensors
        .iter()
        .map(|t| t.source_bytes as i64 - t.stored() as i64)
        .sum();
    if expansion != 0 {
        let next = (level as i64 + expansion).max(1) as u64;
        rows.push(StageRow {
            stage: "dequantize".into(),
            tensors: manifest
                .tensors
                .iter()
                .filter(|t| t.stored_bytes.is_some())
                .count(),
            bytes_in: level,
            bytes_out: next,
            log_ratio: (level as f64 / next as f64).ln(),
            share: 0.0,
            error_share: 0.0,
            sqnr_db: None,
            seconds: 0.0,
        });
        level = next;
    }
    for (_, _, kind) in &kinds {
        let (mut n, mut saved, mut err, mut energy, mut secs) =
            (0usize, 0i64, 0.0f64, 0.0f64, 0.0f64);
        for (ti, t) in manifest.tensors.iter().enumerate() {
            for (si, s) in t.steps.iter().enumerate() {
                if s.spec.kind() == *kind {
                    n += 1;
                    saved += s.bytes_in as i64 - s.bytes_out as i64;
                    err += s.error_added * t.energy;
                    energy += t.energy;
                    secs += seconds
                        .get(ti)
                        .and_then(|v| v.get(si))
                        .copied()
                        .unwrap_or(0.0);
                }
            }
        }
        let next = (level as i64 - saved).max(1) as u64;
        rows.push(StageRow {
            stage: kind.to_string(),
            tensors: n,
            bytes_in: level,
            bytes_out: next,
            log_ratio: (level as f64 / next as f64).ln(),
            share: 0.0,
            error_share: if total_err > 0.0 {
                err / total_err
            } else {
                0.0
            },
            sqnr_db: hcx_kernels::stats::sqnr_from(energy, err),
            seconds: secs,
        });
        level = next;
    }
    rows.push(StageRow {
        stage: "container".into(),
        tensors: manifest.tensors.len(),
        bytes_in: level,
        bytes_out: artifact_bytes,
        log_ratio: (level as f64 / artifact_bytes.max(1) as f64).ln(),
        share: 0.0,
        error_share: 0.0,
        sqnr_db: None,
        seconds: 0.0,
    });
    let total_log: f64 = rows.iter().map(|r| r.log_ratio).sum();
    for r in &mut rows {
        r.share = if total_log != 0.0 {
            r.log_ratio / total_log
        } else {
            0.0
        };
    }
    let mut layers: BTreeMap<(u8, u64, String), LayerRow> = BTreeMap::new();
    let mut layer_w: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    for (ti, t) in manifest.tensors.iter().enumerate() {
        let l = layer_of(&t.name);
        let key = match l.strip_prefix("layer.").and_then(|n| n.parse::<u64>().ok()) {
            Some(n) => (1, n, l.clone()),
            None => (0, 0, l.clone()),
        };
        let p = t.shape.iter().product::<usize>() as u64;
        let row = layers.entry(key).or_insert_with(|| LayerRow {
            layer: l.clone(),
            tensors: 0,
            params: 0,
            source_bytes: 0,
            artifact_bytes: 0,
            ratio: 0.0,
            sqnr_db: None,
            seconds: 0.0,
        });
        row.tensors += 1;
        row.params += p;
        row.source_bytes += t.stored();
        row.artifact_bytes += tensor_bytes(t);
        row.seconds += seconds
            .get(ti)
            .map(|v| v.iter().sum::<f64>())
            .unwrap_or(0.0);
        if let Some(s) = t.sqnr_db {
            let w = layer_w.entry(l).or_default();
            w.0 += s * p as f64;
            w.1 += p;
        }
    }
    let layers: Vec<LayerRow> = layers
        .into_values()
        .map(|mut r| {
            r.ratio = r.source_bytes as f64 / r.artifact_bytes.max(1) as f64;
            r.sqnr_db = layer_w
                .get(&r.layer)
                .filter(|w| w.1 > 0)
                .map(|w| w.0 / w.1 as f64);
            r
        })
        .collect();
    Attribution {
        job: manifest.job.name.clone(),
        source_bytes,
        artifact_bytes,
        ratio: source_bytes as f64 / artifact_bytes.max(1) as f64,
        compressed: subset(manifest.tensors.iter().filter(|t| is_compressed(t))),
        stages: rows,
        layers,
        seconds: run_seconds,
        extra: BTreeMap::new(),
    }
}

fn db(v: Option<f64>) -> String {
    v.map(|d| format!("{d:.2}"))
        .unwrap_or_else(|| "exact".into())
}

/// The stage table as Markdown (also printed by `hcx-cluster run`).
pub fn stage_table(a: &Attribution) -> String {
    let mut s = String::from(
        "| stage | tensors | bytes in | bytes out | ratio | share of log-ratio | share of error | SQNR alone, pooled (dB) | time (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &a.stages {
        // A stage that lowered the error (a distilled correction) has no
        // SQNR of its own.
        let alone = if r.sqnr_db.is_none() && r.error_share < 0.0 {
            "lowers the error".to_string()
        } else {
            db(r.sqnr_db)
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.3}× | {:.1}% | {:.1}% | {} | {:.2} |\n",
            r.stage,
            r.tensors,
            r.bytes_in,
            r.bytes_out,
            (r.log_ratio).exp(),
            100.0 * r.share,
            100.0 * r.error_share,
            alone,
            r.seconds
        ));
    }
    s
}

/// The whole report as Markdown.
pub fn markdown(a: &Attribution) -> String {
    let mut s = format!(
        "# Attribution: {}\n\nSource {} bytes → artifact {} bytes on disk: **{:.3}×**.\n\nCompressed tensors: {} ({} parameters) at **{:.3} bits per weight** (every part, safetensors header entry and manifest entry counted). SQNR: parameter-weighted mean of per-tensor dB **{}** dB; pooled, 10·log10(Σ signal / Σ noise), **{}** dB.\n\n## Per stage\n\nRatios multiply down the table; the log-ratio shares add up to 100%. \"SQNR alone\" is pooled over the tensors the stage ran on. The container row holds the bytes no stage records: the safetensors header and the manifest. A `correction` row is distillation's: the gains and low-rank terms it stores beside the codes (bytes added, a ratio below 1) and the change they made to the weight error (negative when they lowered it; distillation aims at the block's outputs, not its weights).\n\n",
        a.job,
        a.source_bytes,
        a.artifact_bytes,
        a.ratio,
        a.compressed.tensors,
        a.compressed.params,
        a.compressed.bits_per_weight,
        db(a.compressed.mean_sqnr_db),
        db(a.compressed.pooled_sqnr_db)
    );
    s.push_str(&stage_table(a));
    s.push_str("\n## Per layer\n\n| layer | tensors | parameters | source bytes | artifact bytes | ratio | mean SQNR (dB) | time (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &a.layers {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.3}× | {} | {:.2} |\n",
            r.layer,
            r.tensors,
            r.params,
            r.source_bytes,
            r.artifact_bytes,
            r.ratio,
            db(r.sqnr_db),
            r.seconds
        ));
    }
    s
}
