//! Block-wise distillation (the job's `distill:` section).
//!
//! After a block's linear weights are encoded, the block's continuous
//! parameters (norm gains and shifts, linear biases) become trainable
//! variables and are tuned with Adam so that the compressed model's
//! activations after the block match the original model's on the same
//! calibration samples (mean squared error). The original model's
//! activations are carried beside the compressed model's through the walk,
//! so tuning a block also corrects the error the blocks before it left. The
//! gradients of the loss go through candle's autograd.
//!
//! With `scales` or `lowrank_correction`, each linear weight Ŵ of the
//! block also gets a trainable correction, W = diag(r)·Ŵ·diag(c) + A·B
//! (a gain per output row and per input column, a low-rank term), which is
//! stored in f16 beside the weight's codes as a `correction` step after its
//! chain (`hcx_kernels::correction`). Its bytes count in the artifact like
//! any other part; once tuned, the weight as the artifact decodes it
//! replaces the encoded one in the walk.
//!
//! Data-parallel and the same bits on any number of ranks: each step takes
//! a fixed set of micro-batches (a seeded permutation of all of them, cut
//! into runs of `batch` samples), each rank computes the gradient of the
//! micro-batches it holds (in parallel) and adds them into an exact
//! fixed-point sum (i128, 64 fraction bits); the ranks all-reduce those
//! integers, which is exact and so independent of the order. Every rank
//! then applies the same Adam update to the same numbers.

use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use hcx_forward::{LinearCorrection, Tunable};
use hcx_kernels::collective::Collective;
use hcx_kernels::correction::{Correction, LowRank};
use hcx_kernels::rng::{SplitMix64, gaussian_vec, seed_for};
use hcx_protocol::{Distill, DistillParam};
use rayon::prelude::*;

use crate::PipelineError;
use crate::calibrate::{Batch, Net};

/// Fraction bits of the fixed-point gradient sum.
pub(crate) const FRACTION_BITS: i32 = 64;

/// Adam's moment decay rates and denominator guard (Kingma & Ba's defaults).
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPSILON: f64 = 1e-8;

/// A block's output error on the calibration inputs, summed over all ranks.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct OutputError {
    /// Σ (y − t)², compressed model's activation y after the block, the
    /// original model's t.
    pub(crate) squared_error: f64,
    /// Σ t².
    pub(crate) energy: f64,
}

impl OutputError {
    /// 10·log10(Σt² / Σ(y − t)²).
    pub(crate) fn sqnr_db(&self) -> f64 {
        10.0 * (self.energy / self.squared_error.max(f64::MIN_POSITIVE)).log10()
    }
}

/// What distilling one block did.
#[derive(Debug, Clone)]
pub(crate) struct BlockDistillation {
    /// The block.
    pub(crate) layer: usize,
    /// Scalars tuned.
    pub(crate) params: usize,
    /// Output error with the encoded weights, before tuning.
    pub(crate) before: OutputError,
    /// Output error after tuning.
    pub(crate) after: OutputError,
    /// Wall time.
    pub(crate) seconds: f64,
    /// The tuned tensors' final values (as stored), by HF name.
    pub(crate) tuned: Vec<(String, Vec<f32>)>,
    /// The linear weights given a correction, by HF name.
    pub(crate) corrected: Vec<String>,
}

/// Stores a linear weight's learned correction with its encoding (named by
/// its HF name, values as distillation left them) and returns the weight
/// the artifact then decodes to.
pub(crate) type StoreCorrection<'a> =
    dyn FnMut(&str, &Correction) -> Result<Vec<f32>, PipelineError> + 'a;

/// Where a correction's part lives among the trainable variables.
struct CorrectionVars {
    /// The linear weight's HF name.
    weight: String,
    rows: Option<usize>,
    cols: Option<usize>,
    /// A and B, and the rank.
    low_rank: Option<(usize, usize, usize)>,
}

/// The micro-batches of the data-parallel run, as every rank sees them.
pub(crate) struct MicroBatches<'a> {
    /// This rank's micro-batches, ascending by global index.
    pub(crate) local: &'a [Batch],
    /// The global index of each of `local`.
    pub(crate) global: &'a [usize],
    /// The original model's activations after the block, for the samples
    /// of `local`.
    pub(crate) targets: &'a [Tensor],
    /// Samples (windows or sentences) of every micro-batch, by global index.
    pub(crate) samples: &'a [usize],
    /// Output scalars (rows × hidden) of every micro-batch, by global index.
    pub(crate) elements: &'a [usize],
}

fn fail(layer: usize, why: impl std::fmt::Display) -> PipelineError {
    PipelineError::Distill {
        block: layer,
        why: why.to_string(),
    }
}

/// The correction store of a tuning that learns no correction (the
/// weight tunings between a block's encoded sites): any correction it is
/// handed is an error naming the block and the weight.
pub(crate) fn no_correction(
    layer: usize,
) -> impl FnMut(&str, &Correction) -> Result<Vec<f32>, PipelineError> {
    move |name, _| {
        Err(fail(
            layer,
            format!("`{name}`: no correction is tuned with the weights"),
        ))
    }
}

/// Tunes block `layer` of `net` (whose linear weights are already the
/// encoded ones, but for `weights`, which are tuned whole, with
/// `spec.weights_lr`); `round` maps a tuned tensor's values to what the
/// artifact will store (its dtype), and those values are left in `net`.
/// With `scales` or `lowrank_correction`, each linear weight's learned
/// correction goes to `store`, and the weight it returns replaces the
/// weight in `net`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn distill_block(
    net: &mut Net,
    layer: usize,
    spec: &Distill,
    job_seed: u64,
    weights: &[String],
    data: &MicroBatches<'_>,
    round: &dyn Fn(&str, Vec<f32>) -> Vec<f32>,
    store: &mut StoreCorrection<'_>,
    ranks: &mut dyn Collective,
) -> Result<BlockDistillation, PipelineError> {
    let t0 = Instant::now();
    let world = ranks.world();
    let total = data.samples.len();
    // Where each global micro-batch sits among this rank's.
    let local_of: std::collections::HashMap<usize, usize> = data
        .global
        .iter()
        .enumerate()
        .map(|(li, &g)| (g, li))
        .collect();
    if data.local.len() != data.targets.len()
        || data.local.len() != data.global.len()
        || data.elements.len() != total
        || data.global.iter().any(|&g| g >= total)
    {
        return Err(fail(layer, "micro-batch bookkeeping disagrees"));
    }
    let mut names: Vec<String> = Vec::new();
    for p in &spec.params {
        match p {
            DistillParam::Norms => names.extend(net.tunable(layer, Tunable::Norms)),
            DistillParam::Offsets => names.extend(net.tunable(layer, Tunable::Biases)),
            DistillParam::Scales | DistillParam::LowrankCorrection | DistillParam::Weights => {}
        }
    }
    names.extend(weights.iter().cloned());
    let mut vars = Vec::with_capacity(names.len());
    for name in &names {
        let t = net.tensor(name).map_err(|e| fail(layer, e))?;
        let v = Var::from_tensor(&t).map_err(|e| fail(layer, e))?;
        net.set_tensor(name, v.as_tensor().clone())
            .map_err(|e| fail(layer, e))?;
        vars.push(v);
    }
    let weight_vars = names.len() - weights.len()..names.len();
    let corrections = correction_vars(net, layer, spec, job_seed, &mut vars)?;
    let sizes: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
    // Each variable's learning rate: the weights' own, or the gains'.
    let mut lrs: Vec<f64> = Vec::with_capacity(sizes.len());
    for (i, &size) in sizes.iter().enumerate() {
        let lr = if weight_vars.contains(&i) {
            spec.weights_lr
        } else {
            spec.lr
        };
        lrs.extend(std::iter::repeat_n(lr, size));
    }
    let params: usize = sizes.iter().sum();
    let mut values: Vec<f32> = Vec::with_capacity(params);
    for v in &vars {
        values.extend(flat(v.as_tensor()).map_err(|e| fail(layer, e))?);
    }

    let before = output_error(net, layer, data, ranks)?;
    if params > 0 && total > 0 {
        let per_batch = data.samples[0].max(1);
        let k = spec.batch.div_ceil(per_batch).clamp(1, total);
        let mut order: Vec<usize> = (0..total).collect();
        let mut rng = SplitMix64::new(seed_for(job_seed, &format!("block {layer}"), "distill"));
        for i in (1..total).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let scale = 2f64.powi(FRACTION_BITS);
        let limit = 2f64.powi(126 - 64) / total as f64;
        let mut adam = Adam::new(&values);
        for step in 0..spec.steps {
            let set: Vec<usize> = (0..k).map(|j| order[(step * k + j) % total]).collect();
            let n: usize = set.iter().map(|&g| data.elements[g]).sum();
            // Micro-batches in parallel: the fixed-point sum is exact, so
            // the order the partial gradients are added in does not matter.
            let mine: Vec<usize> = set
                .iter()
                .filter_map(|g| local_of.get(g).copied())
                .collect();
            let net_ref: &Net = net;
            let partial: Vec<Result<Vec<i128>, PipelineError>> = mine
                .par_iter()
                .map(|&li| {
                    let y = net_ref
                        .run_for_training(layer, &data.local[li])
                        .map_err(|e| fail(layer, e))?;
                    let loss = (y - &data.targets[li])
                        .and_then(|d| d.sqr())
                        .and_then(|d| d.sum_all())
                        .and_then(|d| d / n.max(1) as f64)
                        .map_err(|e| fail(layer, e))?;
                    let grads = loss.backward().map_err(|e| fail(layer, e))?;
                    let mut fixed = vec![0i128; params];
                    add_fixed(&mut fixed, &vars, &sizes, &grads, scale, limit)
                        .map_err(|e| fail(layer, e))?
                        .map_err(|x| {
                            fail(
                                layer,
                                format!("gradient {x} at step {step} is out of range; lower `distill.lr`"),
                            )
                        })?;
                    Ok(fixed)
                })
                .collect();
            let mut acc = vec![0i128; params];
            for p in partial {
                for (a, x) in acc.iter_mut().zip(p?) {
                    *a += x;
                }
            }
            if world > 1 {
                ranks
                    .all_reduce_i128(&mut acc)
                    .map_err(|source| PipelineError::Collective {
                        during: format!("block {layer}'s distillation gradients, step {step}"),
                        source,
                    })?;
            }
            adam.step(&acc, scale, &lrs);
            adam.write(&vars, &sizes).map_err(|e| fail(layer, e))?;
        }
        values = adam.values();
    }
    // The tuned values as the artifact stores them, back into the model as
    // plain tensors.
    let mut tuned = Vec::with_capacity(names.len());
    let mut offsets = Vec::with_capacity(sizes.len());
    let mut at = 0;
    for &size in &sizes {
        offsets.push(at);
        at += size;
    }
    let value = |i: usize| values[offsets[i]..offsets[i] + sizes[i]].to_vec();
    for (i, (name, var)) in names.iter().zip(&vars).enumerate() {
        let stored = round(name, value(i));
        let t = Tensor::from_vec(stored.clone(), var.shape(), var.device())
            .map_err(|e| fail(layer, e))?;
        net.set_tensor(name, t).map_err(|e| fail(layer, e))?;
        tuned.push((name.clone(), stored));
    }
    // Each correction is stored with its weight's encoding, and the weight
    // the artifact decodes to replaces the encoded one.
    let mut corrected = Vec::with_capacity(corrections.len());
    for c in &corrections {
        let correction = Correction {
            rows: c.rows.map(value),
            cols: c.cols.map(value),
            low_rank: c.low_rank.map(|(a, b, rank)| LowRank {
                rank,
                a: value(a),
                b: value(b),
            }),
        };
        let w = store(&c.weight, &correction)?;
        net.set_correction(&c.weight, None)
            .map_err(|e| fail(layer, e))?;
        net.set_weight(&c.weight, w).map_err(|e| fail(layer, e))?;
        corrected.push(c.weight.clone());
    }
    let after = output_error(net, layer, data, ranks)?;
    Ok(BlockDistillation {
        layer,
        params,
        before,
        after,
        seconds: t0.elapsed().as_secs_f64(),
        tuned,
        corrected,
    })
}

/// Makes the trainable corrections `spec` asks for, one per linear weight
/// of block `layer`, appending their variables to `vars` and installing
/// them in `net`. Gains start at 1; a low-rank term A·B starts at A = 0 and
/// B seeded from the job seed and the weight's name (scaled by 1/√in), so
/// the block starts as encoded.
fn correction_vars(
    net: &mut Net,
    layer: usize,
    spec: &Distill,
    job_seed: u64,
    vars: &mut Vec<Var>,
) -> Result<Vec<CorrectionVars>, PipelineError> {
    let scales = spec.params.contains(&DistillParam::Scales);
    let low_rank = spec.params.contains(&DistillParam::LowrankCorrection);
    if !(scales || low_rank) {
        return Ok(Vec::new());
    }
    let f = |e: candle_core::Error| fail(layer, e);
    let mut out = Vec::new();
    for weight in net.linear_weights(layer) {
        let w = net.tensor(&weight).map_err(|e| fail(layer, e))?;
        let (o, i) = w.dims2().map_err(f)?;
        let dev = w.device().clone();
        let mut add = |t: Tensor| -> Result<(usize, Tensor), PipelineError> {
            let v = Var::from_tensor(&t).map_err(f)?;
            let t = v.as_tensor().clone();
            vars.push(v);
            Ok((vars.len() - 1, t))
        };
        let mut c = LinearCorrection::default();
        let mut slots = CorrectionVars {
            weight: weight.clone(),
            rows: None,
            cols: None,
            low_rank: None,
        };
        if scales {
            let (at, t) = add(Tensor::ones(o, DType::F32, &dev).map_err(f)?)?;
            (slots.rows, c.rows) = (Some(at), Some(t));
            let (at, t) = add(Tensor::ones(i, DType::F32, &dev).map_err(f)?)?;
            (slots.cols, c.cols) = (Some(at), Some(t));
        }
        if low_rank {
            let r = spec.rank;
            let (a, ta) = add(Tensor::zeros((o, r), DType::F32, &dev).map_err(f)?)?;
            let seed = seed_for(job_seed, &weight, "lowrank_correction");
            let scale = 1.0 / (i as f32).sqrt();
            let b: Vec<f32> = gaussian_vec(seed, r * i)
                .iter()
                .map(|v| v * scale)
                .collect();
            let (b, tb) = add(Tensor::from_vec(b, (r, i), &dev).map_err(f)?)?;
            slots.low_rank = Some((a, b, r));
            (c.a, c.b) = (Some(ta), Some(tb));
        }
        net.set_correction(&weight, Some(c))
            .map_err(|e| fail(layer, e))?;
        out.push(slots);
    }
    Ok(out)
}

/// Adam over a flat vector of tuned scalars, kept in f64 (no weight
/// decay: the tuned parameters are gains, shifts and weights), stepped
/// with exact fixed-point gradient sums so every rank computes the same
/// numbers.
pub(crate) struct Adam {
    m: Vec<f64>,
    v: Vec<f64>,
    master: Vec<f64>,
    steps: i32,
}

impl Adam {
    pub(crate) fn new(values: &[f32]) -> Adam {
        Adam {
            m: vec![0.0; values.len()],
            v: vec![0.0; values.len()],
            master: values.iter().map(|&x| f64::from(x)).collect(),
            steps: 0,
        }
    }

    /// One step with the gradient `acc` (fixed point, `scale` units to
    /// one) and a learning rate per scalar.
    pub(crate) fn step(&mut self, acc: &[i128], scale: f64, lrs: &[f64]) {
        self.steps += 1;
        let t = self.steps;
        let (c1, c2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
        for i in 0..self.master.len() {
            let g = acc[i] as f64 / scale;
            self.m[i] = BETA1 * self.m[i] + (1.0 - BETA1) * g;
            self.v[i] = BETA2 * self.v[i] + (1.0 - BETA2) * g * g;
            self.master[i] -= lrs[i] * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + EPSILON);
        }
    }

    /// Puts the current values (as f32) into the variables, laid out one
    /// after another with `sizes`.
    pub(crate) fn write(&self, vars: &[Var], sizes: &[usize]) -> candle_core::Result<()> {
        let mut at = 0;
        for (var, &size) in vars.iter().zip(sizes) {
            let vals: Vec<f32> = self.master[at..at + size]
                .iter()
                .map(|&x| x as f32)
                .collect();
            var.set(&Tensor::from_vec(vals, var.shape(), var.device())?)?;
            at += size;
        }
        Ok(())
    }

    pub(crate) fn values(&self) -> Vec<f32> {
        self.master.iter().map(|&x| x as f32).collect()
    }
}

/// Adds each variable's gradient in `grads` (absent: zero) to `fixed`, in
/// fixed point (`scale` units to one). The inner error is the first
/// gradient that is not finite or not below `limit` in size.
pub(crate) fn add_fixed(
    fixed: &mut [i128],
    vars: &[Var],
    sizes: &[usize],
    grads: &candle_core::backprop::GradStore,
    scale: f64,
    limit: f64,
) -> candle_core::Result<Result<(), f64>> {
    let mut at = 0;
    for (var, &size) in vars.iter().zip(sizes) {
        if let Some(gr) = grads.get(var.as_tensor()) {
            for (a, x) in fixed[at..at + size].iter_mut().zip(flat(gr)?) {
                let x = f64::from(x);
                if !(x.is_finite() && x.abs() < limit) {
                    return Ok(Err(x));
                }
                *a += (x * scale).round() as i128;
            }
        }
        at += size;
    }
    Ok(Ok(()))
}

pub(crate) fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Fraction bits of the fixed-point output error sums.
const ERROR_FRACTION_BITS: i32 = 32;

/// The block's output error over every rank's micro-batches. Each
/// micro-batch's two sums are rounded to fixed point and added as
/// integers, so the total is exact and the same for any split over ranks;
/// only the two totals are exchanged.
pub(crate) fn output_error(
    net: &Net,
    layer: usize,
    data: &MicroBatches<'_>,
    ranks: &mut dyn Collective,
) -> Result<OutputError, PipelineError> {
    let scale = 2f64.powi(ERROR_FRACTION_BITS);
    let limit = 2f64.powi(120 - ERROR_FRACTION_BITS) / data.samples.len().max(1) as f64;
    let fixed = |x: f64| -> Result<i128, PipelineError> {
        if x.is_finite() && x.abs() < limit {
            Ok((x * scale).round() as i128)
        } else {
            Err(fail(
                layer,
                format!("an output error sum {x} is out of range"),
            ))
        }
    };
    let mut sums = [0i128; 2];
    for (b, t) in data.local.iter().zip(data.targets) {
        let y = net
            .run(layer, b, &mut |_, _| Ok(()))
            .map_err(|e| fail(layer, e))?;
        let err = (y - t)
            .and_then(|d| d.to_dtype(candle_core::DType::F64))
            .and_then(|d| d.sqr())
            .and_then(|d| d.sum_all())
            .and_then(|d| d.to_scalar::<f64>())
            .map_err(|e| fail(layer, e))?;
        let energy = t
            .to_dtype(candle_core::DType::F64)
            .and_then(|d| d.sqr())
            .and_then(|d| d.sum_all())
            .and_then(|d| d.to_scalar::<f64>())
            .map_err(|e| fail(layer, e))?;
        sums[0] += fixed(err)?;
        sums[1] += fixed(energy)?;
    }
    if ranks.world() > 1 {
        ranks
            .all_reduce_i128(&mut sums)
            .map_err(|source| PipelineError::Collective {
                during: format!("block {layer}'s output error"),
                source,
            })?;
    }
    Ok(OutputError {
        squared_error: sums[0] as f64 / scale,
        energy: sums[1] as f64 / scale,
    })
}
