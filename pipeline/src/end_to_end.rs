//! End-to-end tuning of a decoder's norm gains (the job's
//! `distill.end_to_end:`).
//!
//! Block-wise distillation matches each block's activations; what the model
//! is judged by is its next-token distributions. Once every block is
//! encoded (and tuned block by block), the norm gains of the whole decoder,
//! each block's two RMSNorm gains and the final norm's, are tuned together
//! with Adam to minimise the mean KL(original ‖ compressed) over every
//! position of the calibration windows. The original model's final hidden
//! states were carried through the walk beside the compressed model's, so
//! its distributions are the final norm (the original gain) and the head
//! applied to them; the head itself is not tuned.
//!
//! A window's gradient takes two backward passes: the final norm, head and
//! loss a chunk of [`HEAD_CHUNK`] rows at a time, which gives the gradient
//! of the final hidden states (and of the final norm's gain); then the
//! blocks once, with that gradient. Memory stays at one window's block
//! activations and one chunk's logits. As in block-wise distillation the
//! gradients are summed in exact fixed point over the windows and ranks
//! (one window at a time, in parallel), so the tuned gains are the same
//! bits on any number of ranks.

use std::time::Instant;

use candle_core::{D, Tensor, Var};
use hcx_forward::Tunable;
use hcx_forward::llama::{FINAL_NORM, Llama};
use hcx_kernels::collective::Collective;
use hcx_kernels::rng::{SplitMix64, seed_for};
use hcx_protocol::EndToEnd;
use rayon::prelude::*;

use crate::PipelineError;
use crate::distill::{Adam, FRACTION_BITS, MicroBatches, add_fixed, flat};

/// Rows of logits (each `vocab` wide) computed at once.
const HEAD_CHUNK: usize = 256;

/// Fraction bits of the fixed-point KL sums.
const KL_FRACTION_BITS: i32 = 32;

/// What end-to-end tuning did.
#[derive(Debug, Clone)]
pub(crate) struct EndToEndTuning {
    /// Scalars tuned.
    pub(crate) params: usize,
    /// Mean KL(original ‖ compressed) per position of the calibration
    /// windows (nats) before tuning.
    pub(crate) before: f64,
    /// The same after tuning, with the gains as the artifact stores them.
    pub(crate) after: f64,
    /// Wall time.
    pub(crate) seconds: f64,
    /// The tuned gains as stored, by HF name.
    pub(crate) tuned: Vec<(String, Vec<f32>)>,
}

fn fail(why: impl std::fmt::Display) -> PipelineError {
    PipelineError::EndToEnd {
        why: why.to_string(),
    }
}

/// Log-probabilities along the last dimension, with operations that record
/// gradients (the row maximum, which does not change the result, is taken
/// as a constant).
fn log_softmax_for_training(x: &Tensor) -> candle_core::Result<Tensor> {
    let diff = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let total = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    diff.broadcast_sub(&total)
}

/// Σ over the rows of KL(p ‖ q) for the original model's log-probabilities
/// `lp` and the compressed model's `lq`, as a scalar tensor.
fn kl_sum(lp: &Tensor, lq: &Tensor) -> candle_core::Result<Tensor> {
    lp.exp()?.mul(&(lp - lq)?)?.sum_all()
}

/// The original model's log-probabilities for final hidden states `t`.
fn reference_log_probs(
    net: &Llama,
    t: &Tensor,
    norm: &Tensor,
) -> Result<Tensor, hcx_forward::ForwardError> {
    hcx_forward::llama::log_softmax(&net.logits_with_norm(t, norm)?)
}

/// One window's contribution to the gradient of the step's mean KL over
/// `rows` positions, added to `fixed`, and its KL sum. `x` is the window
/// embedded, `t` the original model's final hidden states.
#[allow(clippy::too_many_arguments)]
fn window_gradient(
    net: &Llama,
    x: &Tensor,
    t: &Tensor,
    norm: &Tensor,
    vars: &[Var],
    sizes: &[usize],
    rows: usize,
    fixed: &mut [i128],
    scale: f64,
    limit: f64,
) -> Result<f64, PipelineError> {
    let len = x.dims()[0];
    let h = net.hidden_for_training(x, 1, len).map_err(fail)?;
    let e = |e: candle_core::Error| fail(e);
    let leaf = Var::from_tensor(&h.detach()).map_err(e)?;
    let out_of_range = |x: f64| {
        fail(format!(
            "gradient {x} is out of range; lower `distill.end_to_end.lr`"
        ))
    };
    let mut kl = 0f64;
    let mut dh: Option<Tensor> = None;
    let mut r0 = 0;
    while r0 < len {
        let r = HEAD_CHUNK.min(len - r0);
        let lq = net
            .logits_for_training(&leaf.as_tensor().narrow(0, r0, r).map_err(e)?)
            .map_err(fail)?;
        let lq = log_softmax_for_training(&lq).map_err(e)?;
        let lp = reference_log_probs(net, &t.narrow(0, r0, r).map_err(e)?, norm).map_err(fail)?;
        let chunk = kl_sum(&lp, &lq).map_err(e)?;
        kl += f64::from(chunk.to_scalar::<f32>().map_err(e)?);
        let grads = (chunk / rows as f64)
            .and_then(|l| l.backward())
            .map_err(e)?;
        add_fixed(fixed, vars, sizes, &grads, scale, limit)
            .map_err(e)?
            .map_err(out_of_range)?;
        if let Some(g) = grads.get(leaf.as_tensor()) {
            dh = Some(match dh {
                None => g.clone(),
                Some(d) => (d + g).map_err(e)?,
            });
        }
        r0 += r;
    }
    if let Some(dh) = dh {
        // The blocks' part: d/dθ Σ h·(∂L/∂h) with ∂L/∂h held constant.
        let grads = (&h * dh.detach())
            .and_then(|p| p.sum_all())
            .and_then(|p| p.backward())
            .map_err(e)?;
        add_fixed(fixed, vars, sizes, &grads, scale, limit)
            .map_err(e)?
            .map_err(out_of_range)?;
    }
    Ok(kl)
}

/// One window's KL sum (no gradients).
fn window_kl(net: &Llama, x: &Tensor, t: &Tensor, norm: &Tensor) -> Result<f64, PipelineError> {
    let len = x.dims()[0];
    let e = |e: candle_core::Error| fail(e);
    let mut h = x.clone();
    for l in 0..net.cfg.layers {
        h = net.layer(l, &h, 1, len, &mut |_, _| Ok(())).map_err(fail)?;
    }
    let mut kl = 0f64;
    let mut r0 = 0;
    while r0 < len {
        let r = HEAD_CHUNK.min(len - r0);
        let lq = hcx_forward::llama::log_softmax(
            &net.logits(&h.narrow(0, r0, r).map_err(e)?).map_err(fail)?,
        )
        .map_err(fail)?;
        let lp = reference_log_probs(net, &t.narrow(0, r0, r).map_err(e)?, norm).map_err(fail)?;
        kl += f64::from(
            kl_sum(&lp, &lq)
                .and_then(|k| k.to_scalar::<f32>())
                .map_err(e)?,
        );
        r0 += r;
    }
    Ok(kl)
}

/// Each window of this rank's micro-batches (by local index): the
/// embedded window and the original model's final hidden states.
fn windows_of(data: &MicroBatches<'_>, li: usize) -> Result<Vec<(Tensor, Tensor)>, PipelineError> {
    let b = &data.local[li];
    (0..b.windows)
        .map(|w| {
            let x = b.x.narrow(0, w * b.len, b.len)?;
            let t = data.targets[li].narrow(0, w * b.len, b.len)?;
            Ok((x, t))
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(fail)
}

/// Mean KL per position over every rank's windows; the per-window sums are
/// added in fixed point, so the mean is the same for any split over ranks.
fn mean_kl(
    net: &Llama,
    data: &MicroBatches<'_>,
    norm: &Tensor,
    rows: usize,
    ranks: &mut dyn Collective,
) -> Result<f64, PipelineError> {
    let scale = 2f64.powi(KL_FRACTION_BITS);
    let mut windows = Vec::new();
    for li in 0..data.local.len() {
        windows.extend(windows_of(data, li)?);
    }
    let sums: Vec<Result<f64, PipelineError>> = windows
        .par_iter()
        .map(|(x, t)| window_kl(net, x, t, norm))
        .collect();
    let mut total = [0i128; 1];
    for s in sums {
        let s = s?;
        if !(s.is_finite() && s.abs() < 2f64.powi(80)) {
            return Err(fail(format!("a window's KL sum {s} is out of range")));
        }
        total[0] += (s * scale).round() as i128;
    }
    if ranks.world() > 1 {
        ranks
            .all_reduce_i128(&mut total)
            .map_err(|source| PipelineError::Collective {
                during: "end-to-end tuning's KL divergence".into(),
                source,
            })?;
    }
    Ok(total[0] as f64 / scale / rows.max(1) as f64)
}

/// Tunes every norm gain of `net` (whose blocks are all encoded) against
/// the original model's next-token distributions. `data.local` holds this
/// rank's micro-batches as embedded windows, `data.targets` the original
/// model's final hidden states for them; `round` maps a gain to what the
/// artifact stores, and those values are left in `net`.
pub(crate) fn tune_end_to_end(
    net: &mut Llama,
    spec: &EndToEnd,
    job_seed: u64,
    data: &MicroBatches<'_>,
    round: &dyn Fn(&str, Vec<f32>) -> Vec<f32>,
    ranks: &mut dyn Collective,
) -> Result<EndToEndTuning, PipelineError> {
    let t0 = Instant::now();
    let total = data.samples.len();
    let hidden = net.cfg.hidden;
    if data.local.len() != data.targets.len()
        || data.local.len() != data.global.len()
        || data.elements.len() != total
        || data.global.iter().any(|&g| g >= total)
    {
        return Err(fail("micro-batch bookkeeping disagrees"));
    }
    let rows_of = |g: usize| data.elements[g] / hidden.max(1);
    let all_rows: usize = (0..total).map(rows_of).sum();
    let local_of: std::collections::HashMap<usize, usize> = data
        .global
        .iter()
        .enumerate()
        .map(|(li, &g)| (g, li))
        .collect();
    // The original final norm, for the reference distributions.
    let norm = net.tensor(FINAL_NORM).map_err(fail)?.clone();
    let mut names: Vec<String> = (0..net.cfg.layers)
        .flat_map(|l| net.tunable(l, Tunable::Norms))
        .collect();
    names.push(FINAL_NORM.to_string());
    let before = mean_kl(net, data, &norm, all_rows, ranks)?;
    let mut vars = Vec::with_capacity(names.len());
    for name in &names {
        let t = net.tensor(name).map_err(fail)?.clone();
        let v = Var::from_tensor(&t).map_err(fail)?;
        net.set_tensor(name, v.as_tensor().clone()).map_err(fail)?;
        vars.push(v);
    }
    let sizes: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
    let params: usize = sizes.iter().sum();
    let mut values = Vec::with_capacity(params);
    for v in &vars {
        values.extend(flat(v.as_tensor()).map_err(fail)?);
    }
    let lrs = vec![spec.lr; params];
    if total > 0 {
        let per_batch = data.samples[0].max(1);
        let k = spec.batch.div_ceil(per_batch).clamp(1, total);
        let mut order: Vec<usize> = (0..total).collect();
        let mut rng = SplitMix64::new(seed_for(job_seed, "end to end", "distill"));
        for i in (1..total).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let scale = 2f64.powi(FRACTION_BITS);
        let windows: usize = data.samples.iter().sum();
        let limit = 2f64.powi(126 - 64) / windows.max(1) as f64;
        let mut adam = Adam::new(&values);
        for step in 0..spec.steps {
            let set: Vec<usize> = (0..k).map(|j| order[(step * k + j) % total]).collect();
            let rows: usize = set.iter().map(|&g| rows_of(g)).sum();
            let mut units = Vec::new();
            for g in &set {
                if let Some(&li) = local_of.get(g) {
                    units.extend(windows_of(data, li)?);
                }
            }
            let net_ref: &Llama = net;
            let partial: Vec<Result<(Vec<i128>, f64), PipelineError>> = units
                .par_iter()
                .map(|(x, t)| {
                    let mut fixed = vec![0i128; params];
                    let kl = window_gradient(
                        net_ref, x, t, &norm, &vars, &sizes, rows, &mut fixed, scale, limit,
                    )?;
                    Ok((fixed, kl))
                })
                .collect();
            let mut acc = vec![0i128; params];
            let mut kl = 0.0;
            for p in partial {
                let (p, k) = p?;
                kl += k;
                for (a, x) in acc.iter_mut().zip(p) {
                    *a += x;
                }
            }
            if step % 10 == 0 || step + 1 == spec.steps {
                let local_rows: usize = units.iter().map(|(x, _)| x.dims()[0]).sum();
                tracing::info!(
                    step,
                    kl = kl / local_rows.max(1) as f64,
                    "end-to-end step (KL before the step, this rank's windows)"
                );
            }
            if ranks.world() > 1 {
                ranks
                    .all_reduce_i128(&mut acc)
                    .map_err(|source| PipelineError::Collective {
                        during: format!("end-to-end tuning's gradients, step {step}"),
                        source,
                    })?;
            }
            adam.step(&acc, scale, &lrs);
            adam.write(&vars, &sizes).map_err(fail)?;
        }
        values = adam.values();
    }
    let mut tuned = Vec::with_capacity(names.len());
    let mut at = 0;
    for ((name, var), &size) in names.iter().zip(&vars).zip(&sizes) {
        let stored = round(name, values[at..at + size].to_vec());
        let t = Tensor::from_vec(stored.clone(), var.shape(), var.device()).map_err(fail)?;
        net.set_tensor(name, t).map_err(fail)?;
        tuned.push((name.clone(), stored));
        at += size;
    }
    let after = mean_kl(net, data, &norm, all_rows, ranks)?;
    Ok(EndToEndTuning {
        params,
        before,
        after,
        seconds: t0.elapsed().as_secs_f64(),
        tuned,
    })
}

/// CPU seconds (every thread) of one window's gradient and of one window's
/// KL without gradients through the whole of `net`, measured on window `x`
/// (embedded) against the model's own final hidden states: what the dry
/// run scales to the job's steps and windows. `net` is left as it was.
pub(crate) fn measure_window(net: &mut Llama, x: &Tensor) -> Result<(f64, f64), PipelineError> {
    let cpu = crate::estimate::process_cpu_seconds;
    let norm = net.tensor(FINAL_NORM).map_err(fail)?.clone();
    let len = x.dims()[0];
    let mut t = x.clone();
    for l in 0..net.cfg.layers {
        t = net.layer(l, &t, 1, len, &mut |_, _| Ok(())).map_err(fail)?;
    }
    let before = cpu();
    window_kl(net, x, &t, &norm)?;
    let kl = cpu() - before;
    let mut names: Vec<String> = (0..net.cfg.layers)
        .flat_map(|l| net.tunable(l, Tunable::Norms))
        .collect();
    names.push(FINAL_NORM.to_string());
    let mut saved = Vec::with_capacity(names.len());
    let mut vars = Vec::with_capacity(names.len());
    for name in &names {
        let t = net.tensor(name).map_err(fail)?.clone();
        let v = Var::from_tensor(&t).map_err(fail)?;
        net.set_tensor(name, v.as_tensor().clone()).map_err(fail)?;
        saved.push(t);
        vars.push(v);
    }
    let sizes: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
    let mut fixed = vec![0i128; sizes.iter().sum()];
    let before = cpu();
    let result = window_gradient(
        net,
        x,
        &t,
        &norm,
        &vars,
        &sizes,
        len,
        &mut fixed,
        2f64.powi(FRACTION_BITS),
        f64::MAX,
    );
    let gradient = cpu() - before;
    for (name, t) in names.iter().zip(saved) {
        net.set_tensor(name, t).map_err(fail)?;
    }
    result?;
    Ok((gradient, kl))
}
