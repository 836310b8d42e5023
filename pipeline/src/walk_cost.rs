//! What a calibrated job's walk through its model will cost: the forward
//! passes and input statistics, each calibrated tensor's encoding (GPTQ
//! with its chain) and distillation, measured on the first block and
//! scaled to the whole model and every calibration micro-batch.
//!
//! The measurement runs the walk's own functions on this machine, timed
//! by the process's CPU time (every thread): the model and the calibration
//! data are loaded whole (that is the run's own first step), a sample of
//! the micro-batches (evenly spread, about [`SAMPLE_ROWS`] token rows, at
//! least one micro-batch) goes through block 0 once capturing its inputs'
//! statistics and once without; each distinct calibrated chain (the
//! tensor's stages, shape and input site) is encoded once with the
//! sample's statistics; and with `distill:` block 0 is tuned twice, with no
//! step and with [`MEASURED_STEPS`] steps over the sample, whose difference
//! is the cost of a step; with `distill.end_to_end` one window's gradient
//! and one window's KL through the whole model are timed and scaled to the
//! steps and the measuring passes. Forward and distillation costs scale with the
//! token rows (attention's part, which grows with a window's length, is
//! in the sample's per-row figure since the sample has the job's windows),
//! and every block is taken to cost what block 0 costs: true of the models
//! the walk supports, whose blocks all have one shape.

use std::collections::HashMap;

use candle_core::Tensor;
use hcx_forward::llama::Site;
use hcx_kernels::correction::Correction;
use hcx_kernels::hessian::HessianSum;
use hcx_protocol::manifest::PartEntry;
use hcx_protocol::{CalibrationOrder, Distill, DistillParam, JobSpec};
use serde::Serialize;

use crate::PipelineError;
use crate::calibrate::{
    Batch, BatchSize, Layout, add_input, calibration_of, check_calibrated_tensors, check_site_rows,
    forward_error, layout, load_net, plans_of,
};
use crate::distill::{MicroBatches, distill_block, no_correction};
use crate::estimate::process_cpu_seconds;
use crate::model::Model;
use crate::run::encode_raw_calibrated;

/// Token rows of the sample the first block is measured on.
pub const SAMPLE_ROWS: usize = 1024;

/// Distillation steps timed on the sample.
pub const MEASURED_STEPS: usize = 2;

/// A calibrated job's walk, measured on its first block (see the module
/// docs). Every figure is CPU seconds (user and system, every thread) of
/// one process walking the whole model over all the micro-batches, unless
/// it says otherwise.
#[derive(Debug, Clone, Serialize)]
pub struct WalkCost {
    /// Blocks of the model's forward pass.
    pub blocks: usize,
    /// Calibration micro-batches.
    pub micro_batches: usize,
    /// Calibration token rows (every micro-batch's).
    pub rows: usize,
    /// Micro-batches the first block was measured on.
    pub sampled_micro_batches: usize,
    /// Their token rows.
    pub sampled_rows: usize,
    /// Reading the model into the forward pass and the calibration data
    /// into micro-batches (measured whole).
    pub load_cpu_seconds: f64,
    /// The forward passes of every block over every micro-batch: one that
    /// captures the inputs' statistics (and, with `distill.params:
    /// [weights]`, one more for each input site after the first, each
    /// costed as a full capturing pass), and `plain_passes` more.
    pub forward_cpu_seconds: f64,
    /// Passes without statistics per block: the original model's beside
    /// the compressed one's when distilling, the re-run on the encoded
    /// weights with `order: sequential`, and with `weights` the block as
    /// calibration alone encodes it.
    pub plain_passes: usize,
    /// Encoding every calibrated tensor with its statistics.
    pub encode_cpu_seconds: f64,
    /// Distillation of every block: its steps and its error measured
    /// before and after (0 without `distill:`).
    pub distill_cpu_seconds: f64,
    /// Of that, the steps.
    pub distill_steps_cpu_seconds: f64,
    /// Micro-batches each distillation step takes.
    pub micro_batches_per_step: usize,
    /// End-to-end tuning (`distill.end_to_end`): its steps and the KL
    /// measured before and after over every window (0 without it).
    pub end_to_end_cpu_seconds: f64,
    /// Of that, the steps.
    pub end_to_end_steps_cpu_seconds: f64,
    /// Micro-batches each end-to-end step takes.
    pub end_to_end_micro_batches_per_step: usize,
    /// Bytes the learned corrections add to the artifact (parts, manifest
    /// and header entries), over every corrected weight.
    pub correction_bytes: u64,
    /// Each calibrated tensor's estimated encoding CPU seconds, by name.
    #[serde(skip)]
    pub tensor_cpu_seconds: HashMap<String, f64>,
    /// Each corrected weight's added part bytes and overhead bytes.
    #[serde(skip)]
    pub tensor_correction_bytes: HashMap<String, (u64, u64)>,
}

impl WalkCost {
    /// CPU seconds of one process walking the whole model alone.
    pub fn cpu_seconds(&self) -> f64 {
        self.load_cpu_seconds
            + self.forward_cpu_seconds
            + self.encode_cpu_seconds
            + self.distill_cpu_seconds
            + self.end_to_end_cpu_seconds
    }

    /// CPU seconds of the busiest rank of a data-parallel group of
    /// `world` ranks: each rank loads the model and encodes every block
    /// (the encoders are deterministic, so no weights travel), and takes
    /// every `world`-th micro-batch of the passes and of each step.
    pub fn rank_cpu_seconds(&self, world: usize) -> f64 {
        let world = world.max(1);
        let share = |n: usize| n.div_ceil(world) as f64 / n.max(1) as f64;
        let data = share(self.micro_batches);
        let step = share(self.micro_batches_per_step);
        self.load_cpu_seconds
            + self.encode_cpu_seconds
            + (self.forward_cpu_seconds + self.distill_cpu_seconds - self.distill_steps_cpu_seconds)
                * data
            + self.distill_steps_cpu_seconds * step
            + (self.end_to_end_cpu_seconds - self.end_to_end_steps_cpu_seconds) * data
            + self.end_to_end_steps_cpu_seconds * share(self.end_to_end_micro_batches_per_step)
    }
}

/// The bytes a correction's parts and their manifest and header entries
/// add to a `[rows, cols]` weight named `name`.
fn correction_bytes(name: &str, c: &Correction, rows: usize, cols: usize) -> (u64, u64) {
    let parts = c.to_parts(rows, cols);
    let data: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let overhead: u64 = parts
        .iter()
        .map(|p| {
            let entry = PartEntry {
                name: format!("{name}.correction.{}", p.name),
                dtype: p.dtype.name().into(),
                shape: p.shape.clone(),
                bytes: p.len() as u64,
                header_bytes: 0,
            };
            let json = serde_json::to_string(&entry).map_or(0, |s| s.len());
            (json + entry.name.len() + 64) as u64
        })
        .sum();
    // The correction step's own record in the manifest.
    let step = serde_json::to_string(&c.spec()).map_or(0, |s| s.len()) as u64 + 32;
    (data, overhead + step)
}

/// Measures `spec`'s walk on this machine (see the module docs).
pub(crate) fn measure(spec: &JobSpec, model: &Model) -> Result<WalkCost, PipelineError> {
    let cal = calibration_of(spec, model)?;
    let plans = plans_of(spec, model);
    let started = process_cpu_seconds();
    let (mut net, tok) = load_net(spec, model, None)?;
    check_calibrated_tensors(&net, model, &plans)?;
    let mut alone = crate::calibrate::one_rank("setting up a one-rank measurement")?;
    let Layout {
        local: all, sites, ..
    } = layout(&net, &tok, model, cal, &mut alone, &[])?;
    check_site_rows(&net, model, cal, &sites)?;
    let load = process_cpu_seconds() - started;
    let sizes: Vec<BatchSize> = all.iter().map(BatchSize::of).collect();
    let micro_batches = all.len();
    let rows: usize = sizes.iter().map(|b| b.rows).sum();
    if micro_batches == 0 || rows == 0 {
        return Err(PipelineError::Estimate {
            why: format!(
                "job `{}`: the calibration data makes no micro-batch",
                spec.name
            ),
        });
    }
    // An evenly spread sample of about SAMPLE_ROWS rows.
    let per = rows as f64 / micro_batches as f64;
    let want = ((SAMPLE_ROWS as f64 / per).ceil() as usize).clamp(1, micro_batches);
    let picked: Vec<usize> = (0..want).map(|i| i * micro_batches / want).collect();
    let sample: Vec<Batch> = picked
        .iter()
        .map(|&i| Batch {
            x: all[i].x.clone(),
            windows: all[i].windows,
            len: all[i].len,
        })
        .collect();
    drop(all);
    let sample_sizes: Vec<BatchSize> = picked.iter().map(|&i| sizes[i]).collect();
    let sampled_rows: usize = sample_sizes.iter().map(|b| b.rows).sum();
    let scale = rows as f64 / sampled_rows.max(1) as f64;
    let blocks = net.layers();

    // Block 0's passes: once capturing its inputs' statistics, once not.
    let layer = 0;
    let mut stats: HashMap<Site, HessianSum> = HashMap::new();
    let t = process_cpu_seconds();
    for b in &sample {
        let mut capture = |site: Site, input: &Tensor| add_input(&mut stats, layer, site, input);
        net.run(layer, b, &mut capture)
            .map_err(|e| forward_error(model, e))?;
    }
    let capture = process_cpu_seconds() - t;
    let t = process_cpu_seconds();
    let mut targets = Vec::with_capacity(sample.len());
    for b in &sample {
        targets.push(
            net.run(layer, b, &mut |_, _| Ok(()))
                .map_err(|e| forward_error(model, e))?,
        );
    }
    let plain = process_cpu_seconds() - t;
    let sequential = cal.order == CalibrationOrder::Sequential;
    let plain_passes = usize::from(spec.distill.is_some() && sequential) + usize::from(sequential);

    // Each distinct calibrated chain encoded once, with the sample's
    // statistics of its input site.
    let hessians: HashMap<Site, Vec<f64>> = stats.iter().map(|(s, h)| (*s, h.to_f64())).collect();
    let mut measured: HashMap<String, f64> = HashMap::new();
    let mut tensor_cpu_seconds = HashMap::new();
    let mut decoded: Vec<(String, Vec<f32>, Vec<usize>)> = Vec::new();
    for (k, t) in model.tensors.iter().enumerate() {
        let Some((l, site)) = net.site_of(&t.name) else {
            continue;
        };
        let key = format!("{:?} {:?} {:?} {site:?}", plans[k], t.shape, t.dtype);
        if l != layer
            && let Some(&cpu) = measured.get(&key)
        {
            tensor_cpu_seconds.insert(t.name.clone(), cpu);
            continue;
        }
        let h = hessians.get(&site).map(Vec::as_slice);
        let before = process_cpu_seconds();
        let (_, values) = encode_raw_calibrated(
            &t.name,
            t.dtype,
            &t.shape,
            model.raw(t),
            &plans[k],
            spec.seed,
            h,
        )?;
        let cpu = process_cpu_seconds() - before;
        measured.entry(key).or_insert(cpu);
        tensor_cpu_seconds.insert(t.name.clone(), cpu);
        if l == layer
            && let Some(v) = values
        {
            decoded.push((t.name.clone(), v, t.shape.clone()));
        }
    }
    let encode: f64 = tensor_cpu_seconds.values().sum();
    // Staged weight tuning encodes every weight but the first site's twice:
    // as calibration alone would, and from its tuned values.
    let staged = spec
        .distill
        .as_ref()
        .is_some_and(|d| d.params.contains(&DistillParam::Weights));
    let staged_encode: f64 = if staged {
        tensor_cpu_seconds
            .iter()
            .filter(|(n, _)| net.site_of(n).is_some_and(|(_, s)| s != Site::ALL[0]))
            .map(|(_, c)| c)
            .sum()
    } else {
        0.0
    };

    // Distillation: block 0 tuned with no step, then with a few, over the
    // sample; the difference is the steps' cost.
    let (mut distill, mut distill_steps, mut per_step) = (0.0, 0.0, 1);
    // Staged weight tuning's extra capturing and plain passes a block.
    let mut staged_passes = (0usize, 0usize);
    let mut tensor_correction_bytes = HashMap::new();
    if let Some(d) = &spec.distill {
        let shapes: HashMap<String, (Vec<f32>, Vec<usize>)> =
            decoded.into_iter().map(|(n, v, s)| (n, (v, s))).collect();
        for (name, (v, _)) in &shapes {
            net.set_weight(name, v.clone())
                .map_err(|e| forward_error(model, e))?;
        }
        let global: Vec<usize> = (0..sample.len()).collect();
        let samples: Vec<usize> = sample_sizes.iter().map(|b| b.samples).collect();
        let elements: Vec<usize> = sample_sizes.iter().map(|b| b.elements).collect();
        let data = MicroBatches {
            local: &sample,
            global: &global,
            targets: &targets,
            samples: &samples,
            elements: &elements,
        };
        let mut tune =
            |steps: usize, added: &mut HashMap<String, (u64, u64)>| -> Result<f64, PipelineError> {
                // Every step takes every micro-batch of the sample.
                let d = Distill {
                    steps,
                    batch: usize::MAX,
                    ..d.clone()
                };
                let mut store = |name: &str, c: &Correction| -> Result<Vec<f32>, PipelineError> {
                    let (v, shape) = shapes.get(name).ok_or_else(|| PipelineError::Estimate {
                        why: format!("`{name}` has no calibrated encoding to correct"),
                    })?;
                    let (rows, cols) = (shape[0], shape.iter().skip(1).product());
                    let mut w = v.clone();
                    let stored = c.rounded();
                    stored
                        .apply(&mut w, rows, cols)
                        .map_err(|source| PipelineError::Tensor {
                            tensor: name.to_string(),
                            source,
                        })?;
                    added.insert(
                        name.to_string(),
                        correction_bytes(name, &stored, rows, cols),
                    );
                    Ok(w)
                };
                let before = process_cpu_seconds();
                distill_block(
                    &mut net,
                    layer,
                    &d,
                    spec.seed,
                    &[],
                    &data,
                    &|_: &str, v: Vec<f32>| v,
                    &mut store,
                    &mut alone,
                )?;
                Ok(process_cpu_seconds() - before)
            };
        let mut added = HashMap::new();
        // A first step allocates what every later one reuses: warm up
        // with one, untimed.
        tune(1, &mut added)?;
        let fixed = tune(0, &mut added)?;
        let stepped = tune(MEASURED_STEPS, &mut added)?;
        let step_per_row = (stepped - fixed).max(0.0) / (MEASURED_STEPS * sampled_rows) as f64;
        per_step = d
            .batch
            .div_ceil(sizes[0].samples.max(1))
            .clamp(1, micro_batches);
        let step_rows = per_step as f64 * per;
        distill_steps = blocks as f64 * d.steps as f64 * step_rows * step_per_row;
        distill = distill_steps + blocks as f64 * fixed * scale;
        if d.params.contains(&DistillParam::Weights) {
            // Each site but the last is followed by tuning the sites after
            // it in full precision: timed as the final tuning is.
            let members = net.linear_weights(layer);
            let site_of = |n: &String| net.site_of(n).map(|(_, s)| s);
            let phases: Vec<Vec<String>> = Site::ALL[1..]
                .iter()
                .map(|first| {
                    let from = Site::ALL.iter().position(|s| s == first).unwrap_or(0);
                    members
                        .iter()
                        .filter(|n| {
                            site_of(n).is_some_and(|s| {
                                Site::ALL.iter().position(|x| *x == s).unwrap_or(0) >= from
                            })
                        })
                        .cloned()
                        .collect()
                })
                .collect();
            for weights in &phases {
                let mut tune_weights = |steps: usize| -> Result<f64, PipelineError> {
                    let phase = Distill {
                        steps,
                        batch: usize::MAX,
                        params: Vec::new(),
                        ..d.clone()
                    };
                    let mut store = no_correction(layer);
                    let before = process_cpu_seconds();
                    distill_block(
                        &mut net,
                        layer,
                        &phase,
                        spec.seed,
                        weights,
                        &data,
                        &|_: &str, v: Vec<f32>| v,
                        &mut store,
                        &mut alone,
                    )?;
                    Ok(process_cpu_seconds() - before)
                };
                tune_weights(1)?;
                let fixed = tune_weights(0)?;
                let stepped = tune_weights(MEASURED_STEPS)?;
                let per_row = (stepped - fixed).max(0.0) / (MEASURED_STEPS * sampled_rows) as f64;
                let steps = blocks as f64 * d.steps as f64 * step_rows * per_row;
                distill_steps += steps;
                distill += steps + blocks as f64 * fixed * scale;
            }
            // Each site after the first is captured again once the sites
            // before it are encoded, and the block is run once more with
            // every weight as calibration alone encodes it (which is also
            // encoded once more, but for the first site).
            staged_passes = (Site::ALL.len() - 1, 1);
        }
        // Every block's weights take the corrections block 0's took.
        for t in &model.tensors {
            let Some((_, site)) = net.site_of(&t.name) else {
                continue;
            };
            let like = added.iter().find(|(n, _)| {
                net.site_of(n)
                    .is_some_and(|(l0, s0)| l0 == layer && s0 == site)
                    && shapes.get(n.as_str()).is_some_and(|(_, s)| *s == t.shape)
            });
            if let Some((_, &(data, overhead))) = like {
                tensor_correction_bytes.insert(t.name.clone(), (data, overhead));
            }
        }
    }
    // End-to-end tuning: one window's gradient and one window's KL
    // through the whole model, scaled to the steps' windows and to the
    // two measuring passes over every window.
    let (mut end_to_end, mut end_to_end_steps, mut end_to_end_per_step) = (0.0, 0.0, 1);
    if let (Some(e), crate::calibrate::Net::Decoder(llama)) = (
        spec.distill.as_ref().and_then(|d| d.end_to_end.as_ref()),
        &mut net,
    ) {
        let b = &sample[0];
        let x =
            b.x.narrow(0, 0, b.len)
                .map_err(|e| PipelineError::Estimate { why: e.to_string() })?;
        let (gradient, kl) = crate::end_to_end::measure_window(llama, &x)?;
        let per_batch = sizes[0].samples.max(1);
        end_to_end_per_step = e.batch.div_ceil(per_batch).clamp(1, micro_batches);
        let windows: usize = sizes.iter().map(|b| b.samples).sum();
        end_to_end_steps = (e.steps * end_to_end_per_step * per_batch) as f64 * gradient;
        end_to_end = end_to_end_steps + 2.0 * windows as f64 * kl;
    }
    Ok(WalkCost {
        end_to_end_cpu_seconds: end_to_end,
        end_to_end_steps_cpu_seconds: end_to_end_steps,
        end_to_end_micro_batches_per_step: end_to_end_per_step,
        blocks,
        micro_batches,
        rows,
        sampled_micro_batches: sample.len(),
        sampled_rows,
        load_cpu_seconds: load,
        forward_cpu_seconds: blocks as f64
            * (capture * (1 + staged_passes.0) as f64
                + plain * (plain_passes + staged_passes.1) as f64)
            * scale,
        plain_passes: plain_passes + staged_passes.1,
        encode_cpu_seconds: encode + staged_encode,
        distill_cpu_seconds: distill,
        distill_steps_cpu_seconds: distill_steps,
        micro_batches_per_step: per_step,
        correction_bytes: tensor_correction_bytes.values().map(|(a, b)| a + b).sum(),
        tensor_cpu_seconds,
        tensor_correction_bytes,
    })
}
