//! Layer-parallel calibration (`calibration.parallel: layers`): a model
//! too large for one node is split into stages by layer. Each rank of the
//! group holds only the blocks of its own shard (a contiguous run of
//! layers, in rank order) and runs every calibration micro-batch through
//! them; the activations flow from the rank holding layers [a, b) to the
//! one holding [b, c) over the node-to-node plane, so no rank holds more
//! than its blocks and one layer's activations.
//!
//! Rank 0 reads and embeds the calibration data. Each stage walks its
//! blocks exactly as a one-process run does (statistics from every
//! micro-batch, each block encoded, then run again with its encoded
//! weights), so the artifact is the same bits as that run's. The handoff
//! carries the micro-batches as they leave the stage (with the original
//! model's activations beside them when distillation needs them) and the
//! report's figures so far; the last stage writes the report.

use std::collections::HashSet;
use std::ops::Range;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use hcx_forward::Part;
use hcx_kernels::collective::{Collective, local};
use hcx_protocol::JobSpec;
use serde::{Deserialize, Serialize};

use crate::PipelineError;
use crate::calibrate::{
    Batch, BatchSize, Calibrated, TensorFigure, Walk, calibrate_block, calibration_of,
    check_calibrated_tensors, load_net, plans_of, read_batches,
};
use crate::distill::{BlockDistillation, OutputError};
use crate::model::Model;

/// How long a stage waits for the one before it to finish its blocks. A
/// neighbour that dies or stops answering is noticed by the link itself
/// (the node-to-node plane's keep-alive), not by this wait.
const STAGE_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Leads every handoff.
const MAGIC: &[u8; 8] = b"HCXSTG01";

fn stage_error(why: impl Into<String>) -> PipelineError {
    PipelineError::Stage { why: why.into() }
}

fn collective(during: &str, source: hcx_kernels::collective::CollectiveError) -> PipelineError {
    PipelineError::Collective {
        during: during.into(),
        source,
    }
}

/// The block a tensor belongs to, for a decoder's or an encoder's names.
fn block_of(name: &str) -> Option<usize> {
    hcx_forward::llama::Site::of_weight(name)
        .or_else(|| hcx_forward::bert::site_of_weight(name))
        .map(|(layer, _)| layer)
}

/// Each rank's blocks, from the blocks its shard's tensors belong to
/// (gathered from every rank): contiguous runs in rank order covering
/// every block. A rank without blocks gets an empty run.
fn stage_ranges(
    ranks: &mut dyn Collective,
    wanted: &HashSet<&str>,
    layers: usize,
) -> Result<Vec<Range<usize>>, PipelineError> {
    let mine: Vec<usize> = wanted.iter().filter_map(|n| block_of(n)).collect();
    let own = match (mine.iter().min(), mine.iter().max()) {
        (Some(&a), Some(&b)) => [a as u64, b as u64 + 1],
        _ => [0, 0],
    };
    let mut bytes = Vec::with_capacity(16);
    for v in own {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let gathered = ranks
        .all_gather(&bytes)
        .map_err(|e| collective("the stages' layer ranges", e))?;
    let mut ranges = Vec::with_capacity(gathered.len());
    let mut next = 0usize;
    for (r, b) in gathered.iter().enumerate() {
        let (Some(a), Some(e)) = (
            b.get(..8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_le_bytes),
            b.get(8..16)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_le_bytes),
        ) else {
            return Err(stage_error(format!(
                "rank {r} sent a malformed layer range"
            )));
        };
        if b.len() != 16 {
            return Err(stage_error(format!(
                "rank {r} sent a malformed layer range"
            )));
        }
        let (a, e) = (a as usize, e as usize);
        if a == e {
            ranges.push(next..next);
            continue;
        }
        if a != next || e > layers {
            return Err(stage_error(format!(
                "each rank's shard must be a contiguous run of blocks in rank order: rank {r} holds blocks {a}..{e}, the ranks before it end at block {next} (of {layers})"
            )));
        }
        ranges.push(a..e);
        next = e;
    }
    if next != layers {
        return Err(stage_error(format!(
            "the ranks' shards hold blocks 0..{next}; the model has {layers}"
        )));
    }
    Ok(ranges)
}

/// A distilled block's report as it travels on (without its tuned values,
/// which only the stage holding the block writes).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BlockReport {
    layer: usize,
    params: usize,
    before: OutputError,
    after: OutputError,
    seconds: f64,
    tuned: Vec<String>,
    corrected: Vec<String>,
}

/// The handoff's header (JSON); the activations follow it as f32.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    samples: usize,
    tokens: usize,
    forward_seconds: f64,
    seconds: f64,
    figures: Vec<TensorFigure>,
    blocks: Vec<BlockReport>,
    /// Each micro-batch's windows and tokens per window.
    batches: Vec<(usize, usize)>,
    hidden: usize,
    /// Whether the original model's activations follow the compressed
    /// model's.
    original: bool,
}

/// A handoff as the next stage reads it.
struct Handoff {
    header: Header,
    /// The compressed model's activations, a micro-batch each.
    batches: Vec<Batch>,
    /// The original model's, when the header says they follow.
    original: Option<Vec<Tensor>>,
}

/// What a stage hands on: magic, header length (u64), header, then each
/// micro-batch's activations (rows × hidden f32, little-endian), then the
/// original model's in the same shapes when `original`.
fn encode_handoff(header: &Header, walk: &Walk) -> Result<Vec<u8>, PipelineError> {
    let json = serde_json::to_vec(header).map_err(|e| stage_error(e.to_string()))?;
    let values: usize = walk.batches.iter().map(|b| b.x.elem_count()).sum();
    let mut out =
        Vec::with_capacity(16 + json.len() + 4 * values * (1 + usize::from(header.original)));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    let tensors = walk.batches.iter().map(|b| &b.x).chain(&walk.original);
    for t in tensors {
        let v = t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| stage_error(e.to_string()))?;
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    Ok(out)
}

/// Reads a handoff for a model of width `hidden`; refuses anything
/// malformed before allocating for it.
fn decode_handoff(bytes: &[u8], hidden: usize) -> Result<Handoff, PipelineError> {
    let bad = |why: &str| stage_error(format!("the previous stage's handoff is malformed: {why}"));
    if bytes.get(..8) != Some(MAGIC.as_slice()) {
        return Err(bad("no handoff header"));
    }
    let len = bytes
        .get(8..16)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| bad("no header length"))?;
    let json = bytes
        .get(16..16usize.saturating_add(len))
        .ok_or_else(|| bad("the header is cut short"))?;
    let header: Header = serde_json::from_slice(json).map_err(|e| bad(&e.to_string()))?;
    if header.hidden != hidden {
        return Err(bad(&format!(
            "activations {} wide, the model's are {hidden}",
            header.hidden
        )));
    }
    let mut rows = Vec::with_capacity(header.batches.len());
    let mut total = 0usize;
    for &(windows, len) in &header.batches {
        let n = windows
            .checked_mul(len)
            .filter(|&n| n > 0)
            .ok_or_else(|| bad("an empty or oversized micro-batch"))?;
        total = n
            .checked_mul(hidden)
            .and_then(|v| v.checked_add(total))
            .ok_or_else(|| bad("oversized micro-batches"))?;
        rows.push(n);
    }
    let copies = 1 + usize::from(header.original);
    let body = &bytes[16 + len..];
    if Some(body.len()) != total.checked_mul(4 * copies) {
        return Err(bad(&format!(
            "{} bytes of activations for micro-batches of {total} values",
            body.len()
        )));
    }
    let mut at = 0;
    let mut take = |n: usize| -> Result<Tensor, PipelineError> {
        let values: Vec<f32> = body[at..at + 4 * n * hidden]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        at += 4 * n * hidden;
        Tensor::from_vec(values, (n, hidden), &Device::Cpu).map_err(|e| stage_error(e.to_string()))
    };
    let mut batches = Vec::with_capacity(rows.len());
    for (&n, &(windows, len)) in rows.iter().zip(&header.batches) {
        batches.push(Batch {
            x: take(n)?,
            windows,
            len,
        });
    }
    let original = if header.original {
        Some(
            rows.iter()
                .map(|&n| take(n))
                .collect::<Result<Vec<_>, _>>()?,
        )
    } else {
        None
    };
    Ok(Handoff {
        header,
        batches,
        original,
    })
}

/// Runs this rank's stage of a layer-parallel calibration: waits for the
/// activations from the stage before (rank 0 reads the data instead),
/// walks its blocks, and hands the activations on. `wanted` is this rank's
/// shard. The returned encodings cover this rank's blocks; the figures and
/// distillation reports cover every block up to this stage's last.
pub(crate) fn calibrate_stage<'a>(
    spec: &'a JobSpec,
    model: &Model,
    ranks: &mut dyn Collective,
    wanted: &HashSet<&str>,
) -> Result<Calibrated<'a>, PipelineError> {
    let cal = calibration_of(spec, model)?;
    let plans = plans_of(spec, model);
    let (rank, world) = (ranks.rank(), ranks.world());
    let layers = crate::calibrate::layer_count(model)?;
    let ranges = stage_ranges(ranks, wanted, layers)?;
    let part = Part {
        blocks: ranges[rank].clone(),
        embeddings: rank == 0,
        head: false,
    };
    let (net, tok) = load_net(spec, model, Some(&part))?;
    check_calibrated_tensors(&net, model, &plans)?;
    // The blocks' statistics are this stage's alone: a group of one.
    let mut solo = local::group(1, 0)
        .map_err(|e| collective("a one-rank group", e))?
        .remove(0);
    let mut net = Some(net);
    let mut walk: Option<Walk> = None;
    let mut header: Option<Header> = None;
    let mut buf = Vec::new();
    for stage in 0..world {
        if stage == rank {
            let t0 = Instant::now();
            let net = net.take().expect("walked once");
            let (mut h, mut w) = if rank == 0 {
                let files: Vec<std::path::PathBuf> =
                    cal.files().flat_map(|f| f.as_slice().to_vec()).collect();
                let batches = read_batches(&net, &tok, model, cal, &files)?;
                let sizes: Vec<BatchSize> = batches.iter().map(BatchSize::of).collect();
                let h = Header {
                    samples: sizes.iter().map(|b| b.samples).sum(),
                    tokens: sizes.iter().map(|b| b.rows).sum(),
                    forward_seconds: 0.0,
                    seconds: 0.0,
                    figures: Vec::new(),
                    blocks: Vec::new(),
                    batches: batches.iter().map(|b| (b.windows, b.len)).collect(),
                    hidden: net.hidden(),
                    original: false,
                };
                let global = (0..batches.len()).collect();
                (
                    h,
                    Walk::new(spec, model, net, batches, global, &sizes, None),
                )
            } else {
                let Handoff {
                    header: h,
                    batches,
                    original,
                } = decode_handoff(&buf, net.hidden())?;
                buf = Vec::new();
                let sizes: Vec<BatchSize> = batches.iter().map(BatchSize::of).collect();
                let global = (0..batches.len()).collect();
                let w = Walk::new(spec, model, net, batches, global, &sizes, original);
                (h, w)
            };
            for layer in ranges[rank].clone() {
                calibrate_block(spec, model, &plans, &mut w, layer, &mut solo)?;
            }
            h.forward_seconds += w.forward_seconds;
            h.seconds += t0.elapsed().as_secs_f64();
            h.figures.extend(w.figures.iter().copied());
            h.blocks.extend(w.distilled.iter().map(|d| BlockReport {
                layer: d.layer,
                params: d.params,
                before: d.before,
                after: d.after,
                seconds: d.seconds,
                tuned: d.tuned.iter().map(|(n, _)| n.clone()).collect(),
                corrected: d.corrected.clone(),
            }));
            h.original = !w.original.is_empty();
            if stage + 1 < world {
                buf = encode_handoff(&h, &w)?;
            }
            header = Some(h);
            walk = Some(w);
        }
        if stage + 1 < world {
            ranks
                .pass_on(&mut buf, stage, STAGE_WAIT)
                .map_err(|e| collective(&format!("the activations after stage {stage}"), e))?;
        }
    }
    let (Some(h), Some(w)) = (header, walk) else {
        return Err(stage_error(format!("rank {rank} never ran its stage")));
    };
    // Earlier stages' blocks carry names only; this stage's carry values.
    let own: HashSet<usize> = w.distilled.iter().map(|d| d.layer).collect();
    let mut distilled: Vec<BlockDistillation> = h
        .blocks
        .into_iter()
        .filter(|b| !own.contains(&b.layer))
        .map(|b| BlockDistillation {
            layer: b.layer,
            params: b.params,
            before: b.before,
            after: b.after,
            seconds: b.seconds,
            tuned: b.tuned.into_iter().map(|n| (n, Vec::new())).collect(),
            corrected: b.corrected,
        })
        .collect();
    distilled.extend(w.distilled);
    Ok(Calibrated {
        cal,
        plans,
        done: w.done,
        figures: h.figures,
        samples: h.samples,
        tokens: h.tokens,
        forward_seconds: h.forward_seconds,
        seconds: h.seconds,
        distilled,
        end_to_end: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handoff_round_trips_and_bad_ones_are_refused() {
        let x =
            Tensor::from_vec((0..12).map(|v| v as f32).collect(), (3, 4), &Device::Cpu).unwrap();
        let h = Header {
            samples: 1,
            tokens: 3,
            forward_seconds: 0.5,
            seconds: 1.0,
            figures: vec![TensorFigure {
                params: 16.0,
                weight_db: 20.0,
                output_db: 18.0,
            }],
            blocks: Vec::new(),
            batches: vec![(1, 3)],
            hidden: 4,
            original: false,
        };
        let bytes = {
            let mut out = Vec::new();
            out.extend_from_slice(MAGIC);
            let json = serde_json::to_vec(&h).unwrap();
            out.extend_from_slice(&(json.len() as u64).to_le_bytes());
            out.extend_from_slice(&json);
            for v in x.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out
        };
        let got = decode_handoff(&bytes, 4).ok().unwrap();
        assert_eq!(got.header.figures, h.figures);
        assert!(got.original.is_none());
        assert_eq!(
            got.batches[0]
                .x
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            (0..12).map(|v| v as f32).collect::<Vec<_>>()
        );
        // Wrong width, cut short, trailing bytes, no magic: all refused.
        let e = decode_handoff(&bytes, 5).err().unwrap().to_string();
        assert!(e.contains("4 wide, the model's are 5"), "{e}");
        for bad in [
            &bytes[..bytes.len() - 1],
            &[bytes.as_slice(), &[0]].concat()[..],
            &bytes[1..],
            &bytes[..20],
        ] {
            assert!(decode_handoff(bad, 4).is_err());
        }
    }
}
