//! What a job will cost before it runs: each tensor's encode time and
//! artifact bytes, from a cost model measured on this machine.
//!
//! The model is measured, not assumed: every tensor's own stage chain runs
//! on a sample of its rows (evenly spread, about [`SAMPLE_VALUES`] values;
//! the whole tensor when it is smaller), timed by the process's CPU time
//! (user and system, every thread), and the sample's CPU seconds and bytes
//! are scaled by the tensor's size, except the share of `uniform`, whose
//! step search stops growing at its own sample of 2^18 values
//! ([`hcx_kernels::uniform::relative_work`]). Tensors copied as they are cost their
//! bytes and no time. The manifest is sized from the samples' entries. A
//! chain whose cost is not proportional to the size (an SVD, k-means on a
//! whole tensor) is estimated less well than the quantizers and coders.
//!
//! A calibrated job adds its walk through the model (forward passes over
//! the calibration data, statistics, GPTQ, distillation), measured on the
//! model's first block and scaled ([`crate::walk_cost`]).

use std::time::Instant;

use hcx_protocol::manifest::TensorEntry;
use hcx_protocol::stage::StageCategory;
use hcx_protocol::{JobSpec, StageSpec};
use serde::Serialize;

use crate::PipelineError;
use crate::model::{Model, TensorInfo, is_integer_dtype};
use crate::run::encode_raw;
use crate::walk_cost::WalkCost;

/// Values of a tensor the estimate encodes (at least one row).
pub const SAMPLE_VALUES: usize = 1 << 16;

/// One tensor's estimate.
#[derive(Debug, Clone, Serialize)]
pub struct TensorEstimate {
    /// Its name.
    pub name: String,
    /// Values.
    pub numel: u64,
    /// Bytes in the source, as stored.
    pub source_bytes: u64,
    /// Its chain, `hadamard→uniform→zstd` (`keep` when copied).
    pub chain: String,
    /// Values of the sample that was encoded (0 when copied).
    pub sampled: u64,
    /// Estimated CPU seconds of its encoding (every thread's).
    pub cpu_seconds: f64,
    /// Estimated bytes of its parts in the tensor file.
    pub bytes: u64,
    /// Estimated bytes of its entry in the manifest and the tensor file's
    /// header.
    pub overhead_bytes: u64,
}

/// A job's estimate.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    /// Every tensor, in model order.
    pub tensors: Vec<TensorEstimate>,
    /// Source bytes on disk.
    pub source_bytes: u64,
    /// Estimated artifact bytes (tensor file and manifest), as `inspect`
    /// counts them.
    pub artifact_bytes: u64,
    /// Estimated CPU seconds of the run: every tensor's encoding, and
    /// hashing the source and the artifact.
    pub cpu_seconds: f64,
    /// Parameters of the tensors a quantizer compresses.
    pub compressed_params: u64,
    /// Estimated bits per weight over those tensors (their parts and
    /// overhead).
    pub bits_per_weight: f64,
    /// A calibrated job's walk through its model, measured on its first
    /// block (its encoding is in the calibrated tensors' seconds, the rest
    /// in `cpu_seconds`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub walk: Option<WalkCost>,
    /// Wall seconds the estimate itself took.
    pub measured_in_seconds: f64,
}

/// CPU seconds (user and system, every thread) this process has used.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The rows of a `rows × cols` tensor a sample of about `target` values
/// takes, evenly spread (all of them when the tensor is small enough).
pub fn sample_rows(rows: usize, cols: usize, target: usize) -> Vec<usize> {
    let want = target.div_ceil(cols.max(1)).clamp(1, rows.max(1));
    if want >= rows {
        return (0..rows).collect();
    }
    (0..want).map(|i| i * rows / want).collect()
}

/// A tensor seen as `rows × cols` (a 1-D tensor is one row).
pub(crate) fn rows_and_cols(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (1, *n),
        [r, rest @ ..] => (*r, rest.iter().product()),
    }
}

/// The bytes of rows `taken` of a tensor stored as `raw` with rows of
/// `cols` values, and the shape of that sample.
pub(crate) fn take_rows(raw: &[u8], shape: &[usize], taken: &[usize]) -> (Vec<u8>, Vec<usize>) {
    let numel: usize = shape.iter().product();
    let (_, cols) = rows_and_cols(shape);
    let row = cols * (raw.len() / numel.max(1));
    let mut sample = Vec::with_capacity(taken.len() * row);
    for r in taken {
        sample.extend_from_slice(&raw[r * row..(r + 1) * row]);
    }
    let mut out = shape.to_vec();
    if out.len() >= 2 {
        out[0] = taken.len();
    }
    (sample, out)
}

/// The same job as it is sized: each calibrated stage replaced by its
/// grid's plain quantizer (GPTQ stores codes on the same grid, so its
/// parts take the same room), and no calibration or distillation. Only the
/// bytes of its estimate stand for the real job, not its times.
pub fn sized_without_calibration(spec: &JobSpec) -> JobSpec {
    let plain = |p: &[StageSpec]| -> Vec<StageSpec> {
        p.iter()
            .map(|s| match s {
                StageSpec::Gptq(g) => g.grid.stage(),
                other => other.clone(),
            })
            .collect()
    };
    let mut out = spec.clone();
    out.pipeline = plain(&spec.pipeline);
    for r in &mut out.rules {
        if let Some(p) = &r.pipeline {
            r.pipeline = Some(plain(p));
        }
    }
    out.calibration = None;
    out.distill = None;
    out
}

/// Estimates `spec`'s run on this machine (see the module docs). A
/// calibrated job's walk through its model (forward passes, statistics,
/// GPTQ, distillation) is measured on its first block
/// ([`crate::walk_cost`]); its tensors are sized as
/// [`sized_without_calibration`] sizes them, plus the bytes of the
/// corrections distillation learns.
pub fn estimate(spec: &JobSpec) -> Result<Estimate, PipelineError> {
    let started = Instant::now();
    let model = Model::open(&spec.model.path)?;
    let walk = match spec.calibration {
        Some(_) => Some(crate::walk_cost::measure(spec, &model)?),
        None => None,
    };
    let sized = sized_without_calibration(spec);
    let mut tensors = Vec::with_capacity(model.tensors.len());
    for t in &model.tensors {
        let mut e = estimate_tensor(&sized, &model, t)?;
        if let Some(w) = &walk {
            if let Some(&cpu) = w.tensor_cpu_seconds.get(&t.name) {
                e.cpu_seconds = cpu;
                e.chain = chain_of(&spec.stages_for(&t.name));
            }
            if let Some(&(data, overhead)) = w.tensor_correction_bytes.get(&t.name) {
                e.bytes += data;
                e.overhead_bytes += overhead;
                e.chain.push_str("→correction");
            }
        }
        tensors.push(e);
    }
    // Beside the encoding, a run hashes every source byte and every byte it
    // writes (SHA-256): measured here on a buffer of this machine's memory.
    let hashing = hash_seconds_per_byte();
    let job_json = serde_json::to_string(spec).map(|s| s.len()).unwrap_or(0) as u64;
    // The manifest's job, source files and file entries.
    let fixed = job_json + 512 + 160 * (model.files.len() as u64 + 1);
    let artifact_bytes = fixed
        + tensors
            .iter()
            .map(|t| t.bytes + t.overhead_bytes)
            .sum::<u64>();
    let compressed: Vec<&TensorEstimate> = tensors
        .iter()
        .filter(|t| t.chain != "keep" && t.chain != "cast")
        .collect();
    let compressed_params: u64 = compressed.iter().map(|t| t.numel).sum();
    let compressed_bytes: u64 = compressed.iter().map(|t| t.bytes + t.overhead_bytes).sum();
    let source_bytes: u64 = model.file_sizes().iter().sum();
    let encode: f64 = tensors.iter().map(|t| t.cpu_seconds).sum();
    // The walk's encoding is already in its tensors' seconds.
    let walking = walk
        .as_ref()
        .map_or(0.0, |w| w.cpu_seconds() - w.encode_cpu_seconds);
    Ok(Estimate {
        source_bytes,
        artifact_bytes,
        cpu_seconds: encode + walking + hashing * (source_bytes + artifact_bytes) as f64,
        compressed_params,
        bits_per_weight: if compressed_params > 0 {
            8.0 * compressed_bytes as f64 / compressed_params as f64
        } else {
            0.0
        },
        tensors,
        walk,
        measured_in_seconds: started.elapsed().as_secs_f64(),
    })
}

/// A chain as the estimate names it: `hadamard→gptq→zstd`.
fn chain_of(stages: &[StageSpec]) -> String {
    stages
        .iter()
        .map(|s| s.kind())
        .collect::<Vec<_>>()
        .join("→")
}

/// CPU seconds SHA-256 takes per byte on this machine (measured on 16 MiB).
fn hash_seconds_per_byte() -> f64 {
    use sha2::Digest;
    let buf = vec![0x5au8; 16 << 20];
    let before = process_cpu_seconds();
    let digest = sha2::Sha256::digest(&buf);
    std::hint::black_box(digest);
    (process_cpu_seconds() - before).max(0.0) / buf.len() as f64
}

/// The overhead of an entry: its compact manifest JSON and one safetensors
/// header entry per part.
fn overhead(e: &TensorEntry) -> u64 {
    let manifest = serde_json::to_string(e).map(|s| s.len()).unwrap_or(0);
    let header: usize = e.parts.iter().map(|p| p.name.len() + 64).sum();
    (manifest + header) as u64
}

fn estimate_tensor(
    spec: &JobSpec,
    model: &Model,
    t: &TensorInfo,
) -> Result<TensorEstimate, PipelineError> {
    let stages = spec.stages_for(&t.name);
    let raw = model.raw(t);
    let numel = t.numel() as u64;
    let base = TensorEstimate {
        name: t.name.clone(),
        numel,
        source_bytes: t.stored_bytes,
        chain: "keep".into(),
        sampled: 0,
        cpu_seconds: 0.0,
        bytes: raw.len() as u64,
        overhead_bytes: 0,
    };
    if stages.is_empty() || is_integer_dtype(t.dtype) {
        let copied = encode_raw(&t.name, t.dtype, &t.shape, raw, &[], spec.seed)?;
        return Ok(TensorEstimate {
            overhead_bytes: overhead(&copied.entry),
            ..base
        });
    }
    let chain = chain_of(&stages);
    let (rows, cols) = rows_and_cols(&t.shape);
    let picked = sample_rows(rows, cols, SAMPLE_VALUES);
    let run = |rows_taken: &[usize]| {
        let (sample, shape) = take_rows(raw, &t.shape, rows_taken);
        let before = process_cpu_seconds();
        let started = Instant::now();
        let e = encode_raw(&t.name, t.dtype, &shape, &sample, &stages, spec.seed)?;
        let wall = started.elapsed().as_secs_f64();
        Ok::<_, PipelineError>((e, process_cpu_seconds() - before, wall))
    };
    // A chain that cannot run on fewer rows (a rank above the sample's
    // rows, say) is measured on the whole tensor.
    let (e, cpu, wall, taken) = match run(&picked) {
        Ok((e, cpu, wall)) => (e, cpu, wall, picked.len()),
        Err(_) if picked.len() < rows => {
            let all: Vec<usize> = (0..rows).collect();
            let (e, cpu, wall) = run(&all)?;
            (e, cpu, wall, rows)
        }
        Err(err) => return Err(err),
    };
    let scale = rows as f64 / taken.max(1) as f64;
    // Every stage's time grows with the tensor except `uniform`'s step
    // search, which stops growing at its own sample: its share of the
    // sample's time (by the stage's wall seconds) scales by its work.
    let uniform_share = stages
        .iter()
        .position(|s| matches!(s, StageSpec::Uniform(_)))
        .and_then(|u| e.seconds.get(u))
        .map_or(0.0, |s| if wall > 0.0 { (s / wall).min(1.0) } else { 0.0 });
    let uniform_scale = hcx_kernels::uniform::relative_work(rows * cols)
        / hcx_kernels::uniform::relative_work((taken * cols).max(1));
    let mut cpu_seconds = cpu * ((1.0 - uniform_share) * scale + uniform_share * uniform_scale);
    // A tensor larger than a wave whose quantizer is fitted over its
    // pieces of rows runs the stages before it (Hadamard, sparse) once more for
    // each fitting pass: `uniform` samples and tallies, `ternary` without
    // a group sums magnitudes, then each codes.
    let passes = hcx_kernels::row_pieces::fitting_passes(&stages);
    if passes > 0 && crate::run::working_values(t, &stages, false) < t.numel() {
        let before: f64 = stages
            .iter()
            .zip(&e.seconds)
            .take_while(|(s, _)| s.category() != StageCategory::Quantizer)
            .map(|(_, secs)| secs)
            .sum();
        if wall > 0.0 {
            cpu_seconds += cpu * passes as f64 * (before / wall).min(1.0) * scale;
        }
    }
    let part_bytes: u64 = e.data.iter().map(|d| d.len() as u64).sum();
    Ok(TensorEstimate {
        chain,
        sampled: (taken * cols) as u64,
        cpu_seconds,
        bytes: (part_bytes as f64 * scale).round() as u64,
        overhead_bytes: overhead(&e.entry),
        ..base
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_spread_over_the_rows_and_take_everything_when_small() {
        assert_eq!(sample_rows(4, 10, 1000), vec![0, 1, 2, 3]);
        assert_eq!(sample_rows(100, 10, 40), vec![0, 25, 50, 75]);
        // At least one row, however wide.
        assert_eq!(sample_rows(10, 1 << 20, 16), vec![0]);
        assert_eq!(sample_rows(0, 10, 16), Vec::<usize>::new());
    }

    #[test]
    fn cpu_time_moves_with_work() {
        let before = process_cpu_seconds();
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed().as_millis() < 50 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(process_cpu_seconds() - before > 0.02);
    }
}
