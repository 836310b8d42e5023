//! Calibrated runs: the job's `calibration:` text is run through the model,
//! and each block's linear weights are encoded with the statistics
//! H = Σ x xᵀ of their inputs (a `gptq` stage uses them; every calibrated
//! tensor also reports its output error on those inputs).
//!
//! The model is walked one block at a time. Windows go through the block in
//! fixed micro-batches of [`MICRO_BATCH`] windows (the split follows the
//! data alone); each micro-batch's XᵀX, one f64 product, is rounded into a
//! fixed-point integer sum ([`HessianSum`]), so the statistics do not depend
//! on which process computed which micro-batch or in which order the parts
//! are added. Once a block's statistics are complete its tensors are
//! encoded. With `order: sequential` (the default) the block's weights are
//! then replaced by their decoded values and the block is run again, so the
//! next block is calibrated on the inputs the compressed model will really
//! give it; with `order: original` every block sees the original model's
//! activations.
//!
//! Data-parallel runs ([`run_job_ranked`]) give micro-batch i to rank
//! i mod n. Each rank adds its micro-batches' statistics and the ranks
//! all-reduce the exact integer sums, so the statistics, and so the
//! artifact, are the same bits for any number of ranks. Every rank then
//! encodes the block (the encoders are deterministic, so no weights need to
//! travel) and re-runs its own micro-batches; rank 0 writes the artifact.
//!
//! Federated runs (`calibration.sites`): each rank reads only its own
//! site's files. Micro-batches are numbered site by site (sites by name),
//! a site's j-th going to the j mod k-th of its k ranks; the ranks
//! all-gather only the micro-batch sizes. A site's ranks are neighbours in
//! the ring, so a partial sum leaves a site only once it holds all of that
//! site's data: what crosses between sites is exact integer sums
//! (statistics with their row counts, gradients, output error totals) and
//! counts, never tokens or activations. The numbering and the sums do not
//! depend on who holds what, so the artifact equals that of one process
//! reading every site's files.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use hcx_forward::Part;
use hcx_forward::bert::{Bert, BertConfig};
use hcx_forward::llama::{Llama, LlamaConfig, Site};
use hcx_forward::text::{TextTokenizer, read_texts, token_windows};
use hcx_kernels::chain::add_correction;
use hcx_kernels::collective::Collective;
use hcx_kernels::correction::Correction;
use hcx_kernels::hessian::HessianSum;
use hcx_protocol::{
    Calibration, CalibrationOrder, CalibrationParallel, DistillParam, JobSpec, PartEntry, StageSpec,
};
use rayon::prelude::*;

use crate::PipelineError;
use crate::attribution::{Attribution, ReportSection};
use crate::distill::{BlockDistillation, MicroBatches, distill_block, no_correction, output_error};
use crate::end_to_end::{EndToEndTuning, tune_end_to_end};
use crate::model::{Model, f32_to_bytes, raw_to_f32};
use crate::run::{
    EncodedEntry, RunOutcome, TENSOR_FILE, encode_raw_calibrated, encode_tuned_calibrated,
    finish_artifact, waves, write_artifact, write_entry,
};
use crate::shard::{ShardSummary, ShardWriter};
use crate::writer::TensorFileWriter;

/// A tensor's encoding and, for a calibrated one, its decoded values.
type Encoded = Result<(EncodedEntry, Option<Vec<f32>>), PipelineError>;

/// Windows per micro-batch: the unit statistics are summed in.
pub const MICRO_BATCH: usize = 8;

pub(crate) fn bad(model: &Model, why: String) -> PipelineError {
    PipelineError::Model {
        path: model
            .dir
            .join(model.files.first().map(String::as_str).unwrap_or("")),
        why,
    }
}

pub(crate) fn forward_error(model: &Model, e: hcx_forward::ForwardError) -> PipelineError {
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

/// The source's forward pass, block by block.
pub(crate) enum Net {
    Decoder(Llama),
    Encoder(Bert),
}

/// A micro-batch: `windows` samples of `len` tokens, as the block input
/// `[windows·len, hidden]`.
pub(crate) struct Batch {
    pub(crate) x: Tensor,
    pub(crate) windows: usize,
    pub(crate) len: usize,
}

impl Net {
    pub(crate) fn layers(&self) -> usize {
        match self {
            Net::Decoder(m) => m.cfg.layers,
            Net::Encoder(m) => m.cfg.layers,
        }
    }

    /// Width of the residual stream (a block's input and output).
    pub(crate) fn hidden(&self) -> usize {
        match self {
            Net::Decoder(m) => m.cfg.hidden,
            Net::Encoder(m) => m.cfg.hidden,
        }
    }

    pub(crate) fn site_of(&self, name: &str) -> Option<(usize, Site)> {
        match self {
            Net::Decoder(_) => Site::of_weight(name),
            Net::Encoder(_) => hcx_forward::bert::site_of_weight(name),
        }
    }

    pub(crate) fn run(
        &self,
        layer: usize,
        b: &Batch,
        capture: &mut dyn FnMut(Site, &Tensor) -> Result<(), hcx_forward::ForwardError>,
    ) -> Result<Tensor, hcx_forward::ForwardError> {
        match self {
            Net::Decoder(m) => m.layer(layer, &b.x, b.windows, b.len, capture),
            Net::Encoder(m) => m.layer(layer, &b.x, capture),
        }
    }

    pub(crate) fn set_weight(
        &mut self,
        name: &str,
        values: Vec<f32>,
    ) -> Result<(), hcx_forward::ForwardError> {
        match self {
            Net::Decoder(m) => m.set_weight(name, values),
            Net::Encoder(m) => m.set_weight(name, values),
        }
    }

    /// Block `layer` with operations that record gradients.
    pub(crate) fn run_for_training(
        &self,
        layer: usize,
        b: &Batch,
    ) -> Result<Tensor, hcx_forward::ForwardError> {
        match self {
            Net::Decoder(m) => m.layer_for_training(layer, &b.x, b.windows, b.len),
            Net::Encoder(m) => m.layer_for_training(layer, &b.x),
        }
    }

    /// The HF names of block `layer`'s parameters of one kind.
    pub(crate) fn tunable(&self, layer: usize, kind: hcx_forward::Tunable) -> Vec<String> {
        match self {
            Net::Decoder(m) => m.tunable(layer, kind),
            Net::Encoder(m) => m.tunable(layer, kind),
        }
    }

    /// The HF names of block `layer`'s linear weights.
    pub(crate) fn linear_weights(&self, layer: usize) -> Vec<String> {
        match self {
            Net::Decoder(m) => m.linear_weights(layer),
            Net::Encoder(m) => m.linear_weights(layer),
        }
    }

    /// Sets or removes the correction the forward pass applies to a
    /// linear weight.
    pub(crate) fn set_correction(
        &mut self,
        name: &str,
        c: Option<hcx_forward::LinearCorrection>,
    ) -> Result<(), hcx_forward::ForwardError> {
        match self {
            Net::Decoder(m) => m.set_correction(name, c),
            Net::Encoder(m) => m.set_correction(name, c),
        }
    }

    /// A block tensor by HF name.
    pub(crate) fn tensor(&self, name: &str) -> Result<Tensor, hcx_forward::ForwardError> {
        match self {
            Net::Decoder(m) => m.tensor(name).cloned(),
            Net::Encoder(m) => m.tensor(name).cloned(),
        }
    }

    /// Replaces a block tensor by HF name.
    pub(crate) fn set_tensor(
        &mut self,
        name: &str,
        t: Tensor,
    ) -> Result<(), hcx_forward::ForwardError> {
        match self {
            Net::Decoder(m) => m.set_tensor(name, t),
            Net::Encoder(m) => m.set_tensor(name, t),
        }
    }
}

fn architecture(cfg: &str) -> String {
    serde_json::from_str::<serde_json::Value>(cfg)
        .ok()
        .and_then(|v| {
            v.get("architectures")
                .and_then(|a| a.get(0))
                .and_then(|a| a.as_str())
                .map(String::from)
        })
        .unwrap_or_else(|| "<none>".into())
}

/// Loads the source's forward pass and its tokenizer. Decoders calibrate
/// on `text:` windows, encoders on `sentences:` (a federated job's site
/// files are read as the model's kind needs).
/// `part` limits what is loaded (a stage of a model split by layer); `None`
/// loads it all.
pub(crate) fn load_net(
    spec: &JobSpec,
    model: &Model,
    part: Option<&Part>,
) -> Result<(Net, TextTokenizer), PipelineError> {
    let Some(cal) = &spec.calibration else {
        return Err(bad(model, "the job has no `calibration:` section".into()));
    };
    crate::keep_freed_memory();
    let (cfg_bytes, cfg_path) = model_file(model, "config.json")?;
    let cfg_text = String::from_utf8_lossy(&cfg_bytes).to_string();
    let by_name: HashMap<&str, &crate::model::TensorInfo> =
        model.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut src = |name: &str| -> Result<hcx_forward::llama::Weight, hcx_forward::ForwardError> {
        Ok(by_name
            .get(name)
            .filter(|t| t.is_float())
            .map(|t| (model.read_f32(t), t.shape.clone())))
    };
    let (tok_bytes, tok_path) = model_file(model, "tokenizer.json")?;
    let tok =
        TextTokenizer::from_bytes(&tok_bytes, &tok_path).map_err(|e| forward_error(model, e))?;
    if let Ok(cfg) = LlamaConfig::parse(&cfg_path, &cfg_text) {
        if cal.text.is_none() && !cal.is_federated() {
            return Err(bad(
                model,
                "this model is a decoder: calibrate it on `text:` (token windows), not `sentences:`"
                    .into(),
            ));
        }
        let whole = Part::whole(cfg.layers);
        let part = part.unwrap_or(&whole);
        let net = Llama::load_part(cfg, &mut src, cal.seq_len, part)
            .map_err(|e| forward_error(model, e))?;
        return Ok((Net::Decoder(net), tok));
    }
    if let Ok(cfg) = BertConfig::parse(&cfg_path, &cfg_text) {
        if cal.sentences.is_none() && !cal.is_federated() {
            return Err(bad(
                model,
                "this model is an encoder: calibrate it on `sentences:` (one sentence a line), not `text:`"
                    .into(),
            ));
        }
        let whole = Part::whole(cfg.layers);
        let part = part.unwrap_or(&whole);
        let net = Bert::load_part(cfg, &mut src, part).map_err(|e| forward_error(model, e))?;
        return Ok((Net::Encoder(net), tok));
    }
    Err(PipelineError::Model {
        path: cfg_path,
        why: format!(
            "architecture `{}` has no forward pass for calibration (supported: {}, BertModel)",
            architecture(&cfg_text),
            hcx_forward::llama::ARCHITECTURES.join(", ")
        ),
    })
}

/// The number of blocks of the source's forward pass, from its config.
pub(crate) fn layer_count(model: &Model) -> Result<usize, PipelineError> {
    let (cfg_bytes, cfg_path) = model_file(model, "config.json")?;
    let cfg_text = String::from_utf8_lossy(&cfg_bytes).to_string();
    if let Ok(cfg) = LlamaConfig::parse(&cfg_path, &cfg_text) {
        return Ok(cfg.layers);
    }
    if let Ok(cfg) = BertConfig::parse(&cfg_path, &cfg_text) {
        return Ok(cfg.layers);
    }
    Err(PipelineError::Model {
        path: cfg_path,
        why: format!(
            "architecture `{}` has no forward pass for calibration",
            architecture(&cfg_text)
        ),
    })
}

/// Cuts calibration files into micro-batches: `samples` windows of
/// `seq_len` tokens for a decoder, [`MICRO_BATCH`] windows a micro-batch;
/// `samples` sentences for an encoder, one a micro-batch.
pub(crate) fn read_batches(
    net: &Net,
    tok: &TextTokenizer,
    model: &Model,
    cal: &Calibration,
    files: &[PathBuf],
) -> Result<Vec<Batch>, PipelineError> {
    let first = files.first().cloned().unwrap_or_default();
    let text = read_texts(files).map_err(|e| PipelineError::Model {
        path: first.clone(),
        why: e.to_string(),
    })?;
    let mut batches = Vec::new();
    match net {
        Net::Decoder(net) => {
            let ids = tok.encode(&text).map_err(|e| forward_error(model, e))?;
            let tokens = token_windows(&ids, cal.seq_len, cal.samples, &first).map_err(|e| {
                PipelineError::Model {
                    path: first.clone(),
                    why: e.to_string().replace(&format!("{}: ", first.display()), ""),
                }
            })?;
            let got = tokens.len() / cal.seq_len;
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
            for chunk in tokens.chunks(MICRO_BATCH * cal.seq_len) {
                batches.push(Batch {
                    x: net.embed(chunk).map_err(|e| forward_error(model, e))?,
                    windows: chunk.len() / cal.seq_len,
                    len: cal.seq_len,
                });
            }
        }
        Net::Encoder(net) => {
            let sentences: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .take(cal.samples)
                .collect();
            if sentences.len() < cal.samples {
                return Err(PipelineError::Model {
                    path: first,
                    why: format!(
                        "{} sentences; the job asks for {} (`calibration.samples`)",
                        sentences.len(),
                        cal.samples
                    ),
                });
            }
            for s in sentences {
                let mut ids = tok
                    .encode_with_special(s)
                    .map_err(|e| forward_error(model, e))?;
                ids.truncate(cal.seq_len);
                let len = ids.len();
                batches.push(Batch {
                    x: net.embed(&ids).map_err(|e| forward_error(model, e))?,
                    windows: 1,
                    len,
                });
            }
        }
    }
    Ok(batches)
}

/// The sizes of one micro-batch, which every rank knows for every
/// micro-batch (counts, never contents).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchSize {
    /// Windows or sentences.
    pub(crate) samples: usize,
    /// Block output scalars (rows × hidden).
    pub(crate) elements: usize,
    /// Token rows (each a row of every layer input's statistics).
    pub(crate) rows: usize,
}

impl BatchSize {
    pub(crate) fn of(b: &Batch) -> BatchSize {
        BatchSize {
            samples: b.windows,
            elements: b.x.elem_count(),
            rows: b.windows * b.len,
        }
    }
}

/// The calibration micro-batches of a run as one rank holds them.
///
/// Micro-batches are numbered globally in a way that depends on the data
/// alone: the shared files' micro-batches in order, or, for a federated
/// job, each site's in order, sites by name. A site's j-th micro-batch is
/// held by the j mod n-th of its n ranks (a shared file's by rank j mod
/// world), so which rank holds which never changes a sum.
pub(crate) struct Layout {
    /// This rank's micro-batches, ascending by global index.
    pub(crate) local: Vec<Batch>,
    /// The global index of each of `local`.
    pub(crate) global: Vec<usize>,
    /// Every micro-batch's sizes, by global index.
    pub(crate) sizes: Vec<BatchSize>,
    /// A federated job's sites by name, with their token rows.
    pub(crate) sites: Vec<(String, usize)>,
}

fn federation(why: impl Into<String>) -> PipelineError {
    PipelineError::Federation { why: why.into() }
}

/// A site's micro-batch sizes as this rank tells the others: the site
/// name's length (u16) and bytes, the count (u64), then per micro-batch
/// samples, elements and rows (u64 each), little-endian.
fn sizes_to_bytes(site: &str, sizes: &[BatchSize]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + site.len() + sizes.len() * 24);
    out.extend_from_slice(&(site.len() as u16).to_le_bytes());
    out.extend_from_slice(site.as_bytes());
    out.extend_from_slice(&(sizes.len() as u64).to_le_bytes());
    for s in sizes {
        for v in [s.samples, s.elements, s.rows] {
            out.extend_from_slice(&(v as u64).to_le_bytes());
        }
    }
    out
}

/// Reads [`sizes_to_bytes`]; `None` when malformed.
fn sizes_from_bytes(b: &[u8]) -> Option<(String, Vec<BatchSize>)> {
    let u64_at = |o: usize| -> Option<usize> {
        usize::try_from(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?)).ok()
    };
    let n = usize::from(u16::from_le_bytes(b.get(..2)?.try_into().ok()?));
    let site = String::from_utf8(b.get(2..2 + n)?.to_vec()).ok()?;
    let count = u64_at(2 + n)?;
    let body = 10 + n;
    if count.checked_mul(24)?.checked_add(body)? != b.len() {
        return None;
    }
    let sizes = (0..count)
        .map(|i| {
            let at = body + 24 * i;
            Some(BatchSize {
                samples: u64_at(at)?,
                elements: u64_at(at + 8)?,
                rows: u64_at(at + 16)?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some((site, sizes))
}

/// Reads this rank's calibration data and agrees with the other ranks on
/// the global micro-batch numbering. `rank_sites` gives a federated job's
/// site of every rank (empty for a one-process run, which reads every
/// site's files itself).
pub(crate) fn layout(
    net: &Net,
    tok: &TextTokenizer,
    model: &Model,
    cal: &Calibration,
    ranks: &mut dyn Collective,
    rank_sites: &[String],
) -> Result<Layout, PipelineError> {
    let (rank, world) = (ranks.rank(), ranks.world());
    if !cal.is_federated() {
        let files: Vec<PathBuf> = cal.files().flat_map(|f| f.as_slice().to_vec()).collect();
        let all = read_batches(net, tok, model, cal, &files)?;
        let sizes = all.iter().map(BatchSize::of).collect();
        let (global, local) = all
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % world == rank)
            .unzip();
        return Ok(Layout {
            local,
            global,
            sizes,
            sites: Vec::new(),
        });
    }
    if world == 1 && rank_sites.is_empty() {
        // One process holding every site's data: the reference a
        // federated run must equal.
        let (mut local, mut sites) = (Vec::new(), Vec::new());
        for (site, files) in &cal.sites {
            let b = read_batches(net, tok, model, cal, files.as_slice())?;
            sites.push((site.clone(), b.iter().map(|b| b.windows * b.len).sum()));
            local.extend(b);
        }
        let sizes: Vec<BatchSize> = local.iter().map(BatchSize::of).collect();
        return Ok(Layout {
            global: (0..local.len()).collect(),
            local,
            sizes,
            sites,
        });
    }
    if rank_sites.len() != world {
        return Err(federation(format!(
            "the group has {world} ranks but {} site labels",
            rank_sites.len()
        )));
    }
    for (r, site) in rank_sites.iter().enumerate() {
        if !cal.sites.contains_key(site) {
            return Err(federation(format!(
                "rank {r}'s node is at site `{site}`, for which the job names no calibration source"
            )));
        }
        // A site's ranks sit side by side in the ring, so a partial sum
        // leaves a site only once it holds all of the site's data.
        if r > 0 && rank_sites[r - 1] != *site && rank_sites[..r - 1].contains(site) {
            return Err(federation(format!(
                "the ranks of site `{site}` are not adjacent in the group"
            )));
        }
    }
    if let Some(site) = cal.sites.keys().find(|s| !rank_sites.contains(s)) {
        return Err(federation(format!(
            "no node of site `{site}` is in the group; its calibration data is read only there"
        )));
    }
    let me = &rank_sites[rank];
    let mine = read_batches(net, tok, model, cal, cal.sites[me].as_slice())?;
    let my_sizes: Vec<BatchSize> = mine.iter().map(BatchSize::of).collect();
    let gathered = ranks
        .all_gather(&sizes_to_bytes(me, &my_sizes))
        .map_err(|source| PipelineError::Collective {
            during: "the calibration micro-batch sizes".into(),
            source,
        })?;
    let mut by_site: std::collections::BTreeMap<&str, Vec<BatchSize>> = Default::default();
    for (r, b) in gathered.iter().enumerate() {
        let (site, sizes) = sizes_from_bytes(b)
            .ok_or_else(|| federation(format!("rank {r} sent malformed micro-batch sizes")))?;
        if site != rank_sites[r] {
            return Err(federation(format!(
                "rank {r} says it is at site `{site}`, the group places it at `{}`",
                rank_sites[r]
            )));
        }
        match by_site.get(site.as_str()) {
            Some(known) if *known != sizes => {
                return Err(federation(format!(
                    "the nodes of site `{site}` read different calibration data (rank {r} disagrees)"
                )));
            }
            Some(_) => {}
            None => {
                let key = cal.sites.get_key_value(&site).map(|(k, _)| k.as_str());
                by_site.insert(key.unwrap_or_default(), sizes);
            }
        }
    }
    // This site's ranks, and this rank's place among them.
    let peers = rank_sites.iter().filter(|s| *s == me).count();
    let at = (0..rank).filter(|&r| rank_sites[r] == *me).count();
    let (mut sizes, mut sites, mut global) = (Vec::new(), Vec::new(), Vec::new());
    for (site, s) in &by_site {
        if *site == me.as_str() {
            let first = sizes.len();
            global.extend((0..s.len()).filter(|j| j % peers == at).map(|j| first + j));
        }
        sites.push((site.to_string(), s.iter().map(|b| b.rows).sum()));
        sizes.extend_from_slice(s);
    }
    let local = mine
        .into_iter()
        .enumerate()
        .filter(|(j, _)| j % peers == at)
        .map(|(_, b)| b)
        .collect();
    Ok(Layout {
        local,
        global,
        sizes,
        sites,
    })
}

/// Refuses a federated site with fewer token rows than the widest
/// calibrated layer's input (its statistics would have low rank and could
/// reveal its inputs) unless the job allows it.
pub(crate) fn check_site_rows(
    net: &Net,
    model: &Model,
    cal: &Calibration,
    sites: &[(String, usize)],
) -> Result<(), PipelineError> {
    if cal.allow_small_sites {
        return Ok(());
    }
    let widest = model
        .tensors
        .iter()
        .filter(|t| net.site_of(&t.name).is_some())
        .filter_map(|t| t.shape.last().copied())
        .max()
        .unwrap_or(0);
    if let Some((site, rows)) = sites.iter().find(|(_, rows)| *rows < widest) {
        return Err(federation(format!(
            "site `{site}` calibrates on {rows} token rows, fewer than the widest calibrated layer's input ({widest} values), so its summed statistics could reveal its inputs; give it more data or set `calibration.allow_small_sites: true`"
        )));
    }
    Ok(())
}

/// Runs a calibrated job with this process as one rank of a data-parallel
/// group: every rank calls it with the same spec; rank 0 writes the artifact
/// to `output` (the spec's own when `None`) and returns it, the other ranks
/// return `None`. With a one-rank group this is the plain calibrated run.
/// For a federated job (`calibration.sites`), `rank_sites` names every
/// rank's site (each rank reads only its site's files); empty, one process
/// reads every site's files.
pub fn run_job_ranked(
    spec: &JobSpec,
    output: Option<&Path>,
    ranks: &mut dyn Collective,
    rank_sites: &[String],
) -> Result<Option<RunOutcome>, PipelineError> {
    let layers = spec
        .calibration
        .as_ref()
        .is_some_and(|c| c.parallel == CalibrationParallel::Layers);
    if layers && ranks.world() > 1 {
        // Each stage holds only its blocks' encodings: the ranks write
        // shards (encode_group_shard) that the merge joins.
        return Err(PipelineError::Model {
            path: spec.model.path.clone(),
            why: "`calibration.parallel: layers` runs on a cluster's nodes, each writing the shard of its own layers; a single process calibrates the whole model itself".into(),
        });
    }
    if ranks.rank() != 0 {
        let model = Model::open(spec.model.read_path())?;
        calibrate_blocks(spec, &model, ranks, rank_sites)?;
        return Ok(None);
    }
    let output = output.unwrap_or(&spec.output).to_path_buf();
    write_artifact(spec, &output, |model, tmp, started| {
        build_calibrated(spec, model, tmp, started, ranks, rank_sites)
    })
    .map(Some)
}

/// What walking the blocks produced: every calibrated tensor's encoding,
/// and the figures for the report.
pub(crate) struct Calibrated<'a> {
    /// The job's calibration section.
    pub(crate) cal: &'a Calibration,
    /// Each tensor's stage chain.
    pub(crate) plans: Vec<Vec<StageSpec>>,
    pub(crate) done: Vec<Option<EncodedEntry>>,
    /// Every calibrated tensor's figures (of every rank's blocks).
    pub(crate) figures: Vec<TensorFigure>,
    pub(crate) samples: usize,
    pub(crate) tokens: usize,
    pub(crate) forward_seconds: f64,
    pub(crate) seconds: f64,
    /// What distillation did to each block (empty without `distill:`).
    pub(crate) distilled: Vec<BlockDistillation>,
    /// What end-to-end tuning did (`distill.end_to_end`).
    pub(crate) end_to_end: Option<EndToEndTuning>,
}

/// Sums the ranks' statistics of block `layer` exactly. The ranks first
/// all-gather which sites they hold, with each sum's dimension and bound
/// (so a rank without micro-batches adds zeros, and the integer sum is
/// known not to overflow), then all-reduce the integers. In the ring a
/// partial sum leaves a federated site only once it holds all that site's
/// micro-batches (the site's ranks are adjacent). `dims` gives each of the
/// block's input sites its width from the model; a rank that announces
/// another site or width is refused before anything is allocated for it.
fn reduce_stats(
    stats: &mut HashMap<Site, HessianSum>,
    dims: &HashMap<Site, usize>,
    layer: usize,
    ranks: &mut dyn Collective,
) -> Result<(), PipelineError> {
    let collective = |what: &str, source| PipelineError::Collective {
        during: format!("block {layer}'s calibration statistics ({what})"),
        source,
    };
    let malformed =
        |r: usize| federation(format!("block {layer}: rank {r} sent malformed statistics"));
    // Per site present: its index in Site::ALL (u8), dim (u64), bound (u128).
    let mut meta = Vec::new();
    for (code, site) in Site::ALL.iter().enumerate() {
        if let Some(h) = stats.get(site) {
            meta.push(code as u8);
            meta.extend_from_slice(&(h.dim() as u64).to_le_bytes());
            meta.extend_from_slice(&h.bound().to_le_bytes());
        }
    }
    let gathered = ranks
        .all_gather(&meta)
        .map_err(|e| collective("which sites", e))?;
    let mut union: std::collections::BTreeMap<usize, (usize, u128)> = Default::default();
    for (r, b) in gathered.iter().enumerate() {
        if b.len() % 25 != 0 {
            return Err(malformed(r));
        }
        for m in b.chunks_exact(25) {
            let code = usize::from(m[0]);
            let dim = usize::try_from(u64::from_le_bytes(
                m[1..9].try_into().map_err(|_| malformed(r))?,
            ))
            .map_err(|_| malformed(r))?;
            let bound = u128::from_le_bytes(m[9..25].try_into().map_err(|_| malformed(r))?);
            if Site::ALL.get(code).and_then(|s| dims.get(s)) != Some(&dim) {
                return Err(federation(format!(
                    "block {layer}: rank {r} sent statistics of {dim} columns for input site {code}, which the model's block does not read with that width"
                )));
            }
            let e = union.entry(code).or_insert((dim, 0));
            if e.0 != dim {
                return Err(malformed(r));
            }
            e.1 = e
                .1
                .checked_add(bound)
                .filter(|b| *b <= i128::MAX as u128)
                .ok_or_else(|| {
                    federation(format!(
                        "block {layer}: the summed calibration statistics would overflow their exact 128-bit accumulator (inputs too large)"
                    ))
                })?;
        }
    }
    let mut words = Vec::new();
    for (&code, &(dim, _)) in &union {
        match stats.get(&Site::ALL[code]) {
            Some(h) => words.extend(h.to_words()),
            None => words.extend(HessianSum::new(dim).to_words()),
        }
    }
    ranks
        .all_reduce_i128(&mut words)
        .map_err(|e| collective("sums", e))?;
    stats.clear();
    let mut at = 0;
    for (&code, &(dim, _)) in &union {
        let n = 1 + dim * (dim + 1) / 2;
        let h = HessianSum::from_words(dim, &words[at..at + n])
            .map_err(|e| federation(format!("block {layer}: {e}")))?;
        stats.insert(Site::ALL[code], h);
        at += n;
    }
    Ok(())
}

/// A walk over the blocks: the forward pass, this rank's micro-batches as
/// they enter the next block, and what the blocks so far produced.
pub(crate) struct Walk {
    pub(crate) net: Net,
    pub(crate) batches: Vec<Batch>,
    /// The global index of each of `batches`.
    pub(crate) global: Vec<usize>,
    /// Samples (windows or sentences) of every micro-batch, by global index.
    pub(crate) all_samples: Vec<usize>,
    /// Output scalars (rows × hidden) of every micro-batch, by global index.
    pub(crate) all_elements: Vec<usize>,
    /// Distillation's targets: the original model's activations, carried
    /// beside the compressed model's, so that tuning a block also corrects
    /// the error the blocks before it left (sequential order with
    /// `distill:`; empty otherwise, where the block's outputs already are
    /// those activations or nothing is tuned).
    pub(crate) original: Vec<Tensor>,
    /// Each tensor's encoding, by model index, once its block is walked.
    pub(crate) done: Vec<Option<EncodedEntry>>,
    /// The calibrated tensors' figures, in the order they were encoded.
    pub(crate) figures: Vec<TensorFigure>,
    pub(crate) forward_seconds: f64,
    /// What distillation did to each block walked.
    pub(crate) distilled: Vec<BlockDistillation>,
}

/// A calibrated tensor's figures for the report's calibration section.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TensorFigure {
    /// Its number of values.
    pub(crate) params: f64,
    /// Weight SQNR (dB).
    pub(crate) weight_db: f64,
    /// Output SQNR on the calibration inputs (dB).
    pub(crate) output_db: f64,
}

impl Walk {
    /// A walk starting at the first block walked, over `batches` (whose
    /// global indices are `global`; `sizes` gives every micro-batch's).
    pub(crate) fn new(
        spec: &JobSpec,
        model: &Model,
        net: Net,
        batches: Vec<Batch>,
        global: Vec<usize>,
        sizes: &[BatchSize],
        original: Option<Vec<Tensor>>,
    ) -> Walk {
        let wants_original = spec.distill.is_some()
            && spec
                .calibration
                .as_ref()
                .is_some_and(|c| c.order == CalibrationOrder::Sequential);
        let original = match original {
            Some(o) => o,
            None if wants_original => batches.iter().map(|b| b.x.clone()).collect(),
            None => Vec::new(),
        };
        Walk {
            net,
            batches,
            global,
            all_samples: sizes.iter().map(|b| b.samples).collect(),
            all_elements: sizes.iter().map(|b| b.elements).collect(),
            original,
            done: (0..model.tensors.len()).map(|_| None).collect(),
            figures: Vec::new(),
            forward_seconds: 0.0,
            distilled: Vec::new(),
        }
    }
}

/// Walks the blocks: statistics from this rank's micro-batches, summed
/// over the ranks, then each block's calibrated tensors encoded.
fn calibrate_blocks<'a>(
    spec: &'a JobSpec,
    model: &Model,
    ranks: &mut dyn Collective,
    rank_sites: &[String],
) -> Result<Calibrated<'a>, PipelineError> {
    let cal = calibration_of(spec, model)?;
    let plans = plans_of(spec, model);
    let t_cal = Instant::now();
    let (net, tok) = load_net(spec, model, None)?;
    check_calibrated_tensors(&net, model, &plans)?;
    let Layout {
        local: batches,
        global,
        sizes,
        sites,
    } = layout(&net, &tok, model, cal, ranks, rank_sites)?;
    check_site_rows(&net, model, cal, &sites)?;
    let samples: usize = sizes.iter().map(|b| b.samples).sum();
    let tokens: usize = sizes.iter().map(|b| b.rows).sum();
    let end_to_end = spec.distill.as_ref().and_then(|d| d.end_to_end.as_ref());
    // End-to-end tuning starts again from the embedded windows.
    let inputs: Vec<Batch> = match (end_to_end, &net) {
        (None, _) => Vec::new(),
        (Some(_), Net::Decoder(_)) => batches
            .iter()
            .map(|b| Batch {
                x: b.x.clone(),
                windows: b.windows,
                len: b.len,
            })
            .collect(),
        (Some(_), Net::Encoder(_)) => {
            return Err(bad(
                model,
                "`distill.end_to_end` tunes a decoder against its next-token distributions; this model is an encoder".into(),
            ));
        }
    };
    let mut walk = Walk::new(spec, model, net, batches, global, &sizes, None);
    for layer in 0..walk.net.layers() {
        calibrate_block(spec, model, &plans, &mut walk, layer, ranks)?;
    }
    let end_to_end = match (end_to_end, &mut walk.net) {
        (Some(e), Net::Decoder(llama)) => {
            // The original model's final hidden states: carried beside the
            // compressed model's, or the walk's own with `order: original`.
            let teacher: Vec<Tensor> = if walk.original.is_empty() {
                walk.batches.iter().map(|b| b.x.clone()).collect()
            } else {
                walk.original.clone()
            };
            let data = MicroBatches {
                local: &inputs,
                global: &walk.global,
                targets: &teacher,
                samples: &walk.all_samples,
                elements: &walk.all_elements,
            };
            let round = stored_round(model);
            let tuning = tune_end_to_end(llama, e, spec.seed, &data, &round, ranks)?;
            tracing::info!(
                kl_before = tuning.before,
                kl_after = tuning.after,
                seconds = tuning.seconds,
                "tuned the norm gains end to end"
            );
            Some(tuning)
        }
        _ => None,
    };
    Ok(Calibrated {
        cal,
        plans,
        done: walk.done,
        figures: walk.figures,
        samples,
        tokens,
        forward_seconds: walk.forward_seconds,
        seconds: t_cal.elapsed().as_secs_f64(),
        distilled: walk.distilled,
        end_to_end,
    })
}

/// Maps a tuned tensor's values to what the artifact stores (its dtype).
fn stored_round(model: &Model) -> impl Fn(&str, Vec<f32>) -> Vec<f32> + '_ {
    let by_name: HashMap<&str, &crate::model::TensorInfo> =
        model.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    move |name: &str, values: Vec<f32>| match by_name.get(name) {
        Some(t) => raw_to_f32(&f32_to_bytes(&values, t.dtype), t.dtype),
        None => values,
    }
}

/// A group of one rank: the collective a single process calibrates with.
pub(crate) fn one_rank(
    during: &str,
) -> Result<hcx_kernels::collective::Ring<hcx_kernels::collective::local::LocalLink>, PipelineError>
{
    hcx_kernels::collective::local::group(1, 0)
        .map_err(|source| PipelineError::Collective {
            during: during.into(),
            source,
        })?
        .pop()
        .ok_or_else(|| PipelineError::Collective {
            during: during.into(),
            source: hcx_kernels::collective::CollectiveError::BadCall(
                "a group of one has no rank".into(),
            ),
        })
}

/// The job's calibration section.
pub(crate) fn calibration_of<'a>(
    spec: &'a JobSpec,
    model: &Model,
) -> Result<&'a Calibration, PipelineError> {
    spec.calibration
        .as_ref()
        .ok_or_else(|| bad(model, "the job has no `calibration:` section".into()))
}

/// Each tensor's stage chain, by model index.
pub(crate) fn plans_of(spec: &JobSpec, model: &Model) -> Vec<Vec<StageSpec>> {
    model
        .tensors
        .iter()
        .map(|t| spec.stages_for(&t.name))
        .collect()
}

/// Refuses a calibrated stage on a tensor that is not a block's linear
/// weight (no statistics are collected for it).
pub(crate) fn check_calibrated_tensors(
    net: &Net,
    model: &Model,
    plans: &[Vec<StageSpec>],
) -> Result<(), PipelineError> {
    for (t, plan) in model.tensors.iter().zip(plans) {
        if plan.iter().any(StageSpec::needs_calibration) && net.site_of(&t.name).is_none() {
            return Err(PipelineError::Tensor {
                tensor: t.name.clone(),
                source: hcx_kernels::KernelError::Meta {
                    stage: "gptq".into(),
                    why: "calibration statistics are collected for the blocks' linear weights only (attention projections and MLP); give this tensor another pipeline with a rule".into(),
                },
            });
        }
    }
    Ok(())
}

/// Adds one micro-batch's input `[rows, dim]` at `site` of block `layer`
/// to that site's sum H = Σ x xᵀ (the capture of a block's forward pass).
pub(crate) fn add_input(
    stats: &mut HashMap<Site, HessianSum>,
    layer: usize,
    site: Site,
    input: &Tensor,
) -> Result<(), hcx_forward::ForwardError> {
    let (rows, dim) = input.dims2()?;
    let values = input.flatten_all()?.to_vec1::<f32>()?;
    stats
        .entry(site)
        .or_insert_with(|| HessianSum::new(dim))
        .add_batch(&values, rows)
        .map_err(|e| hcx_forward::ForwardError::Weight {
            name: format!("block {layer}"),
            why: e.to_string(),
        })
}

/// Walks block `layer`: its inputs' statistics from this rank's
/// micro-batches summed over the ranks, its calibrated tensors encoded
/// (and, with `distill:`, its continuous parameters tuned), and the
/// micro-batches moved on to the block's output.
pub(crate) fn calibrate_block(
    spec: &JobSpec,
    model: &Model,
    plans: &[Vec<StageSpec>],
    walk: &mut Walk,
    layer: usize,
    ranks: &mut dyn Collective,
) -> Result<(), PipelineError> {
    let cal = calibration_of(spec, model)?;
    let Walk {
        net,
        batches,
        global,
        all_samples,
        all_elements,
        original,
        done,
        figures,
        forward_seconds,
        distilled,
    } = walk;
    // A tuned tensor's values as the artifact stores them (its dtype).
    let round = stored_round(model);
    let world = ranks.world();
    let t0 = Instant::now();
    // With `distill.params: [weights]` the block's weights are encoded a
    // site at a time, in the order the block reads them, and the sites not
    // yet encoded are tuned in between: each site's statistics are taken
    // only once the sites before it are encoded.
    let staged = spec
        .distill
        .as_ref()
        .is_some_and(|d| d.params.contains(&DistillParam::Weights));
    let mut stats: HashMap<Site, HessianSum> = HashMap::new();
    let mut outputs = Vec::with_capacity(batches.len());
    for b in batches.iter() {
        let mut capture = |site: Site, input: &Tensor| add_input(&mut stats, layer, site, input);
        let y = net
            .run(layer, b, &mut capture)
            .map_err(|e| forward_error(model, e))?;
        outputs.push(y);
    }
    for (o, b) in original.iter_mut().zip(batches.iter()) {
        let view = Batch {
            x: o.clone(),
            windows: b.windows,
            len: b.len,
        };
        *o = net
            .run(layer, &view, &mut |_, _| Ok(()))
            .map_err(|e| forward_error(model, e))?;
    }
    *forward_seconds += t0.elapsed().as_secs_f64();
    // The micro-batches, and the outputs every tuning of this block
    // matches: the original model's where the walk keeps them.
    let data = MicroBatches {
        local: batches,
        global,
        targets: if original.is_empty() {
            &outputs[..]
        } else {
            &original[..]
        },
        samples: all_samples,
        elements: all_elements,
    };
    // This block's linear weights, and the width of each input site.
    let members: Vec<usize> = model
        .tensors
        .iter()
        .enumerate()
        .filter(|(_, t)| net.site_of(&t.name).is_some_and(|(l, _)| l == layer))
        .map(|(i, _)| i)
        .collect();
    let member_sites: HashMap<usize, Site> = members
        .iter()
        .filter_map(|&k| Some((k, net.site_of(&model.tensors[k].name)?.1)))
        .collect();
    let site_of = |k: usize| member_sites.get(&k).copied();
    let dims: HashMap<Site, usize> = members
        .iter()
        .filter_map(|&k| Some((site_of(k)?, *model.tensors[k].shape.last()?)))
        .collect();
    // The groups encoded in turn: a site each when staged, else the block.
    let groups: Vec<Vec<usize>> = if staged {
        Site::ALL
            .iter()
            .map(|s| {
                members
                    .iter()
                    .copied()
                    .filter(|&k| site_of(k) == Some(*s))
                    .collect::<Vec<_>>()
            })
            .filter(|g| !g.is_empty())
            .collect()
    } else {
        vec![members.clone()]
    };
    let sequential = cal.order == CalibrationOrder::Sequential;
    if world > 1 {
        reduce_stats(&mut stats, &dims, layer, ranks)?;
    }
    let mut hessians: HashMap<Site, Vec<f64>> =
        stats.drain().map(|(s, h)| (s, h.to_f64())).collect();
    let encode_untuned = |k: usize, hessians: &HashMap<Site, Vec<f64>>| {
        let t = &model.tensors[k];
        let h = site_of(k).and_then(|s| hessians.get(&s));
        encode_raw_calibrated(
            &t.name,
            t.dtype,
            &t.shape,
            model.raw(t),
            &plans[k],
            spec.seed,
            h.map(Vec::as_slice),
        )
    };
    // Staged, the block's output error with every weight encoded as
    // calibration alone encodes it (each with the statistics of the block's
    // inputs, no tuning) is what the tuning is measured against; the first
    // site's encodings are the ones kept.
    let mut first: HashMap<usize, Encoded> = HashMap::new();
    let mut untuned_error = None;
    if staged {
        let encoded: Vec<(usize, Encoded)> = members
            .par_iter()
            .map(|&k| (k, encode_untuned(k, &hessians)))
            .collect();
        let mut saved = Vec::with_capacity(members.len());
        for (k, r) in encoded {
            let name = &model.tensors[k].name;
            if let Ok((_, Some(v))) = &r {
                let t = net.tensor(name).map_err(|e| forward_error(model, e))?;
                saved.push((name, t));
                net.set_weight(name, v.clone())
                    .map_err(|e| forward_error(model, e))?;
            }
            if groups.first().is_some_and(|g| g.contains(&k)) {
                first.insert(k, r);
            }
        }
        untuned_error = Some(output_error(net, layer, &data, ranks)?);
        for (name, t) in saved {
            net.set_tensor(name, t)
                .map_err(|e| forward_error(model, e))?;
        }
    }
    let mut decoded = Vec::new();
    let mut tuned_weights = 0;
    for (gi, group) in groups.iter().enumerate() {
        if gi > 0 {
            // This site's inputs as the block now gives them.
            let t1 = Instant::now();
            let sites: HashSet<Site> = group.iter().filter_map(|&k| site_of(k)).collect();
            stats.clear();
            for b in batches.iter() {
                let mut capture = |site: Site, input: &Tensor| {
                    if !sites.contains(&site) {
                        return Ok(());
                    }
                    add_input(&mut stats, layer, site, input)
                };
                net.run(layer, b, &mut capture)
                    .map_err(|e| forward_error(model, e))?;
            }
            *forward_seconds += t1.elapsed().as_secs_f64();
            if world > 1 {
                reduce_stats(&mut stats, &dims, layer, ranks)?;
            }
            hessians.extend(stats.drain().map(|(s, h)| (s, h.to_f64())));
        }
        // Encode the group's linear weights with their inputs' statistics
        // (a weight tuned by an earlier group's distillation as tuned).
        let sources: Vec<Option<Vec<f32>>> = group
            .iter()
            .map(|&k| {
                if gi == 0 {
                    return Ok(None);
                }
                let t = net
                    .tensor(&model.tensors[k].name)
                    .map_err(|e| forward_error(model, e))?;
                t.flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map(Some)
                    .map_err(|e| bad(model, e.to_string()))
            })
            .collect::<Result<_, PipelineError>>()?;
        let encoded: Vec<(usize, Encoded)> = if gi == 0 && staged {
            group
                .iter()
                .filter_map(|k| first.remove(k).map(|r| (*k, r)))
                .collect()
        } else {
            group
                .par_iter()
                .zip(sources)
                .map(|(&k, tuned)| {
                    let t = &model.tensors[k];
                    let h = site_of(k).and_then(|s| hessians.get(&s));
                    let h = h.map(Vec::as_slice);
                    let r = match tuned {
                        None => encode_untuned(k, &hessians),
                        Some(v) => encode_tuned_calibrated(
                            &t.name,
                            t.dtype,
                            &t.shape,
                            model.raw(t),
                            v,
                            &plans[k],
                            spec.seed,
                            h,
                        ),
                    };
                    (k, r)
                })
                .collect()
        };
        let mut group_decoded = Vec::new();
        for (k, r) in encoded {
            let (entry, values) = r?;
            if let Some(v) = values {
                group_decoded.push((k, v));
            }
            if let (Some(w), Some(o)) = (entry.entry.sqnr_db, entry.entry.output_sqnr_db) {
                figures.push(TensorFigure {
                    params: entry.entry.shape.iter().product::<usize>() as f64,
                    weight_db: w,
                    output_db: o,
                });
            }
            done[k] = Some(entry);
        }
        if !staged {
            decoded = group_decoded;
            continue;
        }
        for (k, v) in &group_decoded {
            net.set_weight(&model.tensors[*k].name, v.clone())
                .map_err(|e| forward_error(model, e))?;
        }
        decoded.extend(group_decoded);
        // The sites still in full precision make up for this one's error.
        let later: Vec<String> = groups[gi + 1..]
            .iter()
            .flatten()
            .map(|&k| model.tensors[k].name.clone())
            .collect();
        if let (Some(d), false) = (&spec.distill, later.is_empty()) {
            let phase = hcx_protocol::Distill {
                params: Vec::new(),
                ..d.clone()
            };
            let mut store = no_correction(layer);
            let identity = |_: &str, v: Vec<f32>| v;
            let report = distill_block(
                net, layer, &phase, spec.seed, &later, &data, &identity, &mut store, ranks,
            )?;
            // The first tuning takes every weight the later ones take.
            if gi == 0 {
                tuned_weights = report.params;
            }
            tracing::info!(
                layer,
                encoded = gi,
                before_db = report.before.sqnr_db(),
                after_db = report.after.sqnr_db(),
                seconds = report.seconds,
                "tuned the block's weights in full precision"
            );
        }
    }
    let corrects = spec.distill.as_ref().is_some_and(|d| {
        d.params
            .iter()
            .any(|p| matches!(p, DistillParam::Scales | DistillParam::LowrankCorrection))
    });
    // The decoded weights before any correction, which a correction's
    // record is measured against: by name, the tensor's index, its values
    // and its Hessian.
    type Uncorrected<'h> = (usize, Vec<f32>, Option<&'h Vec<f64>>);
    let mut uncorrected: HashMap<&str, Uncorrected<'_>> = HashMap::new();
    if sequential || spec.distill.is_some() {
        for (k, v) in decoded {
            let name = model.tensors[k].name.as_str();
            if corrects {
                let h = net.site_of(name).and_then(|(_, s)| hessians.get(&s));
                uncorrected.insert(name, (k, v.clone(), h));
            }
            net.set_weight(name, v)
                .map_err(|e| forward_error(model, e))?;
        }
    }
    if let Some(d) = &spec.distill {
        let mut store = |name: &str, c: &Correction| -> Result<Vec<f32>, PipelineError> {
            let (k, before, h) = uncorrected.get(name).ok_or_else(|| {
                bad(
                    model,
                    format!("`{name}` has no calibrated encoding to correct; give it a calibrated pipeline or leave `scales` and `lowrank_correction` out of `distill.params`"),
                )
            })?;
            let t = &model.tensors[*k];
            let e = done[*k]
                .as_mut()
                .ok_or_else(|| bad(model, format!("`{name}` was not encoded")))?;
            let original = raw_to_f32(model.raw(t), t.dtype);
            let out = add_correction(
                &mut e.entry.steps,
                &original,
                before,
                &t.shape,
                c,
                h.map(Vec::as_slice),
            )
            .map_err(|source| PipelineError::Tensor {
                tensor: name.to_string(),
                source,
            })?;
            for p in out.parts {
                e.entry.parts.push(PartEntry {
                    name: format!("{name}.{}", p.name),
                    dtype: p.dtype.name().into(),
                    shape: p.shape.clone(),
                    bytes: p.len() as u64,
                    header_bytes: 0,
                });
                e.data.push(p.data);
            }
            e.entry.sqnr_db = out.sqnr_db;
            e.entry.output_sqnr_db = out.output_sqnr_db;
            e.seconds.push(0.0);
            Ok(out.decoded)
        };
        let mut report = distill_block(
            net,
            layer,
            d,
            spec.seed,
            &[],
            &data,
            &round,
            &mut store,
            ranks,
        )?;
        if let Some(e) = untuned_error {
            report.before = e;
            report.params += tuned_weights;
        }
        // The block's tuning time, shared among its corrections by size.
        let sizes: Vec<(usize, f64)> = report
            .corrected
            .iter()
            .filter_map(|n| uncorrected.get(n.as_str()))
            .map(|(k, v, _)| (*k, v.len() as f64))
            .collect();
        let all: f64 = sizes.iter().map(|(_, n)| n).sum();
        for (k, n) in sizes {
            if let Some(last) = done[k].as_mut().and_then(|e| e.seconds.last_mut()) {
                *last = report.seconds * n / all.max(1.0);
            }
        }
        tracing::info!(
            layer,
            params = report.params,
            before_db = report.before.sqnr_db(),
            after_db = report.after.sqnr_db(),
            "distilled block"
        );
        distilled.push(report);
    }
    if sequential {
        let t1 = Instant::now();
        outputs.clear();
        for b in batches.iter() {
            let y = net
                .run(layer, b, &mut |_, _| Ok(()))
                .map_err(|e| forward_error(model, e))?;
            outputs.push(y);
        }
        *forward_seconds += t1.elapsed().as_secs_f64();
    }
    for (b, y) in batches.iter_mut().zip(outputs) {
        b.x = y;
    }
    tracing::info!(
        layer,
        seconds = t0.elapsed().as_secs_f64(),
        "calibrated block"
    );
    Ok(())
}

/// Runs a calibrated job on a decoder or encoder; the calibrated counterpart of the
/// plain local build. Entries come out in model order.
pub(crate) fn build_calibrated(
    spec: &JobSpec,
    model: &Model,
    tmp: &Path,
    started: Instant,
    ranks: &mut dyn Collective,
    rank_sites: &[String],
) -> Result<Attribution, PipelineError> {
    let calibrated = calibrate_blocks(spec, model, ranks, rank_sites)?;
    let (done, sections) = encode_calibrated(spec, model, calibrated, &|_| true)?;
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
    finish_artifact(
        spec, model, tmp, writer, entries, &seconds, started, &sections,
    )
}

/// Runs a calibrated job as one rank of a collective group and writes the
/// tensors named in `tensors` (this rank's shard) to a shard file at
/// `path`. Every rank walks all the blocks, since each block's statistics
/// and gradients are sums over every rank's micro-batches (and later blocks
/// need the earlier ones encoded), but only this rank's share of the other
/// tensors is encoded here. The report's calibration and distillation
/// sections travel in the shard's metadata for the merge. `rank_sites` is
/// as for [`run_job_ranked`].
pub fn encode_group_shard(
    spec: &JobSpec,
    ranks: &mut dyn Collective,
    rank_sites: &[String],
    tensors: &[String],
    path: &Path,
) -> Result<ShardSummary, PipelineError> {
    let model = Model::open(spec.model.read_path())?;
    let wanted: HashSet<&str> = tensors.iter().map(String::as_str).collect();
    let known: HashSet<&str> = model.tensors.iter().map(|t| t.name.as_str()).collect();
    if let Some(name) = tensors.iter().find(|n| !known.contains(n.as_str())) {
        return Err(bad(
            &model,
            format!("the shard names tensor `{name}`, which the model does not have"),
        ));
    }
    let layers = spec
        .calibration
        .as_ref()
        .is_some_and(|c| c.parallel == CalibrationParallel::Layers);
    let keep = |n: &str| wanted.contains(n);
    let (done, mut sections) = if layers {
        let calibrated = crate::stages::calibrate_stage(spec, &model, ranks, &wanted)?;
        encode_calibrated(spec, &model, calibrated, &keep)?
    } else {
        let calibrated = calibrate_blocks(spec, &model, ranks, rank_sites)?;
        encode_calibrated(spec, &model, calibrated, &keep)?
    };
    // With the model split by layer only the last stage has seen every
    // block: its shard carries the report's sections.
    if layers && ranks.rank() + 1 != ranks.world() {
        sections.clear();
    }
    let mut writer = ShardWriter::create(path)?;
    for (t, e) in model.tensors.iter().zip(done) {
        if !wanted.contains(t.name.as_str()) {
            continue;
        }
        let e = e.ok_or_else(|| bad(&model, format!("tensor `{}` was not encoded", t.name)))?;
        writer.add(e)?;
    }
    writer.finish(&sections)
}

/// The encodings of the tensors `keep` selects, by model index (the
/// blocks' calibrated tensors are always encoded: later blocks need them),
/// and the report's calibration (and distillation) sections.
fn encode_calibrated(
    spec: &JobSpec,
    model: &Model,
    calibrated: Calibrated<'_>,
    keep: &(dyn Fn(&str) -> bool + Sync),
) -> Result<(Vec<Option<EncodedEntry>>, Vec<ReportSection>), PipelineError> {
    let Calibrated {
        cal,
        plans,
        mut done,
        figures,
        samples,
        tokens,
        forward_seconds,
        seconds: calibration_seconds,
        distilled,
        end_to_end,
    } = calibrated;
    // Blocks another stage tuned carry their tensors' names only. End-to-end
    // tuning comes last and has the last word.
    let tuned: HashMap<&str, &Vec<f32>> = distilled
        .iter()
        .flat_map(|d| d.tuned.iter())
        .chain(end_to_end.iter().flat_map(|e| e.tuned.iter()))
        .filter(|(_, v)| !v.is_empty())
        .map(|(n, v)| (n.as_str(), v))
        .collect();
    // Everything outside the blocks, in bounded waves, without statistics.
    let rest: Vec<usize> = (0..model.tensors.len())
        .filter(|k| done[*k].is_none() && keep(&model.tensors[*k].name))
        .collect();
    let sizes: Vec<usize> = rest.iter().map(|k| model.tensors[*k].numel()).collect();
    for range in waves(&sizes) {
        let wave: Vec<(usize, Encoded)> = rest[range]
            .par_iter()
            .map(|&k| {
                let t = &model.tensors[k];
                // Distilled tensors are stored with their tuned values.
                let tuned_raw = tuned.get(t.name.as_str()).map(|v| f32_to_bytes(v, t.dtype));
                (
                    k,
                    encode_raw_calibrated(
                        &t.name,
                        t.dtype,
                        &t.shape,
                        tuned_raw.as_deref().unwrap_or_else(|| model.raw(t)),
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
    // Weight SQNR against output SQNR on the calibration inputs, over the
    // calibrated tensors (parameter-weighted means of per-tensor dB).
    let (mut wsum, mut osum, mut params) = (0f64, 0f64, 0f64);
    for f in &figures {
        wsum += f.weight_db * f.params;
        osum += f.output_db * f.params;
        params += f.params;
    }
    let (weight_db, output_db) = if params > 0.0 {
        (Some(wsum / params), Some(osum / params))
    } else {
        (None, None)
    };
    let order = match cal.order {
        CalibrationOrder::Sequential => "sequential",
        CalibrationOrder::Original => "original",
    };
    let db = |v: Option<f64>| v.map_or("-".to_string(), |d| format!("{d:.2} dB"));
    let section = ReportSection {
        key: "calibration".into(),
        markdown: format!(
            "## Calibration\n\n{samples} samples, {tokens} tokens, `order: {order}`; forward passes and statistics {forward_seconds:.1} s, calibration with encoding {calibration_seconds:.1} s.\n\nOver the calibrated tensors (parameter-weighted mean of per-tensor dB): weight SQNR {}, output SQNR on the calibration inputs, 10·log10(‖XW‖²/‖X(W − Ŵ)‖²), {}.\n",
            db(weight_db),
            db(output_db)
        ),
        json: serde_json::json!({
            "samples": samples,
            "tokens": tokens,
            "seq_len": cal.seq_len,
            "order": cal.order,
            "forward_seconds": forward_seconds,
            "seconds": calibration_seconds,
            "weight_sqnr_db": weight_db,
            "output_sqnr_db": output_db,
        }),
    };
    let mut sections = vec![section];
    if let Some(d) = &spec.distill {
        sections.push(distill_section(d, &distilled, end_to_end.as_ref()));
    }
    Ok((done, sections))
}

/// The report's account of distillation: each block's output error against
/// the original model on the calibration samples, before and after tuning.
fn distill_section(
    spec: &hcx_protocol::Distill,
    blocks: &[BlockDistillation],
    end_to_end: Option<&EndToEndTuning>,
) -> ReportSection {
    let params: Vec<&str> = spec.params.iter().map(|p| p.name()).collect();
    let mut md = format!(
        "## Distillation\n\nBlock by block after encoding: {} tuned with Adam (lr {}) for {} steps of {} samples, to match the original model's activations after the block on the calibration samples. Output SQNR = 10·log10(Σt²/Σ(y − t)²), the original model's activations t, the compressed model's y (so it includes the error of the blocks before).\n\n| block | tuned scalars | output SQNR before (dB) | after (dB) | seconds |\n|---:|---:|---:|---:|---:|\n",
        params.join(", "),
        spec.lr,
        spec.steps,
        spec.batch
    );
    for b in blocks {
        md.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.1} |\n",
            b.layer,
            b.params,
            b.before.sqnr_db(),
            b.after.sqnr_db(),
            b.seconds
        ));
    }
    if let (Some(e), Some(t)) = (&spec.end_to_end, end_to_end) {
        md.push_str(&format!(
            "\nThen end to end: the norm gains of every block and the final norm ({} scalars) tuned with Adam (lr {}) for {} steps of {} windows against the original model's next-token distributions. Mean KL(original ‖ compressed) per position of the calibration windows: {:.4} before, {:.4} after ({:.1} s).\n",
            t.params, e.lr, e.steps, e.batch, t.before, t.after, t.seconds
        ));
    }
    let json = serde_json::json!({
        "end_to_end": end_to_end.map(|t| serde_json::json!({
            "tuned_scalars": t.params,
            "kl_before": t.before,
            "kl_after": t.after,
            "seconds": t.seconds,
            "tuned_tensors": t.tuned.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        })),
        "steps": spec.steps,
        "lr": spec.lr,
        "batch": spec.batch,
        "params": params,
        "blocks": blocks.iter().map(|b| serde_json::json!({
            "block": b.layer,
            "tuned_scalars": b.params,
            "tuned_tensors": b.tuned.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            "corrected_weights": b.corrected,
            "output_sqnr_db_before": b.before.sqnr_db(),
            "output_sqnr_db_after": b.after.sqnr_db(),
            "squared_error_before": b.before.squared_error,
            "squared_error_after": b.after.squared_error,
            "seconds": b.seconds,
        })).collect::<Vec<_>>(),
    });
    ReportSection {
        key: "distill".into(),
        markdown: md,
        json,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hcx_kernels::collective::local;

    fn stats(dim: usize, seed: u32) -> HessianSum {
        let x: Vec<f32> = (0..3 * dim)
            .map(|i| ((i as u32 * 7 + seed) % 11) as f32 - 5.0)
            .collect();
        let mut h = HessianSum::new(dim);
        h.add_batch(&x, 3).unwrap();
        h
    }

    /// Runs `reduce_stats` on two in-process ranks that announce the given
    /// widths for the attention input, against a model whose width is 4.
    fn reduce(widths: [usize; 2]) -> Vec<Result<HashMap<Site, HessianSum>, String>> {
        let dims: HashMap<Site, usize> = [(Site::Attention, 4)].into();
        let rings = local::group(2, 1).unwrap();
        std::thread::scope(|s| {
            let handles: Vec<_> = rings
                .into_iter()
                .zip(widths)
                .enumerate()
                .map(|(r, (mut ring, w))| {
                    let dims = &dims;
                    s.spawn(move || {
                        let mut st: HashMap<Site, HessianSum> =
                            [(Site::Attention, stats(w, r as u32))].into();
                        reduce_stats(&mut st, dims, 3, &mut ring)
                            .map(|()| st)
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn ranks_statistics_add_up_and_a_width_the_model_lacks_is_refused() {
        let mut want = stats(4, 0);
        want.merge(&stats(4, 1)).unwrap();
        for got in reduce([4, 4]) {
            assert_eq!(got.unwrap()[&Site::Attention], want);
        }
        // A rank announcing a wider input (which would make every rank
        // allocate for it) is refused on every rank, naming it.
        for got in reduce([4, 4000]) {
            let e = got.unwrap_err();
            assert!(
                e.contains("block 3: rank 1 sent statistics of 4000 columns"),
                "{e}"
            );
        }
    }
}
