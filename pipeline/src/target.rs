//! Rate targets: `target: {bits_per_weight: 3.0}` or `target: {size: 25MB}`
//! chooses the `uniform` rate of every tensor the default pipeline
//! compresses, so that the artifact meets the target at the least total
//! squared error — a rate–distortion allocation over error curves measured
//! on the tensors themselves.
//!
//! Each such tensor's chain runs on a sample of its rows (as the dry run's
//! cost model does) at every rate of [`RATES`]; its bytes and squared
//! error at any rate between are interpolated (bytes linearly, the error's
//! logarithm linearly). The allocation minimises Σ errorᵢ(rᵢ) subject to
//! Σ bytesᵢ(rᵢ) ≤ budget by a Lagrange multiplier: for a price λ each
//! tensor takes the rate minimising errorᵢ + λ·bytesᵢ, and λ is bisected
//! until the bytes meet the budget. The job then runs with one rule per
//! tensor naming its rate. The same curves give the even spread — one rate
//! for every tensor, meeting the same budget — for comparison.
//!
//! With `error: outputs` (a job with a `calibration:` section) the error
//! is each linear's at its outputs instead: its squared error weighted by
//! its inputs' second moments on the calibration data, tr(E·H·Eᵀ) with
//! H = E[x xᵀ] (see [`weighted_curves`]), so a channel the activations
//! drive hard costs more than one they barely touch. Measured on MiniLM
//! and SmolLM2 it gives a worse model output than the weights' own error
//! (the README has the figures), which is why it is not the default.

use hcx_protocol::job::{Rule, TargetError};
use hcx_protocol::{JobSpec, StageSpec};
use serde::Serialize;

use crate::estimate::{SAMPLE_VALUES, rows_and_cols, sample_rows, take_rows};
use crate::model::{Model, TensorInfo, is_integer_dtype, raw_to_f32};
use crate::run::encode_raw_calibrated;
use crate::{PipelineError, calibrate};

/// The rates each tensor's curve is measured at, bits of entropy per code.
pub const RATES: &[f64] = &[1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0];

/// The finest step a chosen rate takes.
const STEP: f64 = 0.01;

/// One tensor's measured curve.
#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    /// The tensor.
    pub name: String,
    /// Its values.
    pub numel: u64,
    /// Estimated bytes (parts and overhead) at each of [`RATES`].
    pub bytes: Vec<f64>,
    /// Estimated squared error at each of [`RATES`].
    pub error: Vec<f64>,
}

impl Curve {
    /// Bytes and squared error at rate `r` (interpolated).
    pub fn at(&self, r: f64) -> (f64, f64) {
        let k = RATES
            .windows(2)
            .position(|w| r <= w[1])
            .unwrap_or(RATES.len() - 2);
        let (r0, r1) = (RATES[k], RATES[k + 1]);
        let t = ((r - r0) / (r1 - r0)).clamp(0.0, 1.0);
        let bytes = self.bytes[k] + t * (self.bytes[k + 1] - self.bytes[k]);
        let floor = 1e-30;
        let (e0, e1) = (self.error[k].max(floor), self.error[k + 1].max(floor));
        let error = (e0.ln() + t * (e1.ln() - e0.ln())).exp();
        (bytes, error)
    }
}

/// The chosen rates and what they are expected to give.
#[derive(Debug, Clone, Serialize)]
pub struct Allocation {
    /// Each allocated tensor's rate, in model order.
    pub rates: Vec<(String, f64)>,
    /// The bytes the allocated tensors may take.
    pub budget_bytes: f64,
    /// The bytes they are expected to take.
    pub expected_bytes: f64,
    /// Their expected total squared error.
    pub expected_error: f64,
    /// The one rate for every tensor that meets the same budget.
    pub even_rate: f64,
    /// The even spread's expected total squared error.
    pub even_error: f64,
    /// Their values.
    pub params: u64,
    /// Whether the errors were weighted by the job's calibration
    /// statistics (the output error on the calibration inputs) rather than
    /// taken on the weights alone.
    pub weighted: bool,
    /// The measured curves.
    #[serde(skip)]
    pub curves: Vec<Curve>,
}

fn uniform_at(pipeline: &[StageSpec], r: f64) -> Vec<StageSpec> {
    pipeline
        .iter()
        .map(|s| match s {
            StageSpec::Uniform(u) => {
                let mut u = u.clone();
                u.bits = (r * 100.0).round() / 100.0;
                StageSpec::Uniform(u)
            }
            other => other.clone(),
        })
        .collect()
}

/// A glob matching exactly `name`.
fn exact_glob(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '*' | '?' | '[' | ']' | '{' | '}' => {
                out.push('[');
                out.push(c);
                out.push(']');
            }
            c => out.push(c),
        }
    }
    out
}

/// What a tensor's squared error is weighted by.
#[derive(Clone, Copy)]
enum Weight<'a> {
    /// Nothing: the weight's own squared error ‖W − Ŵ‖².
    None,
    /// Its inputs' second moments H = E[x xᵀ] (columns × columns): the
    /// mean squared error of its outputs on the calibration inputs,
    /// E‖(W − Ŵ) x‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ).
    Inputs(&'a [f64]),
    /// A tensor without statistics of its own in a calibrated job: its
    /// squared error times the mean input energy per channel over the
    /// tensors that have them, as if its inputs were that loud and
    /// uncorrelated.
    Scalar(f64),
}

fn curve(
    spec: &JobSpec,
    model: &Model,
    t: &TensorInfo,
    weight: Weight<'_>,
) -> Result<Curve, PipelineError> {
    let raw = model.raw(t);
    let (rows, cols) = rows_and_cols(&t.shape);
    let picked = sample_rows(rows, cols, SAMPLE_VALUES);
    let (sample, shape) = take_rows(raw, &t.shape, &picked);
    let scale = rows as f64 / picked.len().max(1) as f64;
    let energy: f64 = raw_to_f32(raw, t.dtype)
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum();
    let inputs = match weight {
        Weight::Inputs(h) if h.len() == cols * cols => Some(h),
        _ => None,
    };
    let original = inputs.map(|_| raw_to_f32(&sample, t.dtype));
    let mut bytes = Vec::with_capacity(RATES.len());
    let mut error = Vec::with_capacity(RATES.len());
    for &r in RATES {
        let stages = uniform_at(&spec.pipeline, r);
        let (e, decoded) = encode_raw_calibrated(
            &t.name, t.dtype, &shape, &sample, &stages, spec.seed, inputs,
        )?;
        let parts: f64 = e.data.iter().map(|d| d.len() as f64).sum();
        let overhead = serde_json::to_string(&e.entry).map_or(0, |s| s.len())
            + e.entry
                .parts
                .iter()
                .map(|p| p.name.len() + 64)
                .sum::<usize>();
        bytes.push(parts * scale + overhead as f64);
        let rel = e.entry.sqnr_db.map_or(0.0, |db| 10f64.powf(-db / 10.0));
        error.push(match (inputs, &original, decoded) {
            (Some(h), Some(a), Some(b)) => {
                scale * hcx_kernels::hessian::error_trace(a, &b, picked.len(), cols, h)
            }
            _ => match weight {
                Weight::Scalar(w) => energy * rel * w,
                _ => energy * rel,
            },
        });
    }
    Ok(Curve {
        name: t.name.clone(),
        numel: t.numel() as u64,
        bytes,
        error,
    })
}

/// The curves of a calibrated job, each tensor's error weighted by its
/// inputs' statistics: the original model runs block by block over the
/// calibration micro-batches (as calibration does, but nothing is
/// quantized), each block's input sites' H = Σ x xᵀ / rows is collected,
/// the curves of that block's tensors are measured with it, and it is
/// dropped before the next block, so at most one block's statistics are
/// held. Tensors outside the blocks (embeddings, the output head) have no
/// statistics: they are weighted by [`Weight::Scalar`].
fn weighted_curves(
    spec: &JobSpec,
    model: &Model,
    allocated: &[&TensorInfo],
) -> Result<Vec<Curve>, PipelineError> {
    use rayon::prelude::*;
    use std::collections::HashMap;
    let bad = |why: String| PipelineError::Estimate { why };
    let cal = calibrate::calibration_of(spec, model)?;
    if cal.is_federated() {
        return Err(bad(
            "a target in a federated job would need every site's calibration data where the target is resolved; give the job one calibration source".into(),
        ));
    }
    let (net, tok) = calibrate::load_net(spec, model, None)?;
    let files: Vec<std::path::PathBuf> = cal.files().flat_map(|f| f.as_slice().to_vec()).collect();
    let mut batches = calibrate::read_batches(&net, &tok, model, cal, &files)?;
    let mut curves: Vec<Option<Curve>> = (0..allocated.len()).map(|_| None).collect();
    // Σ tr(H)/dim over the sites seen, for the tensors without statistics.
    let (mut loudness, mut sites_seen) = (0.0_f64, 0usize);
    for layer in 0..net.layers() {
        let mut stats: HashMap<hcx_forward::llama::Site, hcx_kernels::hessian::HessianSum> =
            HashMap::new();
        for b in batches.iter_mut() {
            let mut capture = |site, input: &candle_core::Tensor| {
                calibrate::add_input(&mut stats, layer, site, input)
            };
            let y = net
                .run(layer, b, &mut capture)
                .map_err(|e| calibrate::forward_error(model, e))?;
            b.x = y;
        }
        let mut means: HashMap<hcx_forward::llama::Site, (Vec<f64>, usize)> = HashMap::new();
        for (site, h) in stats {
            let (dim, n) = (h.dim(), h.count().max(1) as f64);
            let m: Vec<f64> = h.to_f64().into_iter().map(|v| v / n).collect();
            loudness += (0..dim).map(|i| m[i * dim + i]).sum::<f64>() / dim.max(1) as f64;
            sites_seen += 1;
            means.insert(site, (m, dim));
        }
        let here: Vec<(usize, &[f64])> = allocated
            .iter()
            .enumerate()
            .filter_map(|(i, t)| match net.site_of(&t.name) {
                Some((l, site)) if l == layer => means.get(&site).map(|(m, _)| (i, m.as_slice())),
                _ => None,
            })
            .collect();
        let measured = here
            .par_iter()
            .map(|&(i, h)| curve(spec, model, allocated[i], Weight::Inputs(h)).map(|c| (i, c)))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, c) in measured {
            curves[i] = Some(c);
        }
    }
    let mean = if sites_seen > 0 {
        loudness / sites_seen as f64
    } else {
        1.0
    };
    let rest: Vec<usize> = (0..allocated.len())
        .filter(|i| curves[*i].is_none())
        .collect();
    let measured = rest
        .par_iter()
        .map(|&i| curve(spec, model, allocated[i], Weight::Scalar(mean)).map(|c| (i, c)))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, c) in measured {
        curves[i] = Some(c);
    }
    Ok(curves.into_iter().flatten().collect())
}

/// The rates on the fine grid between the lowest and highest measured.
fn grid() -> Vec<f64> {
    let (lo, hi) = (RATES[0], RATES[RATES.len() - 1]);
    let n = ((hi - lo) / STEP).round() as usize;
    (0..=n).map(|i| lo + i as f64 * STEP).collect()
}

/// Each curve's rate at price `lambda`, and the totals.
fn at_price(curves: &[Curve], grid: &[f64], lambda: f64) -> (Vec<f64>, f64, f64) {
    let mut rates = Vec::with_capacity(curves.len());
    let (mut bytes, mut error) = (0.0, 0.0);
    for c in curves {
        let (mut best, mut cost, mut pick) = (grid[0], f64::INFINITY, (0.0, 0.0));
        for &r in grid {
            let (b, e) = c.at(r);
            let v = e + lambda * b;
            if v < cost {
                (best, cost, pick) = (r, v, (b, e));
            }
        }
        rates.push(best);
        bytes += pick.0;
        error += pick.1;
    }
    (rates, bytes, error)
}

/// Chooses every allocated tensor's rate for `spec`'s target.
pub fn allocate(spec: &JobSpec) -> Result<Allocation, PipelineError> {
    let bad = |why: String| PipelineError::Estimate { why };
    let Some(target) = &spec.target else {
        return Err(bad("the job has no target".into()));
    };
    let model = Model::open(&spec.model.path)?;
    let allocated: Vec<&TensorInfo> = model
        .tensors
        .iter()
        .filter(|t| !is_integer_dtype(t.dtype) && spec.stages_for(&t.name) == spec.pipeline)
        .collect();
    if allocated.is_empty() {
        return Err(bad(
            "no tensor takes the default pipeline: the rules cover them all, so the target has nothing to choose".into(),
        ));
    }
    let curves = if target.error == TargetError::Outputs {
        weighted_curves(spec, &model, &allocated)?
    } else {
        use rayon::prelude::*;
        allocated
            .par_iter()
            .map(|t| curve(spec, &model, t, Weight::None))
            .collect::<Result<Vec<_>, _>>()?
    };
    let params: u64 = curves.iter().map(|c| c.numel).sum();
    let budget = match (target.bits_per_weight, target.size_bytes()) {
        (Some(b), _) => b * params as f64 / 8.0,
        (None, Some(Ok(size))) => {
            // The rest of the artifact as the dry run estimates it.
            let est = crate::estimate::estimate(&crate::estimate::sized_without_calibration(spec))?;
            let names: std::collections::BTreeSet<&str> =
                curves.iter().map(|c| c.name.as_str()).collect();
            let theirs: u64 = est
                .tensors
                .iter()
                .filter(|t| names.contains(t.name.as_str()))
                .map(|t| t.bytes + t.overhead_bytes)
                .sum();
            let rest = est.artifact_bytes.saturating_sub(theirs);
            if size <= rest {
                return Err(bad(format!(
                    "target size {size} bytes leaves nothing for the {} tensors it allocates: the rest of the artifact takes about {rest} bytes",
                    curves.len()
                )));
            }
            (size - rest) as f64
        }
        (None, Some(Err(e))) => return Err(bad(format!("target.size: {e}"))),
        (None, None) => return Err(bad("target: give bits_per_weight or size".into())),
    };
    let grid = grid();
    let low_bytes: f64 = curves.iter().map(|c| c.at(RATES[0]).0).sum();
    if low_bytes > budget {
        return Err(bad(format!(
            "the target needs {budget:.0} bytes for the allocated tensors, below the {low_bytes:.0} they take at the lowest rate, {} bits",
            RATES[0]
        )));
    }
    // Bisect the price on a log scale: a higher price buys fewer bytes.
    let (mut lo, mut hi) = (1e-30f64, 1e30f64);
    let mut best = at_price(&curves, &grid, hi);
    for _ in 0..200 {
        let mid = ((lo.ln() + hi.ln()) * 0.5).exp();
        let r = at_price(&curves, &grid, mid);
        if r.1 <= budget {
            hi = mid;
            best = r;
        } else {
            lo = mid;
        }
        if hi / lo < 1.0 + 1e-9 {
            break;
        }
    }
    let (rates, expected_bytes, expected_error) = best;
    // The even spread: the one rate that meets the same budget.
    let total = |r: f64| {
        curves
            .iter()
            .map(|c| c.at(r))
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    let mut even_rate = grid[0];
    for &r in &grid {
        if total(r).0 <= budget {
            even_rate = r;
        }
    }
    Ok(Allocation {
        rates: curves
            .iter()
            .zip(rates)
            .map(|(c, r)| (c.name.clone(), (r * 100.0).round() / 100.0))
            .collect(),
        budget_bytes: budget,
        expected_bytes,
        expected_error,
        even_rate,
        even_error: total(even_rate).1,
        params,
        weighted: target.error == TargetError::Outputs,
        curves,
    })
}

/// `spec` with its target resolved: one rule per allocated tensor (ahead
/// of the job's own) giving the default pipeline at its rate, and no
/// target. A spec without a target comes back as it is.
pub fn resolve(spec: &JobSpec) -> Result<(JobSpec, Option<Allocation>), PipelineError> {
    if spec.target.is_none() {
        return Ok((spec.clone(), None));
    }
    let a = allocate(spec)?;
    let mut out = spec.clone();
    out.target = None;
    let mut rules: Vec<Rule> = a
        .rates
        .iter()
        .map(|(name, r)| Rule {
            patterns: hcx_protocol::job::Patterns::One(exact_glob(name)),
            pipeline: Some(uniform_at(&spec.pipeline, *r)),
            keep: None,
        })
        .collect();
    rules.extend(out.rules);
    out.rules = rules;
    Ok((out, Some(a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(bytes_per_bit: f64, error_at_1: f64) -> Curve {
        Curve {
            name: "t".into(),
            numel: 1000,
            bytes: RATES.iter().map(|r| r * bytes_per_bit).collect(),
            // About 6 dB a bit, as a uniform quantizer gives.
            error: RATES
                .iter()
                .map(|r| error_at_1 * 4f64.powf(-(r - 1.0)))
                .collect(),
        }
    }

    #[test]
    fn curves_interpolate_between_measured_rates() {
        let c = curve(100.0, 1.0);
        let (b, e) = c.at(2.25);
        assert!((b - 225.0).abs() < 1e-9, "{b}");
        assert!((e - 4f64.powf(-1.25)).abs() < 1e-12, "{e}");
        assert_eq!(c.at(RATES[0]).0, 100.0);
        assert_eq!(c.at(8.0).0, 800.0);
    }

    #[test]
    fn the_allocation_meets_the_budget_and_favours_the_tensor_whose_error_is_larger() {
        // Two tensors of equal size, one with ten times the error at every
        // rate: at the same price it takes more bits.
        let curves = vec![curve(100.0, 10.0), curve(100.0, 1.0)];
        let grid = grid();
        let (rates, bytes, error) = at_price(&curves, &grid, 1e-3);
        assert!(rates[0] > rates[1], "{rates:?}");
        // Equal curves get equal rates: the even spread is the optimum.
        let twins = vec![curve(100.0, 1.0), curve(100.0, 1.0)];
        let (r, _, _) = at_price(&twins, &grid, 1e-3);
        assert_eq!(r[0], r[1]);
        // Any other split of the same bytes costs more error.
        let (b0, e0) = curves[0].at(rates[0] - 0.5);
        let (b1, e1) = curves[1].at(rates[1] + 0.5);
        assert!((b0 + b1 - bytes).abs() < 1e-6);
        assert!(e0 + e1 > error);
    }

    #[test]
    fn exact_globs_match_only_their_name() {
        let g = exact_glob("a.b[0]*");
        let m = globset::GlobBuilder::new(&g)
            .literal_separator(false)
            .build()
            .unwrap()
            .compile_matcher();
        assert!(m.is_match("a.b[0]*"));
        assert!(!m.is_match("a.b0x"));
    }
}
