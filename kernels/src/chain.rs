//! Runs a tensor's stage chain: encode with per-stage accounting, decode in
//! reverse.
//!
//! A chain lists transforms, then decompositions, then one quantizer, then
//! entropy coders (`hcx_protocol::job::validate_chain` checks the order).
//! While encoding, the chain keeps the parts written so far and the signal
//! still to encode. After each stage it records the representation's size
//! (parts plus the remaining signal at the source's bytes per element) and
//! the squared error the stage added. Transforms are orthonormal and
//! decompositions additive, so an error added anywhere is the same error in
//! the original domain; the quantizer's share is fixed up after a full
//! decode so the shares add up to the true final error exactly.
//!
//! With calibration statistics (the Hessian H of the layer's inputs, see
//! [`crate::hessian`]), H follows the signal: a Hadamard stage rotates it
//! with the weights, a low-rank residual keeps it, and a `gptq` stage
//! quantizes with it. A sparse stage passes on each row's kept values
//! compacted, whose columns are no longer the layer's inputs, so a `gptq`
//! stage cannot follow one. The output SQNR on the calibration inputs,
//! 10·log10(tr(W H Wᵀ)/tr(E H Eᵀ)), is then measured on the fully decoded
//! tensor in the original domain, whatever the chain.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Instant;

use hcx_protocol::manifest::StepRecord;
use hcx_protocol::stage::{StageCategory, StageSpec};
use serde_json::json;

use crate::correction::Correction;
use crate::part::Coded;
use crate::rng::seed_for;
use crate::stats::{energy, sqnr_from, squared_error};
use crate::{KernelError, Part, Parts, Signal};
use crate::{
    cast, entropy, gptq, hadamard, hessian, lowrank, nonuniform, rtn, seedlm, sparse, ternary,
    uniform, vq,
};

/// An encoded tensor: what each stage did and the parts to store.
#[derive(Debug, Clone)]
pub struct EncodedTensor {
    /// One record per stage, in encode order.
    pub steps: Vec<StepRecord>,
    /// Parts named `<stage>.<part>` (the caller prefixes the tensor name).
    pub parts: Vec<Part>,
    /// SQNR of the decoded tensor against the input, dB (`None` when exact).
    pub sqnr_db: Option<f64>,
    /// Wall time of each stage, seconds.
    pub seconds: Vec<f64>,
    /// SQNR of the decoded tensor's outputs on the calibration inputs, dB:
    /// 10·log10(tr(W H Wᵀ)/tr(E H Eᵀ)) with E = W − Ŵ in the original domain
    /// (`None` without a Hessian, or when the outputs are exact).
    pub output_sqnr_db: Option<f64>,
    /// The decoded tensor: what the compressed model holds.
    pub decoded: Vec<f32>,
}

fn quantize(stage: &StageSpec, x: &Signal, seed: u64) -> Result<Coded, KernelError> {
    match stage {
        StageSpec::Cast(s) => cast::encode(s, x),
        StageSpec::Rtn(s) => rtn::encode(s, x),
        StageSpec::Uniform(s) => uniform::encode(s, x),
        StageSpec::Nonuniform(s) => nonuniform::encode(s, x),
        StageSpec::Ternary(s) => ternary::encode(s, x),
        StageSpec::Seedlm(s) => seedlm::encode(s, x, seed),
        StageSpec::Vq(s) => vq::encode(s, x, seed),
        other => Err(KernelError::Meta {
            stage: other.kind().into(),
            why: "not a quantizer".into(),
        }),
    }
}

fn dequantize(
    stage: &StageSpec,
    meta: &serde_json::Value,
    parts: &Parts,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, KernelError> {
    match stage {
        StageSpec::Cast(_) => cast::decode(meta, parts, rows, cols),
        StageSpec::Rtn(_) => rtn::decode(meta, parts, rows, cols),
        StageSpec::Uniform(_) => uniform::decode(meta, parts, rows, cols),
        StageSpec::Nonuniform(_) => nonuniform::decode(meta, parts, rows, cols),
        StageSpec::Ternary(_) => ternary::decode(meta, parts, rows, cols),
        StageSpec::Seedlm(_) => seedlm::decode(meta, parts, rows, cols),
        StageSpec::Vq(_) => vq::decode(meta, parts, rows, cols),
        StageSpec::Gptq(_) => gptq::decode(meta, parts, rows, cols),
        other => Err(KernelError::Meta {
            stage: other.kind().into(),
            why: "not a quantizer".into(),
        }),
    }
}

fn prefixed(kind: &str, parts: Vec<Part>) -> impl Iterator<Item = Part> + '_ {
    parts.into_iter().map(move |mut p| {
        p.name = format!("{kind}.{}", p.name);
        p
    })
}

fn bytes_of(parts: &[Part]) -> u64 {
    parts.iter().map(|p| p.len() as u64).sum()
}

/// Encodes one tensor through `stages`. `name` and `job_seed` seed every
/// random choice; `elem_bytes` is the source dtype's width, used for the
/// size accounting of the signal not yet encoded. A chain with a stage that
/// needs calibration data (`gptq`) is refused: use
/// [`encode_tensor_calibrated`].
pub fn encode_tensor(
    name: &str,
    values: Vec<f32>,
    shape: &[usize],
    stages: &[StageSpec],
    job_seed: u64,
    elem_bytes: usize,
) -> Result<EncodedTensor, KernelError> {
    encode_tensor_calibrated(name, values, shape, stages, job_seed, elem_bytes, None)
}

/// [`encode_tensor`] with the Hessian of the layer's calibration inputs,
/// `hessian` row-major `cols × cols` for a tensor whose rows have `cols`
/// values (see [`crate::hessian::HessianSum::to_f64`]). It feeds a `gptq`
/// stage and gives [`EncodedTensor::output_sqnr_db`].
pub fn encode_tensor_calibrated(
    name: &str,
    values: Vec<f32>,
    shape: &[usize],
    stages: &[StageSpec],
    job_seed: u64,
    elem_bytes: usize,
    hessian: Option<&[f64]>,
) -> Result<EncodedTensor, KernelError> {
    encode_tensor_with(
        name, values, shape, stages, job_seed, elem_bytes, hessian, None,
    )
}

/// [`encode_tensor_calibrated`], the quantizer coding with `fit` (the
/// parameters fitted on the whole tensor this is a piece of, see
/// [`crate::row_pieces`]) instead of fitting its own.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_tensor_with(
    name: &str,
    values: Vec<f32>,
    shape: &[usize],
    stages: &[StageSpec],
    job_seed: u64,
    elem_bytes: usize,
    hessian: Option<&[f64]>,
    fit: Option<&crate::row_pieces::Fitted>,
) -> Result<EncodedTensor, KernelError> {
    let original = values.clone();
    let total = energy(&original);
    let mut sig = Some(Signal::from_shape(values, shape));
    let (rows0, cols0) = sig.as_ref().map(|s| (s.rows, s.cols)).unwrap_or((0, 0));
    match hessian {
        None => {
            if let Some(s) = stages.iter().find(|s| s.needs_calibration()) {
                return Err(KernelError::NeedsCalibration(s.kind().into()));
            }
        }
        Some(h) => {
            let sparse = stages
                .iter()
                .position(|s| matches!(s, StageSpec::Sparse(_)));
            let calibrated = stages.iter().rposition(|s| s.needs_calibration());
            if let (Some(sp), Some(c)) = (sparse, calibrated)
                && sp < c
            {
                return Err(KernelError::Values(format!(
                    "stage `{}` cannot follow a `sparse` stage: the kept values are compacted per row, so their columns are no longer the layer's inputs",
                    stages[c].kind()
                )));
            }
            if cols0.checked_mul(cols0) != Some(h.len()) {
                return Err(KernelError::shape(
                    rows0,
                    cols0,
                    format!(
                        "the calibration Hessian has {} values, not {cols0} × {cols0} for rows of {cols0}",
                        h.len()
                    ),
                ));
            }
        }
    }
    // The Hessian in the current signal's domain (copied when rotated).
    let mut h_cur: Option<Cow<'_, [f64]>> = hessian.map(Cow::Borrowed);
    // tr(W H Wᵀ) of the original tensor: the output energy.
    let output_energy = hessian.map(|h| hessian::quadratic_trace(&original, rows0, cols0, h));
    let mut parts: Vec<Part> = Vec::new();
    let mut steps = Vec::with_capacity(stages.len());
    let mut seconds = Vec::with_capacity(stages.len());
    let mut cum_err = 0.0f64;
    let size = |parts: &[Part], sig: &Option<Signal>| {
        bytes_of(parts) + sig.as_ref().map_or(0, |s| (s.len() * elem_bytes) as u64)
    };
    for stage in stages {
        let _span = tracing::debug_span!("stage", kind = stage.kind()).entered();
        let t0 = Instant::now();
        let bytes_in = size(&parts, &sig);
        let (rows, cols) = sig.as_ref().map(|s| (s.rows, s.cols)).unwrap_or((0, 0));
        let kind = stage.kind();
        let seed = seed_for(job_seed, name, kind);
        let mut err = 0.0f64;
        let mut output_error: Option<f64> = None;
        let no_signal = || KernelError::Meta {
            stage: kind.into(),
            why: "no signal left to encode (a quantizer or a dropping low-rank stage came before)"
                .into(),
        };
        let codec = match stage {
            StageSpec::Hadamard(h) => {
                let s = sig.as_mut().ok_or_else(no_signal)?;
                let m = hadamard::forward(s, h.block, seed)?;
                if let Some(hc) = h_cur.as_mut() {
                    hessian::rotate_hessian(hc.to_mut(), s.cols, &m)?;
                }
                crate::part::to_meta(&m)
            }
            StageSpec::Lowrank(l) => {
                let s = sig.take().ok_or_else(no_signal)?;
                let split = lowrank::encode(l, &s, seed)?;
                parts.extend(prefixed(kind, split.parts));
                sig = split.rest;
                err = split.dropped_energy;
                split.meta
            }
            StageSpec::Sparse(sp) => {
                let s = sig.take().ok_or_else(no_signal)?;
                // The kept values' columns are not the layer's inputs.
                h_cur = None;
                let split = sparse::encode(sp, &s, seed)?;
                parts.extend(prefixed(kind, split.parts));
                sig = split.rest;
                err = split.dropped_energy;
                split.meta
            }
            StageSpec::Zstd(z) => entropy::encode(z.level, &mut parts)?,
            StageSpec::Rans(_) => entropy::encode_rans(&mut parts)?,
            StageSpec::Gptq(g) => {
                let s = sig.take().ok_or_else(no_signal)?;
                let h = h_cur
                    .as_deref()
                    .ok_or_else(|| KernelError::NeedsCalibration(kind.into()))?;
                let out = gptq::encode(g, &s, h)?;
                let local = Parts::new(out.coded.parts);
                let back = gptq::decode(&out.coded.meta, &local, s.rows, s.cols)?;
                err = squared_error(&s.data, &back);
                let reference = output_energy.unwrap_or(out.reference);
                output_error = Some(if reference > 0.0 {
                    out.output_error / reference
                } else {
                    0.0
                });
                parts.extend(prefixed(kind, local.into_vec()));
                out.coded.meta
            }
            q => {
                // The quantizer's error is not measured here: the full
                // decode after the chain measures the final error, and the
                // quantizer's share is set from it (the one quantizer of a
                // chain takes what the other stages did not add). Decoding
                // here too would cost a second decode and a second copy of
                // the tensor.
                let s = sig.take().ok_or_else(no_signal)?;
                use crate::row_pieces::Fitted;
                let coded = match (q, fit) {
                    (StageSpec::Uniform(u), Some(Fitted::Uniform(m))) => {
                        uniform::encode_fitted(m, u, &s)?
                    }
                    (StageSpec::Ternary(_), Some(Fitted::Ternary { gamma })) => {
                        crate::ternary::encode_fitted(*gamma, &s)?
                    }
                    (StageSpec::Nonuniform(n), Some(Fitted::Levels(levels))) => {
                        let f = nonuniform::fit_with(n, &s, Some(levels))?;
                        nonuniform::coded(n, &f)
                    }
                    (StageSpec::Vq(v), Some(Fitted::Vq(f))) => vq::encode_fitted(f, v, &s)?,
                    (StageSpec::Seedlm(sl), Some(Fitted::SeedlmTop(top))) => {
                        seedlm::encode_fitted(sl, &s, *top)?
                    }
                    (_, None) => quantize(q, &s, seed)?,
                    (q, Some(_)) => {
                        return Err(KernelError::Meta {
                            stage: q.kind().into(),
                            why: format!(
                                "`{name}`: parameters fitted for another quantizer than `{}`",
                                q.kind()
                            ),
                        });
                    }
                };
                drop(s);
                parts.extend(prefixed(kind, coded.parts));
                coded.meta
            }
        };
        cum_err += err;
        let mut meta = json!({ "rows": rows, "cols": cols, "codec": codec });
        if let Some(e) = output_error {
            // tr(E H Eᵀ) where the stage ran (rotations are orthonormal, so
            // the same in the original domain), over the original tensor's
            // tr(W H Wᵀ), as `error_added` is over its energy.
            meta["output_error"] = json!(e);
        }
        steps.push(StepRecord {
            spec: stage.clone(),
            meta,
            bytes_in,
            bytes_out: size(&parts, &sig),
            error_added: if total > 0.0 { err / total } else { 0.0 },
            sqnr_db: sqnr_from(total, cum_err),
        });
        seconds.push(t0.elapsed().as_secs_f64());
    }
    if sig.is_some() {
        return Err(KernelError::Meta {
            stage: "chain".into(),
            why: format!("the chain for a [{rows0}, {cols0}] tensor ends with no quantizer"),
        });
    }
    // Verify by a full decode and make the per-stage errors add up exactly.
    let decoded = decode_tensor(&steps, parts.clone(), shape)?;
    let final_err = squared_error(&original, &decoded);
    let sqnr = sqnr_from(total, final_err);
    settle_quantizer_share(&mut steps, total, final_err);
    let output_sqnr_db = match (hessian, output_energy) {
        (Some(h), Some(reference)) => {
            let error = hessian::error_trace(&original, &decoded, rows0, cols0, h);
            sqnr_from(reference, error)
        }
        _ => None,
    };
    Ok(EncodedTensor {
        steps,
        parts,
        sqnr_db: sqnr,
        seconds,
        output_sqnr_db,
        decoded,
    })
}

/// Sets the chain's quantizer step's share of the error from the final
/// error measured by a full decode (what the other stages did not add),
/// and the SQNR of it and every step after it to the final SQNR, so the
/// shares add up to the true final error exactly. `total` is the tensor's
/// energy.
pub(crate) fn settle_quantizer_share(steps: &mut [StepRecord], total: f64, final_error: f64) {
    let Some(qi) = steps
        .iter()
        .position(|s| s.spec.category() == StageCategory::Quantizer)
    else {
        return;
    };
    let others: f64 = steps
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != qi)
        .map(|(_, s)| s.error_added)
        .sum();
    steps[qi].error_added = if total > 0.0 {
        (final_error / total - others).max(0.0)
    } else {
        0.0
    };
    let sqnr = sqnr_from(total, final_error);
    for s in steps.iter_mut().skip(qi) {
        s.sqnr_db = sqnr;
    }
}

/// Measures `e`, encoded from other values than `original` (a weight that
/// distillation tuned before it was encoded), against `original`: its
/// SQNRs become the original's, and the quantizer's share of the error
/// takes the whole difference, so the shares still add up to the error
/// the artifact has against the source.
pub fn measure_against(
    e: &mut EncodedTensor,
    original: &[f32],
    shape: &[usize],
    hessian: Option<&[f64]>,
) {
    let total = energy(original);
    let error = squared_error(original, &e.decoded);
    settle_quantizer_share(&mut e.steps, total, error);
    e.sqnr_db = sqnr_from(total, error);
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let rows = original.len() / cols;
    e.output_sqnr_db = hessian.and_then(|h| {
        sqnr_from(
            hessian::quadratic_trace(original, rows, cols, h),
            hessian::error_trace(original, &e.decoded, rows, cols, h),
        )
    });
}

/// A tensor after [`add_correction`].
#[derive(Debug, Clone)]
pub struct CorrectedTensor {
    /// The correction's parts, named `correction.<part>`.
    pub parts: Vec<Part>,
    /// The decoded tensor with the correction applied.
    pub decoded: Vec<f32>,
    /// SQNR of `decoded` against the original, dB.
    pub sqnr_db: Option<f64>,
    /// Output SQNR of `decoded` on the calibration inputs, dB (with a Hessian).
    pub output_sqnr_db: Option<f64>,
}

/// Appends distillation's `correction` (rounded to what its f16 parts
/// store) to an encoded tensor's `steps`: `original` is the tensor as the
/// chain read it, `decoded` what the chain decodes to, `hessian` (as for
/// [`encode_tensor_calibrated`]) gives the output SQNR. The step records
/// the bytes the correction adds and the change in squared error it makes
/// (negative when it lowers the weight error).
pub fn add_correction(
    steps: &mut Vec<StepRecord>,
    original: &[f32],
    decoded: &[f32],
    shape: &[usize],
    correction: &Correction,
    hessian: Option<&[f64]>,
) -> Result<CorrectedTensor, KernelError> {
    let sig = Signal::from_shape(Vec::new(), shape);
    let (rows, cols) = (original.len() / sig.cols.max(1), sig.cols);
    if original.len() != decoded.len() || rows * cols != original.len() {
        return Err(KernelError::shape(
            rows,
            cols,
            format!(
                "{} original and {} decoded values",
                original.len(),
                decoded.len()
            ),
        ));
    }
    let correction = correction.rounded();
    let mut out = decoded.to_vec();
    correction.apply(&mut out, rows, cols)?;
    let parts: Vec<Part> = prefixed("correction", correction.to_parts(rows, cols)).collect();
    let total = energy(original);
    let before = squared_error(original, decoded);
    let after = squared_error(original, &out);
    let bytes_in = steps.last().map_or(0, |s| s.bytes_out);
    steps.push(StepRecord {
        spec: StageSpec::Correction(correction.spec()),
        meta: json!({ "rows": rows, "cols": cols, "codec": {} }),
        bytes_in,
        bytes_out: bytes_in + bytes_of(&parts),
        error_added: if total > 0.0 {
            (after - before) / total
        } else {
            0.0
        },
        sqnr_db: sqnr_from(total, after),
    });
    let output_sqnr_db = hessian.and_then(|h| {
        let reference = hessian::quadratic_trace(original, rows, cols, h);
        sqnr_from(
            reference,
            hessian::error_trace(original, &out, rows, cols, h),
        )
    });
    Ok(CorrectedTensor {
        parts,
        sqnr_db: sqnr_from(total, after),
        output_sqnr_db,
        decoded: out,
    })
}

fn dims(step: &StepRecord) -> Result<(usize, usize, &serde_json::Value), KernelError> {
    let bad = || KernelError::Meta {
        stage: step.spec.kind().into(),
        why: "missing rows/cols/codec".into(),
    };
    let rows = step
        .meta
        .get("rows")
        .and_then(|v| v.as_u64())
        .ok_or_else(bad)? as usize;
    let cols = step
        .meta
        .get("cols")
        .and_then(|v| v.as_u64())
        .ok_or_else(bad)? as usize;
    let codec = step.meta.get("codec").ok_or_else(bad)?;
    Ok((rows, cols, codec))
}

/// The most bytes a tensor's parts may hold before entropy decoding, per
/// value of the tensor, plus a fixed allowance for tiny tensors. Every codec
/// stores far less (the widest, low-rank factors plus a sparse split plus a
/// quantizer's codes, stay under 8 bytes a value); the bound only keeps a
/// corrupt manifest from making the decoder allocate without limit.
pub const MAX_PART_BYTES_PER_VALUE: u64 = 16;

/// Checks the sizes a manifest declares before anything is allocated from
/// them: no stage saw more values than `shape` holds, and
/// the entropy stage's raw lengths stay within [`MAX_PART_BYTES_PER_VALUE`].
pub(crate) fn check_declared_sizes(
    steps: &[StepRecord],
    shape: &[usize],
) -> Result<usize, KernelError> {
    let numel = shape
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(*d))
        .ok_or_else(|| KernelError::Meta {
            stage: "chain".into(),
            why: format!("shape {shape:?} overflows"),
        })?;
    for step in steps {
        let (rows, cols, codec) = dims(step)?;
        let kind = step.spec.kind();
        if let StageSpec::Zstd(_) | StageSpec::Rans(_) = step.spec {
            let raw = entropy::declared_raw_bytes(kind, codec)?;
            let limit = MAX_PART_BYTES_PER_VALUE * numel as u64 + (64 << 10);
            if raw > limit {
                return Err(KernelError::Meta {
                    stage: kind.into(),
                    why: format!(
                        "parts declare {raw} bytes before coding, more than {limit} for shape {shape:?}"
                    ),
                });
            }
        } else if let StageSpec::Correction(_) = step.spec {
            if rows.checked_mul(cols) != Some(numel) {
                return Err(KernelError::Meta {
                    stage: kind.into(),
                    why: format!("{rows} × {cols} values, not the {numel} of shape {shape:?}"),
                });
            }
        } else if rows.checked_mul(cols).is_none_or(|n| n > numel) {
            // A stage sees the whole tensor or, after a split, part of it.
            return Err(KernelError::Meta {
                stage: kind.into(),
                why: format!("{rows} × {cols} values, more than shape {shape:?} holds"),
            });
        }
    }
    Ok(numel)
}

/// Splits a tensor's steps into its chain and the corrections distillation
/// added after it (which must all come last).
fn split_corrections(steps: &[StepRecord]) -> Result<(&[StepRecord], &[StepRecord]), KernelError> {
    let at = steps
        .iter()
        .position(|s| matches!(s.spec, StageSpec::Correction(_)))
        .unwrap_or(steps.len());
    let (chain, tail) = steps.split_at(at);
    if let Some(s) = tail
        .iter()
        .find(|s| !matches!(s.spec, StageSpec::Correction(_)))
    {
        return Err(KernelError::Meta {
            stage: s.spec.kind().into(),
            why: "follows a `correction` step, which must come after the whole chain".into(),
        });
    }
    Ok((chain, tail))
}

/// Decodes a tensor from its stage records and parts (named `<stage>.<part>`).
pub fn decode_tensor(
    steps: &[StepRecord],
    mut parts: Vec<Part>,
    shape: &[usize],
) -> Result<Vec<f32>, KernelError> {
    let expect = check_declared_sizes(steps, shape)?;
    let (steps, corrections) = split_corrections(steps)?;
    for step in steps.iter().rev() {
        match step.spec {
            StageSpec::Zstd(_) => entropy::decode(dims(step)?.2, &mut parts)?,
            StageSpec::Rans(_) => entropy::decode_rans(dims(step)?.2, &mut parts)?,
            _ => {}
        }
    }
    let mut by_stage: HashMap<String, Vec<Part>> = HashMap::new();
    for mut p in parts {
        let Some((kind, rest)) = p.name.split_once('.') else {
            return Err(KernelError::corrupt(
                &p.name,
                "part name has no stage prefix",
            ));
        };
        let kind = kind.to_string();
        p.name = rest.to_string();
        by_stage.entry(kind).or_default().push(p);
    }
    let mut take = |kind: &str| Parts::new(by_stage.remove(kind).unwrap_or_default());
    let mut cur: Option<Vec<f32>> = None;
    for step in steps.iter().rev() {
        let (rows, cols, codec) = dims(step)?;
        let kind = step.spec.kind();
        match &step.spec {
            StageSpec::Zstd(_) | StageSpec::Rans(_) => {}
            StageSpec::Hadamard(_) => {
                let v = cur.as_mut().ok_or_else(|| KernelError::Meta {
                    stage: kind.into(),
                    why: "nothing to rotate back".into(),
                })?;
                let m: hadamard::HadamardMeta = crate::part::parse_meta(kind, codec)?;
                hadamard::inverse(v, rows, cols, &m)?;
            }
            StageSpec::Lowrank(_) => {
                cur = Some(lowrank::decode(codec, &take(kind), cur.take(), rows, cols)?)
            }
            StageSpec::Sparse(_) => {
                cur = Some(sparse::decode(codec, &take(kind), cur.take(), rows, cols)?)
            }
            q => cur = Some(dequantize(q, codec, &take(kind), rows, cols)?),
        }
    }
    for step in corrections {
        let (rows, cols, _) = dims(step)?;
        let (StageSpec::Correction(spec), Some(v)) = (&step.spec, cur.as_mut()) else {
            return Err(KernelError::Meta {
                stage: "correction".into(),
                why: "nothing to correct".into(),
            });
        };
        Correction::from_parts(spec, &take("correction"), rows, cols)?.apply(v, rows, cols)?;
    }
    match cur {
        Some(v) if v.len() == expect => Ok(v),
        Some(v) => Err(KernelError::Meta {
            stage: "chain".into(),
            why: format!("decoded {} values for shape {shape:?}", v.len()),
        }),
        None => Err(KernelError::Meta {
            stage: "chain".into(),
            why: "the chain has no stage that produces values".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::gaussian_vec;
    use hcx_protocol::stage::*;

    /// The 4-bit examples' chain: Hadamard, uniform at 4 bits, zstd.
    fn rotate_uniform4_zstd() -> Vec<StageSpec> {
        vec![
            StageSpec::Hadamard(HadamardSpec::default()),
            StageSpec::Uniform(UniformSpec {
                bits: 4.0,
                deadzone: 0.0,
            }),
            StageSpec::Zstd(ZstdSpec::default()),
        ]
    }

    #[test]
    fn hadamard_uniform_zstd_round_trip_and_accounting() {
        let x = gaussian_vec(1, 64 * 384);
        let stages = rotate_uniform4_zstd();
        let e = encode_tensor("w", x.clone(), &[64, 384], &stages, 7, 4).unwrap();
        assert_eq!(e.steps.len(), 3);
        assert_eq!(e.steps[0].bytes_in, 64 * 384 * 4);
        assert_eq!(e.steps[0].bytes_out, 64 * 384 * 4);
        assert_eq!(e.steps[1].bytes_out, 64 * 384);
        let stored: u64 = e.parts.iter().map(|p| p.len() as u64).sum();
        assert_eq!(e.steps[2].bytes_out, stored);
        assert!(stored * 8 < (64 * 384 * 41 / 10) as u64, "{stored}");
        let s = e.sqnr_db.unwrap();
        assert!(s > 22.0, "{s}");
        let y = decode_tensor(&e.steps, e.parts.clone(), &[64, 384]).unwrap();
        assert_eq!(crate::stats::sqnr_db(&x, &y), e.sqnr_db);
        // Same input, same bytes.
        let again = encode_tensor("w", x, &[64, 384], &stages, 7, 4).unwrap();
        assert_eq!(again.parts, e.parts);
    }

    /// A Hessian of correlated inputs: a shared component plus noise.
    fn calibration(seed: u64, cols: usize, n: usize) -> Vec<f64> {
        let z = gaussian_vec(seed, n * cols);
        let common = gaussian_vec(seed + 1, n);
        let x: Vec<f32> = (0..n * cols)
            .map(|i| z[i] + 3.0 * common[i / cols] * ((i % cols) as f32 / cols as f32 - 0.3))
            .collect();
        let mut h = crate::hessian::HessianSum::new(cols);
        h.add_batch(&x, n).unwrap();
        h.to_f64()
    }

    #[test]
    fn hadamard_gptq_uniform_zstd_round_trip() {
        let (rows, cols) = (48, 256);
        let x = gaussian_vec(11, rows * cols);
        let h = calibration(12, cols, 1024);
        let gptq = vec![
            StageSpec::Hadamard(HadamardSpec::default()),
            StageSpec::Gptq(GptqSpec {
                grid: GptqGrid::Uniform(UniformSpec {
                    bits: 4.0,
                    deadzone: 0.0,
                }),
                damp: 0.01,
                block: 64,
                act_order: true,
            }),
            StageSpec::Zstd(ZstdSpec::default()),
        ];
        let shape = [rows, cols];
        let e = encode_tensor_calibrated("w", x.clone(), &shape, &gptq, 7, 4, Some(&h)).unwrap();
        let y = decode_tensor(&e.steps, e.parts.clone(), &shape).unwrap();
        assert_eq!(crate::stats::sqnr_db(&x, &y), e.sqnr_db);
        let rel = e.steps[1].meta["output_error"].as_f64().unwrap();
        let out = e.output_sqnr_db.unwrap();
        // The step's relative output error, measured in the rotated domain,
        // is the final one in the original domain.
        assert!(
            (-10.0 * rel.log10() - out).abs() < 1e-3,
            "{rel} vs {out} dB"
        );
        let codec = &e.steps[1].meta["codec"];
        assert_eq!(codec["grid"], "uniform");
        let bits = codec["codec"]["entropy_bits"].as_f64().unwrap();
        assert!((bits - 4.0).abs() < 0.05, "{bits}");
        // The same chain with plain uniform, compared on the same inputs.
        let plain = encode_tensor_calibrated(
            "w",
            x.clone(),
            &shape,
            &rotate_uniform4_zstd(),
            7,
            4,
            Some(&h),
        )
        .unwrap();
        let base = plain.output_sqnr_db.unwrap();
        println!("output SQNR: uniform {base:.2} dB, gptq(uniform) {out:.2} dB");
        assert!(out > base + 1.0, "{out} vs {base}");
        assert!(plain.steps[1].meta.get("output_error").is_none());
        // Without a Hessian, no output SQNR.
        let none = encode_tensor("w", x.clone(), &shape, &rotate_uniform4_zstd(), 7, 4).unwrap();
        assert_eq!(none.output_sqnr_db, None);
        assert_eq!(none.parts, plain.parts);
        // Same inputs, same bytes.
        let again = encode_tensor_calibrated("w", x, &shape, &gptq, 7, 4, Some(&h)).unwrap();
        assert_eq!(again.parts, e.parts);
    }

    #[test]
    fn gptq_without_calibration_or_with_a_wrong_hessian_is_a_clear_error() {
        let x = gaussian_vec(13, 8 * 64);
        let stages = vec![StageSpec::Gptq(GptqSpec {
            grid: GptqGrid::Rtn(RtnSpec {
                bits: 4,
                group: Some(32),
                symmetric: true,
                search: false,
            }),
            damp: 0.01,
            block: 128,
            act_order: true,
        })];
        let err = encode_tensor("w", x.clone(), &[8, 64], &stages, 1, 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "stage `gptq` needs calibration data (`calibration:` in the job)"
        );
        let h = calibration(14, 32, 100);
        let err = encode_tensor_calibrated("w", x.clone(), &[8, 64], &stages, 1, 4, Some(&h))
            .unwrap_err();
        assert!(err.to_string().contains("not 64 × 64"), "{err}");
        // Through a low-rank residual the Hessian is unchanged.
        let h = calibration(14, 64, 100);
        let mut chain = vec![StageSpec::Lowrank(LowrankSpec {
            rank: Some(2),
            rank_fraction: None,
            energy: None,
            keep_residual: true,
        })];
        chain.extend(stages.clone());
        let e = encode_tensor_calibrated("w", x.clone(), &[8, 64], &chain, 1, 4, Some(&h)).unwrap();
        let y = decode_tensor(&e.steps, e.parts.clone(), &[8, 64]).unwrap();
        assert_eq!(crate::stats::sqnr_db(&x, &y), e.sqnr_db);
        let rel = e.steps[1].meta["output_error"].as_f64().unwrap();
        let out = e.output_sqnr_db.unwrap();
        assert!(
            (-10.0 * rel.log10() - out).abs() < 1e-3,
            "{rel} vs {out} dB"
        );
        // A sparse stage compacts the rows: gptq cannot follow it.
        let mut chain = vec![StageSpec::Sparse(SparseSpec {
            pattern: SparsePattern::TwoFour,
            density: 0.5,
        })];
        chain.extend(stages);
        let err =
            encode_tensor_calibrated("w", x.clone(), &[8, 64], &chain, 1, 4, Some(&h)).unwrap_err();
        assert!(
            err.to_string().contains("cannot follow a `sparse` stage"),
            "{err}"
        );
        // A sparse chain without gptq still reports the output SQNR.
        let chain = vec![
            StageSpec::Sparse(SparseSpec {
                pattern: SparsePattern::TwoFour,
                density: 0.5,
            }),
            StageSpec::Rtn(RtnSpec {
                bits: 4,
                group: Some(16),
                symmetric: true,
                search: false,
            }),
        ];
        let e = encode_tensor_calibrated("w", x, &[8, 64], &chain, 1, 4, Some(&h)).unwrap();
        assert!(e.output_sqnr_db.is_some());
    }

    #[test]
    fn declared_sizes_beyond_the_shape_are_refused_before_allocation() {
        let x = gaussian_vec(3, 8 * 128);
        let stages = rotate_uniform4_zstd();
        let e = encode_tensor("w", x, &[8, 128], &stages, 7, 4).unwrap();
        // A raw length of 2^40 bytes for the codes: refused, nothing allocated.
        let mut huge = e.steps.clone();
        huge[2].meta["codec"]["parts"][0]["raw_len"] = json!(1u64 << 40);
        let err = decode_tensor(&huge, e.parts.clone(), &[8, 128]).unwrap_err();
        assert!(err.to_string().contains("bytes before coding"), "{err}");
        // A quantizer that claims 2^20 × 2^20 values for an 8 × 128 tensor.
        let mut wide = e.steps.clone();
        wide[1].meta["rows"] = json!(1u64 << 20);
        wide[1].meta["cols"] = json!(1u64 << 20);
        let err = decode_tensor(&wide, e.parts.clone(), &[8, 128]).unwrap_err();
        assert!(err.to_string().contains("more than shape"), "{err}");
        // A shape whose element count overflows.
        let err = decode_tensor(&e.steps, e.parts.clone(), &[usize::MAX, 2]).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
        // The untouched record still decodes.
        decode_tensor(&e.steps, e.parts, &[8, 128]).unwrap();
    }

    #[test]
    fn errors_add_up() {
        let x = gaussian_vec(2, 32 * 256);
        let stages = vec![
            StageSpec::Sparse(SparseSpec {
                pattern: SparsePattern::TwoFour,
                density: 0.5,
            }),
            StageSpec::Rtn(RtnSpec {
                bits: 4,
                group: Some(64),
                symmetric: true,
                search: false,
            }),
        ];
        let e = encode_tensor("w", x, &[32, 256], &stages, 1, 4).unwrap();
        let total: f64 = e.steps.iter().map(|s| s.error_added).sum();
        let s = e.sqnr_db.unwrap();
        assert!((-10.0 * total.log10() - s).abs() < 1e-6, "{total} vs {s}");
        assert!(e.steps[0].error_added > 0.0);
    }

    #[test]
    fn a_correction_decodes_after_the_chain_and_is_accounted() {
        let (rows, cols) = (16, 128);
        let x = gaussian_vec(21, rows * cols);
        let h = calibration(22, cols, 512);
        let stages = rotate_uniform4_zstd();
        let shape = [rows, cols];
        let e = encode_tensor_calibrated("w", x.clone(), &shape, &stages, 7, 4, Some(&h)).unwrap();
        // The gains that best fit each row and column of the original
        // (least squares on the decoded rows), and a rank-1 term.
        let gains: Vec<f32> = (0..rows)
            .map(|r| {
                let (w, d) = (&x[r * cols..][..cols], &e.decoded[r * cols..][..cols]);
                let num: f64 = w
                    .iter()
                    .zip(d)
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum();
                let den: f64 = d.iter().map(|b| (*b as f64).powi(2)).sum();
                (num / den) as f32
            })
            .collect();
        let c = Correction {
            rows: Some(gains),
            cols: Some(vec![1.0; cols]),
            low_rank: Some(crate::correction::LowRank {
                rank: 1,
                a: vec![1e-3; rows],
                b: gaussian_vec(23, cols).iter().map(|v| v * 1e-3).collect(),
            }),
        };
        let mut steps = e.steps.clone();
        let done = add_correction(&mut steps, &x, &e.decoded, &shape, &c, Some(&h)).unwrap();
        let last = steps.last().unwrap();
        assert_eq!(last.spec.kind(), "correction");
        let added: u64 = done.parts.iter().map(|p| p.len() as u64).sum();
        assert_eq!(added, 2 * (rows + cols + rows + cols) as u64);
        assert_eq!(last.bytes_out - last.bytes_in, added);
        // Least-squares gains lower the weight error: a negative share.
        assert!(last.error_added < 0.0, "{}", last.error_added);
        assert!(done.sqnr_db.unwrap() > e.sqnr_db.unwrap());
        assert!(done.output_sqnr_db.is_some());
        let mut parts = e.parts.clone();
        parts.extend(done.parts.clone());
        let y = decode_tensor(&steps, parts.clone(), &shape).unwrap();
        assert_eq!(y, done.decoded);
        assert_eq!(crate::stats::sqnr_db(&x, &y), done.sqnr_db);
        // Without its parts, or with a step after it, decoding refuses.
        assert!(decode_tensor(&steps, e.parts.clone(), &shape).is_err());
        let mut late = steps.clone();
        late.push(steps[2].clone());
        let err = decode_tensor(&late, parts, &shape).unwrap_err();
        assert!(
            err.to_string().contains("must come after the whole chain"),
            "{err}"
        );
    }

    #[test]
    fn missing_part_is_an_error_not_a_panic() {
        let x = gaussian_vec(3, 4 * 128);
        let stages = vec![
            StageSpec::Rtn(RtnSpec {
                bits: 4,
                group: None,
                symmetric: true,
                search: false,
            }),
            StageSpec::Zstd(ZstdSpec::default()),
        ];
        let e = encode_tensor("w", x, &[4, 128], &stages, 1, 4).unwrap();
        let mut parts = e.parts.clone();
        parts.pop();
        assert!(decode_tensor(&e.steps, parts, &[4, 128]).is_err());
        assert!(decode_tensor(&e.steps, e.parts.clone(), &[4, 129]).is_err());
    }
}
