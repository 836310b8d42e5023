//! Calibrated runs: the job's `calibration:` text is run through the model,
//! and each block's linear weights are encoded with the statistics
//! H = Σ x xᵀ of their inputs (a `gptq` stage uses them; every calibrated
//! tensor also reports its output error on those inputs).
//!
//! The model is walked one block at a time. Windows go through the block in
//! fixed micro-batches of [`MICRO_BATCH`] windows; each micro-batch's XᵀX is
//! added into an exact fixed-point sum ([`HessianSum`]), so the statistics
//! do not depend on how the windows are split or in which order the parts
//! are added. Once a block's statistics are complete its tensors are
//! encoded. With `order: sequential` (the default) the block's weights are
//! then replaced by their decoded values and the block is run again, so the
//! next block is calibrated on the inputs the compressed model will really
//! give it; with `order: original` every block sees the original model's
//! activations.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use hcx_forward::llama::{Llama, LlamaConfig, Site};
use hcx_forward::text::{TextTokenizer, read_texts, token_windows};
use hcx_kernels::hessian::HessianSum;
use hcx_protocol::{CalibrationOrder, JobSpec, StageSpec};
use rayon::prelude::*;

use crate::PipelineError;
use crate::attribution::{Attribution, ReportSection};
use crate::model::Model;
use crate::run::{
    EncodedEntry, TENSOR_FILE, encode_raw_calibrated, finish_artifact, waves, write_entry,
};
use crate::writer::TensorFileWriter;

/// A tensor's encoding and, for a calibrated one, its decoded values.
type Encoded = Result<(EncodedEntry, Option<Vec<f32>>), PipelineError>;

/// Windows per micro-batch: the unit statistics are summed in.
pub const MICRO_BATCH: usize = 8;

fn bad(model: &Model, why: String) -> PipelineError {
    PipelineError::Model {
        path: model
            .dir
            .join(model.files.first().map(String::as_str).unwrap_or("")),
        why,
    }
}

fn forward_error(model: &Model, e: hcx_forward::ForwardError) -> PipelineError {
    bad(model, e.to_string())
}

/// A file of the model by name: generated (GGUF) or in its folder.
fn model_file(model: &Model, name: &str) -> Result<(Vec<u8>, PathBuf), PipelineError> {
    if let Some((_, data)) = model.generated.iter().find(|(n, _)| n == name) {
        return Ok((data.clone(), model.dir.join(name)));
    }
    let p = model.dir.join(name);
    let data = std::fs::read(&p).map_err(|e| PipelineError::io(&p, "cannot read", e))?;
    Ok((data, p))
}

/// Loads the source as a decoder with a forward pass.
fn load_decoder(model: &Model, max_positions: usize) -> Result<Llama, PipelineError> {
    let (cfg_bytes, cfg_path) = model_file(model, "config.json")?;
    let cfg = LlamaConfig::parse(&cfg_path, &String::from_utf8_lossy(&cfg_bytes))
        .map_err(|e| forward_error(model, e))?;
    let by_name: HashMap<&str, &crate::model::TensorInfo> =
        model.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut src = |name: &str| -> Result<hcx_forward::llama::Weight, hcx_forward::ForwardError> {
        Ok(by_name
            .get(name)
            .filter(|t| t.is_float())
            .map(|t| (model.read_f32(t), t.shape.clone())))
    };
    Llama::load(cfg, &mut src, max_positions).map_err(|e| forward_error(model, e))
}

/// The calibration windows' tokens (`samples` windows of `seq_len`).
fn calibration_tokens(spec: &JobSpec, model: &Model) -> Result<Vec<u32>, PipelineError> {
    let Some(cal) = &spec.calibration else {
        return Err(bad(model, "the job has no `calibration:` section".into()));
    };
    let files = match (&cal.text, &cal.sentences) {
        (Some(t), _) => t.as_slice().to_vec(),
        (None, Some(_)) => {
            return Err(bad(
                model,
                "this model is a decoder: calibrate it on `text:` (token windows), not `sentences:`"
                    .into(),
            ));
        }
        (None, None) => return Err(bad(model, "`calibration:` names no text".into())),
    };
    let (tok_bytes, tok_path) = model_file(model, "tokenizer.json")?;
    let tok =
        TextTokenizer::from_bytes(&tok_bytes, &tok_path).map_err(|e| forward_error(model, e))?;
    let text = read_texts(&files).map_err(|e| PipelineError::Model {
        path: files.first().cloned().unwrap_or_default(),
        why: e.to_string(),
    })?;
    let ids = tok.encode(&text).map_err(|e| forward_error(model, e))?;
    let first = files.first().cloned().unwrap_or_default();
    let windows = token_windows(&ids, cal.seq_len, cal.samples, &first).map_err(|e| {
        PipelineError::Model {
            path: first.clone(),
            why: e.to_string().replace(&format!("{}: ", first.display()), ""),
        }
    })?;
    let got = windows.len() / cal.seq_len;
    if got < cal.samples {
        return Err(PipelineError::Model {
            path: first,
            why: format!(
                "the calibration text makes {} tokens, {got} windows of {}; the job asks for {} (`calibration.samples`)",
                ids.len(),
                cal.seq_len,
                cal.samples
            ),
        });
    }
    Ok(windows)
}

/// Runs a calibrated job on a decoder; the calibrated counterpart of the
/// plain local build. Entries come out in model order.
pub(crate) fn build_calibrated(
    spec: &JobSpec,
    model: &Model,
    tmp: &Path,
    started: Instant,
) -> Result<Attribution, PipelineError> {
    let cal = spec
        .calibration
        .as_ref()
        .ok_or_else(|| bad(model, "the job has no `calibration:` section".into()))?;
    let plans: Vec<Vec<StageSpec>> = model
        .tensors
        .iter()
        .map(|t| spec.stages_for(&t.name))
        .collect();
    for (t, plan) in model.tensors.iter().zip(&plans) {
        if plan.iter().any(StageSpec::needs_calibration) && Site::of_weight(&t.name).is_none() {
            return Err(PipelineError::Tensor {
                tensor: t.name.clone(),
                source: hcx_kernels::KernelError::Meta {
                    stage: "gptq".into(),
                    why: "calibration statistics are collected for the blocks' linear weights only (q, k, v, o, gate, up, down); give this tensor another pipeline with a rule".into(),
                },
            });
        }
    }
    let seq = cal.seq_len;
    let tokens = calibration_tokens(spec, model)?;
    let windows = tokens.len() / seq;
    let mut llama = load_decoder(model, seq)?;
    let t_cal = Instant::now();
    let mut x = llama.embed(&tokens).map_err(|e| forward_error(model, e))?;
    let mut done: Vec<Option<EncodedEntry>> = (0..model.tensors.len()).map(|_| None).collect();
    let mut forward_seconds = 0f64;
    for layer in 0..llama.cfg.layers {
        let t0 = Instant::now();
        let mut stats: HashMap<Site, HessianSum> = HashMap::new();
        let mut outputs = Vec::new();
        for start in (0..windows).step_by(MICRO_BATCH) {
            let n = MICRO_BATCH.min(windows - start);
            let xb = x
                .narrow(0, start * seq, n * seq)
                .map_err(|e| forward_error(model, e.into()))?;
            let mut capture =
                |site: Site, input: &Tensor| -> Result<(), hcx_forward::ForwardError> {
                    let (rows, dim) = input.dims2()?;
                    let values = input.flatten_all()?.to_vec1::<f32>()?;
                    let h = stats.entry(site).or_insert_with(|| HessianSum::new(dim));
                    h.add_batch(&values, rows)
                        .map_err(|e| hcx_forward::ForwardError::Weight {
                            name: format!("model.layers.{layer}"),
                            why: e.to_string(),
                        })
                };
            let y = llama
                .layer(layer, &xb, n, seq, &mut capture)
                .map_err(|e| forward_error(model, e))?;
            outputs.push(y);
        }
        forward_seconds += t0.elapsed().as_secs_f64();
        // Encode this block's tensors with their inputs' statistics.
        let prefix = format!("model.layers.{layer}.");
        let members: Vec<usize> = model
            .tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| t.name.starts_with(&prefix))
            .map(|(i, _)| i)
            .collect();
        let hessians: HashMap<Site, Vec<f64>> =
            stats.iter().map(|(s, h)| (*s, h.to_f64())).collect();
        let encoded: Vec<(usize, Encoded)> = members
            .par_iter()
            .map(|&k| {
                let t = &model.tensors[k];
                let h = Site::of_weight(&t.name).and_then(|(_, s)| hessians.get(&s));
                (
                    k,
                    encode_raw_calibrated(
                        &t.name,
                        t.dtype,
                        &t.shape,
                        model.raw(t),
                        &plans[k],
                        spec.seed,
                        h.map(Vec::as_slice),
                    ),
                )
            })
            .collect();
        let mut decoded = Vec::new();
        for (k, r) in encoded {
            let (entry, values) = r?;
            if let Some(v) = values
                && Site::of_weight(&model.tensors[k].name).is_some()
            {
                decoded.push((k, v));
            }
            done[k] = Some(entry);
        }
        if cal.order == CalibrationOrder::Sequential {
            let t1 = Instant::now();
            for (k, v) in decoded {
                llama
                    .set_weight(&model.tensors[k].name, v)
                    .map_err(|e| forward_error(model, e))?;
            }
            outputs.clear();
            for start in (0..windows).step_by(MICRO_BATCH) {
                let n = MICRO_BATCH.min(windows - start);
                let xb = x
                    .narrow(0, start * seq, n * seq)
                    .map_err(|e| forward_error(model, e.into()))?;
                let y = llama
                    .layer(layer, &xb, n, seq, &mut |_, _| Ok(()))
                    .map_err(|e| forward_error(model, e))?;
                outputs.push(y);
            }
            forward_seconds += t1.elapsed().as_secs_f64();
        }
        x = Tensor::cat(&outputs, 0).map_err(|e| forward_error(model, e.into()))?;
        tracing::info!(
            layer,
            seconds = t0.elapsed().as_secs_f64(),
            "calibrated block"
        );
    }
    let calibration_seconds = t_cal.elapsed().as_secs_f64();
    drop(x);
    drop(llama);
    // Everything outside the blocks, in bounded waves, without statistics.
    let rest: Vec<usize> = (0..model.tensors.len())
        .filter(|k| done[*k].is_none())
        .collect();
    let sizes: Vec<usize> = rest.iter().map(|k| model.tensors[*k].numel()).collect();
    for range in waves(&sizes) {
        let wave: Vec<(usize, Encoded)> = rest[range]
            .par_iter()
            .map(|&k| {
                let t = &model.tensors[k];
                (
                    k,
                    encode_raw_calibrated(
                        &t.name,
                        t.dtype,
                        &t.shape,
                        model.raw(t),
                        &plans[k],
                        spec.seed,
                        None,
                    ),
                )
            })
            .collect();
        for (k, r) in wave {
            done[k] = Some(r?.0);
        }
    }
    let mut writer = TensorFileWriter::create(&tmp.join(TENSOR_FILE))?;
    let mut entries = Vec::with_capacity(done.len());
    let mut seconds = Vec::with_capacity(done.len());
    for (k, e) in done.into_iter().enumerate() {
        let e = e.ok_or_else(|| {
            bad(
                model,
                format!("tensor `{}` was not encoded", model.tensors[k].name),
            )
        })?;
        write_entry(&mut writer, &e)?;
        entries.push(e.entry);
        seconds.push(e.seconds);
    }
    let section = ReportSection {
        key: "calibration".into(),
        markdown: format!(
            "## Calibration\n\n{windows} windows of {seq} tokens, `order: {}`; forward passes and statistics {forward_seconds:.1} s, calibration with encoding {calibration_seconds:.1} s.\n",
            match cal.order {
                CalibrationOrder::Sequential => "sequential",
                CalibrationOrder::Original => "original",
            }
        ),
        json: serde_json::json!({
            "windows": windows,
            "seq_len": seq,
            "order": cal.order,
            "forward_seconds": forward_seconds,
            "seconds": calibration_seconds,
        }),
    };
    finish_artifact(
        spec,
        model,
        tmp,
        writer,
        entries,
        &seconds,
        started,
        &[section],
    )
}
