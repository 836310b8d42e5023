//! The job spec: what an operator writes in `job.yaml`.
//!
//! Parsing is strict: unknown fields are errors, and every error names the
//! file, the line and column, and the field. [`JobSpec::parse`] is the entry
//! point; it parses, resolves relative paths against the job file's folder
//! and runs [`JobSpec::validate`].

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::stage::{StageCategory, StageSpec};

/// A compression job: a model, where the artifact goes, and the stages that
/// compress each tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Short name of the job, used in reports.
    pub name: String,
    /// Seed of every random choice (rotations, k-means starts, sketches);
    /// combined with each tensor's name.
    #[serde(default)]
    pub seed: u64,
    /// The source model: a folder in Hugging Face layout (`config.json` plus
    /// one or more `*.safetensors`, sharded with `model.safetensors.index.json`)
    /// or a single `.safetensors` or `.gguf` file. Relative to the job file.
    /// `model: {path: P, shared: true}` says every coordinator reads it at P.
    pub model: ModelRef,
    /// Folder the artifact is written to. Relative to the job file.
    pub output: PathBuf,
    /// Stages applied to every tensor no rule matches.
    pub pipeline: Vec<StageSpec>,
    /// Per-tensor overrides, first match wins.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Calibration data: inputs whose activations calibration-aware stages
    /// (`gptq`) are fitted to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    /// Block-wise distillation after the calibrated stages: each block's
    /// continuous parameters are tuned so that the compressed block's
    /// outputs match the original block's on the calibration activations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<Distill>,
    /// How a cluster run places shards on nodes (ignored by `run --local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Quality floors the finished artifact must meet, measured against
    /// the source model at its output; a miss fails the job with the
    /// measured value, or raises the rate and runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gates: Option<Gates>,
    /// A rate target instead of a recipe: the `uniform` stage of the
    /// default pipeline gets a rate per tensor, chosen so that the artifact
    /// meets the target at the least total squared error. Resolved into
    /// per-tensor rules before the job runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
}

/// What a job's `target` asks for: one of the two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Average bits per weight over the tensors the default pipeline
    /// compresses (their parts, headers and manifest entries counted, as
    /// `inspect` counts them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits_per_weight: Option<f64>,
    /// The whole artifact on disk (tensor file and manifest): `25MB`,
    /// `60 MiB`, or bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// Which error the allocation minimises: the weights' own squared error
    /// (the default), or each linear's output error on the job's
    /// calibration inputs (`outputs`, which needs a `calibration:` section).
    #[serde(default, skip_serializing_if = "TargetError::is_weights")]
    pub error: TargetError,
}

/// The error a target's allocation minimises, summed over the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TargetError {
    /// ‖W − Ŵ‖², the weight's squared error.
    #[default]
    Weights,
    /// tr((W − Ŵ) H (W − Ŵ)ᵀ) with H = E[x xᵀ] of the tensor's inputs on
    /// the calibration data: the mean squared error of its outputs. Tensors
    /// outside the blocks (no statistics) count their weight error times
    /// the blocks' mean input energy per channel.
    Outputs,
}

impl TargetError {
    fn is_weights(&self) -> bool {
        *self == TargetError::Weights
    }
}

impl Target {
    /// The size target in bytes, when the target is a size.
    pub fn size_bytes(&self) -> Option<Result<u64, String>> {
        self.size.as_deref().map(parse_size)
    }

    fn validate(&self, pipeline: &[StageSpec], calibrated: bool) -> Result<(), (String, String)> {
        match (self.bits_per_weight, &self.size) {
            (Some(_), Some(_)) | (None, None) => {
                return Err((
                    "target".into(),
                    "give one of bits_per_weight and size".into(),
                ));
            }
            (Some(b), None) if !(b.is_finite() && b > 0.0 && b <= 16.0) => {
                return Err((
                    "target.bits_per_weight".into(),
                    format!("{b} is not in (0, 16]"),
                ));
            }
            (None, Some(_)) => {
                if let Some(Err(e)) = self.size_bytes() {
                    return Err(("target.size".into(), e));
                }
            }
            _ => {}
        }
        if self.error == TargetError::Outputs && !calibrated {
            return Err((
                "target.error".into(),
                "`outputs` weighs each tensor's error by its inputs on the calibration data: add a `calibration:` section, or leave `error` out (the weights' error)".into(),
            ));
        }
        if calibrated && pipeline.iter().any(StageSpec::needs_calibration) {
            return Err((
                "target".into(),
                "the default pipeline has a `gptq` stage: a target measures each tensor's error curve with the pipeline's own stages on a sample of rows, which a calibrated stage cannot run on; use `uniform` there (the calibration statistics then weight the curves) and `gptq` in rules".into(),
            ));
        }
        if !pipeline.iter().any(|s| matches!(s, StageSpec::Uniform(_))) {
            return Err((
                "target".into(),
                "the default pipeline has no `uniform` stage, whose rate a target chooses per tensor".into(),
            ));
        }
        Ok(())
    }
}

/// Parses a size such as `5GB`, `500MB`, `2GiB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 5GB, 500MB, 2GiB, 1000000)"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    let v = n * mult;
    if !(v >= 1.0 && v.is_finite()) {
        return Err(format!("`{s}` is not a positive size"));
    }
    Ok(v as u64)
}

/// Quality floors checked once the artifact is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    /// Encoders: the least mean cosine between the source's and the
    /// artifact's sentence embeddings over the project's evaluation
    /// sentences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cosine: Option<f64>,
    /// Decoders: the most mean KL divergence (nats) from the source's
    /// next-token distribution to the artifact's, on held-out text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_kl: Option<f64>,
    /// Decoders: the most relative perplexity increase on held-out text
    /// (0.05: at most 5 % above the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_perplexity_increase: Option<f64>,
    /// What a miss does.
    #[serde(default)]
    pub on_miss: OnMiss,
    /// With `raise_rate`: at most this many raises before the job fails.
    #[serde(default = "default_max_raises")]
    pub max_raises: u32,
    /// Decoders: held-out tokens compared, in windows of 256.
    #[serde(default = "default_gate_tokens")]
    pub tokens: usize,
}

fn default_max_raises() -> u32 {
    3
}

fn default_gate_tokens() -> usize {
    2048
}

/// What a job whose artifact misses a gate does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnMiss {
    /// The job fails, naming the gate and the measured value.
    #[default]
    Fail,
    /// Every quantizer goes one rate step up (a bit more per code) and the
    /// job runs again, up to `max_raises` times.
    RaiseRate,
}

impl Gates {
    fn validate(&self) -> Result<(), (String, String)> {
        let at = |f: &str| format!("gates.{f}");
        if self.min_cosine.is_none()
            && self.max_kl.is_none()
            && self.max_perplexity_increase.is_none()
        {
            return Err((
                "gates".into(),
                "give at least one of min_cosine, max_kl, max_perplexity_increase".into(),
            ));
        }
        if let Some(c) = self.min_cosine
            && !(c > 0.0 && c <= 1.0)
        {
            return Err((at("min_cosine"), format!("{c} is not in (0, 1]")));
        }
        if let Some(k) = self.max_kl
            && !(k.is_finite() && k > 0.0)
        {
            return Err((at("max_kl"), format!("{k} is not a positive number")));
        }
        if let Some(p) = self.max_perplexity_increase
            && !(p.is_finite() && p >= 0.0)
        {
            return Err((
                at("max_perplexity_increase"),
                format!("{p} is not 0 or more"),
            ));
        }
        if self.min_cosine.is_some()
            && (self.max_kl.is_some() || self.max_perplexity_increase.is_some())
        {
            return Err((
                "gates".into(),
                "min_cosine is for encoders, max_kl and max_perplexity_increase for decoders: a model is one or the other".into(),
            ));
        }
        if !(1..=8).contains(&self.max_raises) {
            return Err((
                at("max_raises"),
                format!("{} is not in 1..=8", self.max_raises),
            ));
        }
        if !(256..=1 << 20).contains(&self.tokens) {
            return Err((
                at("tokens"),
                format!("{} is not in 256..=1048576", self.tokens),
            ));
        }
        Ok(())
    }
}

/// Where calibration activations come from and how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Decoders: UTF-8 text file(s), tokenized and cut into windows of
    /// `seq_len` tokens. Relative to the job file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<Files>,
    /// Encoders (e.g. MiniLM): sentence file(s), one sentence a line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentences: Option<Files>,
    /// A federated run: one calibration source per site, by site name
    /// (the `site` a node's certificate gives it). Each site's files are
    /// read only by that site's nodes, as text windows for a decoder and
    /// sentences for an encoder; only statistic sums, counts and gradients
    /// leave a site. Instead of `text` or `sentences`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub sites: std::collections::BTreeMap<String, Files>,
    /// Let a site calibrate with fewer input rows (tokens) than the widest
    /// calibrated layer's input: its summed statistics could then reveal
    /// its inputs, so this is refused unless set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_small_sites: bool,
    /// Windows (decoders) or sentences (encoders) used; with `sites`, per
    /// site.
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// Tokens per window (decoders) or at most per sentence (encoders).
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Calibration files sent to the cluster, which `submit` sets when the
    /// coordinators cannot read them in place: each `text` or `sentences`
    /// file by the path the job names, with its content's SHA-256 and
    /// length. A group's nodes read the cluster's copy. A site's files are
    /// never sent: they stay at their site.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sent: Vec<SentFile>,
    /// Whose activations each layer is calibrated on.
    #[serde(default)]
    pub order: CalibrationOrder,
    /// How a group of nodes shares the work.
    #[serde(default, skip_serializing_if = "CalibrationParallel::is_data")]
    pub parallel: CalibrationParallel,
}

fn default_samples() -> usize {
    128
}

impl Calibration {
    /// Every file the section names (`text`, `sentences` and each site's).
    pub fn files(&self) -> impl Iterator<Item = &Files> {
        [&self.text, &self.sentences]
            .into_iter()
            .flatten()
            .chain(self.sites.values())
    }

    /// As [`Calibration::files`], to change them.
    pub fn files_mut(&mut self) -> impl Iterator<Item = &mut Files> {
        [&mut self.text, &mut self.sentences]
            .into_iter()
            .flatten()
            .chain(self.sites.values_mut())
    }

    /// The files read on a cluster's shared storage or sent to it (`text`
    /// or `sentences`); a site's files are read only at that site.
    pub fn shared_files(&self) -> impl Iterator<Item = &Files> {
        [&self.text, &self.sentences].into_iter().flatten()
    }

    /// As [`Calibration::shared_files`], to change them.
    pub fn shared_files_mut(&mut self) -> impl Iterator<Item = &mut Files> {
        [&mut self.text, &mut self.sentences].into_iter().flatten()
    }

    /// Whether this is a federated run (`sites`).
    pub fn is_federated(&self) -> bool {
        !self.sites.is_empty()
    }
}

/// Whether `name` can name a node or a site: 1 to 128 ASCII letters,
/// digits, `.`, `_` or `-` (what a node certificate can carry).
pub fn valid_certified_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn default_seq_len() -> usize {
    256
}

/// Whose activations a layer's statistics are taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CalibrationOrder {
    /// The inputs flow through the layers already quantized, so each layer
    /// corrects the error of the ones before it (the default).
    #[default]
    Sequential,
    /// Every layer sees the original model's activations (one pass; layers
    /// are independent).
    Original,
}

/// How the nodes of a calibrated job's group share the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CalibrationParallel {
    /// Every node holds the whole model and runs every block over its share
    /// of the calibration micro-batches; statistics and gradients are
    /// summed across the nodes (the default).
    #[default]
    Data,
    /// Each node holds only the blocks of its own shard (a contiguous run
    /// of layers) and runs every micro-batch through them; the activations
    /// flow from the node holding layers [a, b) to the one holding [b, c).
    /// For models larger than one node's memory. Not with `sites` (the
    /// activations would leave their site).
    Layers,
}

impl CalibrationParallel {
    /// Whether this is the default, data-parallel split.
    pub fn is_data(&self) -> bool {
        *self == CalibrationParallel::Data
    }
}

/// Block-wise distillation: after a block's linear weights are encoded, its
/// continuous parameters are tuned with Adam for `steps` steps of `batch`
/// calibration samples to minimise the mean squared error between the
/// original block's outputs and the compressed block's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Distill {
    /// Optimiser steps per block.
    #[serde(default = "default_distill_steps")]
    pub steps: usize,
    /// Adam's learning rate.
    #[serde(default = "default_distill_lr")]
    pub lr: f64,
    /// Calibration samples (sentences or windows) per step; rounded up to
    /// whole micro-batches.
    #[serde(default = "default_distill_batch")]
    pub batch: usize,
    /// Which parameters are tuned.
    #[serde(default = "default_distill_params")]
    pub params: Vec<DistillParam>,
    /// Rank of each linear weight's low-rank correction
    /// (`lowrank_correction`).
    #[serde(default = "default_distill_rank")]
    pub rank: usize,
    /// Adam's learning rate for the linear weights themselves (`weights`),
    /// which are far larger than the gains `lr` suits.
    #[serde(default = "default_distill_weights_lr")]
    pub weights_lr: f64,
    /// After the walk, every norm gain (the blocks' and the final norm's)
    /// tuned together against the original model's next-token
    /// distributions (decoders only).
    #[serde(default)]
    pub end_to_end: Option<EndToEnd>,
}

/// End-to-end tuning: once every block is encoded (and tuned block by
/// block), the norm gains of the whole model are tuned together with Adam
/// to minimise KL(original ‖ compressed) of the next-token distributions on
/// the calibration windows, which is what the model is judged by; the
/// block-wise objective only matches each block's activations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EndToEnd {
    /// Optimiser steps.
    #[serde(default = "default_end_to_end_steps")]
    pub steps: usize,
    /// Adam's learning rate.
    #[serde(default = "default_end_to_end_lr")]
    pub lr: f64,
    /// Calibration windows per step; rounded up to whole micro-batches.
    #[serde(default = "default_end_to_end_batch")]
    pub batch: usize,
}

fn default_end_to_end_steps() -> usize {
    50
}

fn default_end_to_end_lr() -> f64 {
    1e-4
}

fn default_end_to_end_batch() -> usize {
    8
}

fn default_distill_weights_lr() -> f64 {
    1e-4
}

fn default_distill_rank() -> usize {
    4
}

fn default_distill_steps() -> usize {
    100
}

fn default_distill_lr() -> f64 {
    1e-3
}

fn default_distill_batch() -> usize {
    16
}

fn default_distill_params() -> Vec<DistillParam> {
    vec![DistillParam::Norms, DistillParam::Offsets]
}

/// A kind of continuous block parameter distillation can tune.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DistillParam {
    /// Normalisation gains (and LayerNorm shifts): stored as the source
    /// stores them, so tuning them costs no bits.
    Norms,
    /// The linear layers' additive per-output terms (their biases), where
    /// the model has them.
    Offsets,
    /// A gain per output row and per input column of each quantized
    /// linear weight, stored in f16 beside its codes.
    Scales,
    /// A low-rank term A·B (`distill.rank`) added to each quantized linear
    /// weight, stored in f16 beside its codes.
    LowrankCorrection,
    /// The block's linear weights while they are still in full precision:
    /// the block's weights are encoded a group at a time in the order the
    /// block uses them (attention inputs, attention output, MLP inputs,
    /// MLP output), and after each group the groups not yet encoded are
    /// tuned to make up for its error, then calibrated on the inputs the
    /// block now gives them and encoded in turn. Costs no bits.
    Weights,
}

impl DistillParam {
    /// The name as a job file writes it.
    pub fn name(self) -> &'static str {
        match self {
            DistillParam::Norms => "norms",
            DistillParam::Offsets => "offsets",
            DistillParam::Scales => "scales",
            DistillParam::LowrankCorrection => "lowrank_correction",
            DistillParam::Weights => "weights",
        }
    }
}

/// One file or a list of files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Files {
    /// A single file.
    One(PathBuf),
    /// Several files, read in order.
    Many(Vec<PathBuf>),
}

impl Files {
    /// The paths as a slice.
    pub fn as_slice(&self) -> &[PathBuf] {
        match self {
            Files::One(p) => std::slice::from_ref(p),
            Files::Many(v) => v,
        }
    }

    /// Makes relative paths relative to `base` (the job file's folder).
    pub fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        match self {
            Files::One(p) => fix(p),
            Files::Many(v) => v.iter_mut().for_each(fix),
        }
    }

    /// Replaces every path with what `f` makes of it, stopping at the
    /// first error (used to confine paths to allowed roots).
    pub fn try_map<E>(&mut self, mut f: impl FnMut(&Path) -> Result<PathBuf, E>) -> Result<(), E> {
        match self {
            Files::One(p) => *p = f(p)?,
            Files::Many(v) => {
                for p in v {
                    *p = f(p)?;
                }
            }
        }
        Ok(())
    }
}

/// A per-tensor override: tensors whose name matches `match` get `pipeline`
/// or are kept as they are (`keep`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Glob pattern(s) on tensor names (`*` matches dots too).
    #[serde(rename = "match")]
    pub patterns: Patterns,
    /// The stages for matching tensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<Vec<StageSpec>>,
    /// Keep matching tensors instead, optionally converted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<Keep>,
}

/// Where a cluster run may put a job's shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Only nodes carrying every one of these labels (`site: a`) get shards.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Consecutive layers per shard (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_per_shard: Option<u32>,
}

/// One glob or a list of globs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Patterns {
    /// A single glob.
    One(String),
    /// Any of several globs.
    Many(Vec<String>),
}

impl Patterns {
    /// The globs as a slice.
    pub fn as_slice(&self) -> &[String] {
        match self {
            Patterns::One(s) => std::slice::from_ref(s),
            Patterns::Many(v) => v,
        }
    }
}

/// How a kept tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// Byte for byte as in the source.
    Source,
    /// Converted to IEEE half precision.
    F16,
    /// Converted to bfloat16.
    Bf16,
    /// Converted to f32.
    F32,
    /// Symmetric 8-bit integers with one f16 scale per row.
    Int8,
}

impl Keep {
    /// The stage chain that implements this keep mode (empty for `source`).
    pub fn stages(self) -> Vec<StageSpec> {
        use crate::stage::{CastDtype, CastSpec, RtnSpec};
        match self {
            Keep::Source => Vec::new(),
            Keep::F16 => vec![StageSpec::Cast(CastSpec {
                dtype: CastDtype::F16,
            })],
            Keep::Bf16 => vec![StageSpec::Cast(CastSpec {
                dtype: CastDtype::Bf16,
            })],
            Keep::F32 => vec![StageSpec::Cast(CastSpec {
                dtype: CastDtype::F32,
            })],
            Keep::Int8 => vec![StageSpec::Rtn(RtnSpec {
                bits: 8,
                group: None,
                symmetric: true,
                search: false,
            })],
        }
    }
}

/// Where in a job file something is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The job file.
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
        }
    }
}

/// Why a job file was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The file could not be read.
    #[error("{}: cannot read job file", path.display())]
    Read {
        /// The job file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed or does not fit the schema.
    #[error("{place}: {message}")]
    Syntax {
        /// Where.
        place: Place,
        /// What is wrong, as the parser says it.
        message: String,
    },
    /// The YAML parsed but a field's value is not acceptable.
    #[error("{place}: field `{field}`: {message}")]
    Invalid {
        /// Where (the field's line when known).
        place: Place,
        /// Path of the field, e.g. `rules[2].pipeline[0].rtn.bits`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl JobSpec {
    /// Reads, parses and validates a job file; relative paths in it are
    /// resolved against the file's folder.
    pub fn load(path: &Path) -> Result<JobSpec, JobError> {
        let text = std::fs::read_to_string(path).map_err(|source| JobError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        JobSpec::parse(&text, path, base)
    }

    /// Parses and validates job YAML. `file` names the source in errors;
    /// `base` is the folder relative paths resolve against.
    pub fn parse(text: &str, file: &Path, base: &Path) -> Result<JobSpec, JobError> {
        let mut spec: JobSpec = serde_saphyr::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            JobError::Syntax {
                place: Place {
                    file: file.to_path_buf(),
                    line,
                    column,
                },
                message: parser_message(&e.to_string()),
            }
        })?;
        spec.validate()
            .map_err(|(field, message)| JobError::Invalid {
                place: locate_field(text, file, &field),
                field,
                message,
            })?;
        if spec.model.path.is_relative() {
            spec.model.path = base.join(&spec.model.path);
        }
        if spec.output.is_relative() {
            spec.output = base.join(&spec.output);
        }
        if let Some(c) = &mut spec.calibration {
            for f in c.files_mut() {
                f.resolve(base);
            }
        }
        Ok(spec)
    }

    /// Checks values the schema cannot: stage order, parameter ranges, globs.
    /// Returns the field path and what is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.name.trim().is_empty() {
            return Err(("name".into(), "must not be empty".into()));
        }
        if let Some(g) = &self.gates {
            g.validate()?;
        }
        if let Some(t) = &self.target {
            t.validate(&self.pipeline, self.calibration.is_some())?;
        }
        if let Some(d) = &self.distill {
            if self.calibration.is_none() {
                return Err((
                    "distill".into(),
                    "distillation tunes blocks on calibration activations: add a `calibration:` section".into(),
                ));
            }
            if d.steps == 0 && d.end_to_end.is_none() {
                return Err((
                    "distill.steps".into(),
                    "must be at least 1 (0, no block-wise tuning, only with `end_to_end`)".into(),
                ));
            }
            if let Some(e) = &d.end_to_end {
                if e.steps == 0 {
                    return Err((
                        "distill.end_to_end.steps".into(),
                        "must be at least 1".into(),
                    ));
                }
                if !(e.lr.is_finite() && e.lr > 0.0 && e.lr <= 1.0) {
                    return Err((
                        "distill.end_to_end.lr".into(),
                        format!("{} is not in (0, 1]", e.lr),
                    ));
                }
                if e.batch == 0 {
                    return Err((
                        "distill.end_to_end.batch".into(),
                        "must be at least 1".into(),
                    ));
                }
                if self
                    .calibration
                    .as_ref()
                    .is_some_and(|c| c.parallel == CalibrationParallel::Layers)
                {
                    return Err((
                        "distill.end_to_end".into(),
                        "tunes the whole model at once, which `calibration.parallel: layers` splits over nodes; use the default data-parallel split".into(),
                    ));
                }
            }
            if !(d.lr.is_finite() && d.lr > 0.0 && d.lr <= 1.0) {
                return Err(("distill.lr".into(), format!("{} is not in (0, 1]", d.lr)));
            }
            if !(d.weights_lr.is_finite() && d.weights_lr > 0.0 && d.weights_lr <= 1.0) {
                return Err((
                    "distill.weights_lr".into(),
                    format!("{} is not in (0, 1]", d.weights_lr),
                ));
            }
            if d.batch == 0 {
                return Err(("distill.batch".into(), "must be at least 1".into()));
            }
            if d.params.is_empty() {
                return Err((
                    "distill.params".into(),
                    "name at least one of norms, offsets, scales, lowrank_correction, weights"
                        .into(),
                ));
            }
            if d.params.contains(&DistillParam::LowrankCorrection)
                && !(1..=crate::stage::MAX_CORRECTION_RANK).contains(&d.rank)
            {
                return Err((
                    "distill.rank".into(),
                    format!(
                        "{} is not in 1..={}",
                        d.rank,
                        crate::stage::MAX_CORRECTION_RANK
                    ),
                ));
            }
            for (i, p) in d.params.iter().enumerate() {
                if d.params[..i].contains(p) {
                    return Err((
                        format!("distill.params[{i}]"),
                        format!("`{}` is named twice", p.name()),
                    ));
                }
            }
        }
        if let Some(c) = &self.calibration {
            let sources = usize::from(c.text.is_some())
                + usize::from(c.sentences.is_some())
                + usize::from(c.is_federated());
            if sources != 1 {
                return Err((
                    "calibration".into(),
                    format!(
                        "give one of `text` (decoders), `sentences` (encoders) or `sites` (a federated run){}",
                        if sources > 1 { ", not several" } else { "" }
                    ),
                ));
            }
            c.validate_sent()
                .map_err(|m| ("calibration.sent".to_string(), m))?;
            for (site, f) in &c.sites {
                if !valid_certified_name(site) {
                    return Err((
                        format!("calibration.sites.{site}"),
                        "a site name is 1 to 128 ASCII letters, digits, `.`, `_` or `-`".into(),
                    ));
                }
                if f.as_slice().is_empty() {
                    return Err((
                        format!("calibration.sites.{site}"),
                        "the file list is empty".into(),
                    ));
                }
            }
            if c.files().any(|f| f.as_slice().is_empty()) {
                return Err(("calibration".into(), "the file list is empty".into()));
            }
            if c.parallel == CalibrationParallel::Layers && c.is_federated() {
                return Err((
                    "calibration.parallel".into(),
                    "`layers` passes activations from node to node, which a federated run must not let leave a site: use `data` with `sites`".into(),
                ));
            }
            if c.allow_small_sites && !c.is_federated() {
                return Err((
                    "calibration.allow_small_sites".into(),
                    "applies to a federated run: give `sites`".into(),
                ));
            }
            if c.samples == 0 {
                return Err(("calibration.samples".into(), "must be at least 1".into()));
            }
            if !(2..=1 << 16).contains(&c.seq_len) {
                return Err((
                    "calibration.seq_len".into(),
                    format!("{} is not in 2..=65536", c.seq_len),
                ));
            }
        } else {
            let calibrated = |p: &[StageSpec]| p.iter().any(StageSpec::needs_calibration);
            let needs = calibrated(&self.pipeline)
                || self
                    .rules
                    .iter()
                    .any(|r| r.pipeline.as_deref().is_some_and(calibrated));
            if needs {
                return Err((
                    "calibration".into(),
                    "the pipeline has a `gptq` stage, which needs calibration data: add a `calibration:` section with `text:` (decoders) or `sentences:` (encoders)".into(),
                ));
            }
        }
        if let Some(p) = &self.placement {
            if p.layers_per_shard == Some(0) {
                return Err((
                    "placement.layers_per_shard".into(),
                    "must be at least 1".into(),
                ));
            }
            if let Some(k) = p.labels.keys().find(|k| k.is_empty()) {
                return Err((format!("placement.labels.{k}"), "empty label key".into()));
            }
        }
        if self.model.path.as_os_str().is_empty() {
            return Err((
                "model".into(),
                "must name a folder, a .safetensors or a .gguf file".into(),
            ));
        }
        if let Some(sent) = &self.model.sent {
            if self.model.shared {
                return Err((
                    "model.shared".into(),
                    "a shared model is read in place, not sent".into(),
                ));
            }
            sent.validate().map_err(|m| ("model.sent".to_string(), m))?;
        }
        if self.output.as_os_str().is_empty() {
            return Err(("output".into(), "must name a folder".into()));
        }
        validate_chain(&self.pipeline, "pipeline")?;
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            if rule.patterns.as_slice().is_empty() {
                return Err((format!("{at}.match"), "needs at least one glob".into()));
            }
            for (j, p) in rule.patterns.as_slice().iter().enumerate() {
                if let Err(e) = globset::Glob::new(p) {
                    return Err((format!("{at}.match[{j}]"), format!("bad glob `{p}`: {e}")));
                }
            }
            match (&rule.pipeline, &rule.keep) {
                (Some(_), Some(_)) => {
                    return Err((at, "give either `pipeline` or `keep`, not both".into()));
                }
                (None, None) => return Err((at, "give `pipeline` or `keep`".into())),
                (Some(p), None) => validate_chain(p, &format!("{at}.pipeline"))?,
                (None, Some(_)) => {}
            }
        }
        Ok(())
    }

    /// The job with every quantizer `times` rate steps up (see
    /// [`StageSpec::raised`]; one already at its highest stays there), in
    /// the default pipeline and every rule's; `None` when some step could
    /// raise nothing. `keep` rules are left as they are.
    pub fn raised_rate(&self, times: u32) -> Option<JobSpec> {
        let mut spec = self.clone();
        for _ in 0..times {
            let mut changed = false;
            let mut raise = |chain: &mut Vec<StageSpec>| {
                for st in chain.iter_mut() {
                    if let Some(up) = st.raised()
                        && up != *st
                    {
                        *st = up;
                        changed = true;
                    }
                }
            };
            raise(&mut spec.pipeline);
            for r in &mut spec.rules {
                if let Some(p) = &mut r.pipeline {
                    raise(p);
                }
            }
            if !changed {
                return None;
            }
        }
        Some(spec)
    }

    /// The blobs the job's inputs travelled as (SHA-256, bytes): its sent
    /// model's files and its sent calibration files.
    pub fn sent_blobs(&self) -> Vec<(&str, u64)> {
        let mut out: Vec<(&str, u64)> = Vec::new();
        if let Some(m) = &self.model.sent {
            out.extend(m.files.iter().map(|f| (f.sha256.as_str(), f.bytes)));
        }
        if let Some(c) = &self.calibration {
            out.extend(c.sent.iter().map(|f| (f.sha256.as_str(), f.bytes)));
        }
        out
    }

    /// The stages for a tensor name: the first matching rule's, or the
    /// default pipeline. Integer tensors are copied by the caller whatever
    /// this says.
    pub fn stages_for(&self, tensor: &str) -> Vec<StageSpec> {
        for rule in &self.rules {
            let hit = rule.patterns.as_slice().iter().any(|p| {
                globset::GlobBuilder::new(p)
                    .literal_separator(false)
                    .build()
                    .map(|g| g.compile_matcher().is_match(tensor))
                    .unwrap_or(false)
            });
            if hit {
                return match (&rule.pipeline, rule.keep) {
                    (Some(p), _) => p.clone(),
                    (None, Some(k)) => k.stages(),
                    (None, None) => self.pipeline.clone(),
                };
            }
        }
        self.pipeline.clone()
    }
}

/// Checks that a chain reads transforms, decompositions, one quantizer,
/// entropy coders, in that order, with valid parameters.
pub fn validate_chain(chain: &[StageSpec], at: &str) -> Result<(), (String, String)> {
    let mut last = StageCategory::Transform;
    let mut quantizers = 0;
    let mut seen: Vec<&'static str> = Vec::new();
    let mut ends_signal = false;
    for (i, stage) in chain.iter().enumerate() {
        let field = format!("{at}[{i}].{}", stage.kind());
        if let StageSpec::Correction(_) = stage {
            return Err((
                field,
                "`correction` steps are written by distillation, not named in a pipeline: ask for them with `distill: {params: [scales]}` (or `lowrank_correction`)".into(),
            ));
        }
        stage.validate().map_err(|(f, m)| {
            if f.is_empty() {
                (field.clone(), m)
            } else {
                (format!("{field}.{f}"), m)
            }
        })?;
        if seen.contains(&stage.kind()) {
            return Err((field, format!("stage `{}` appears twice", stage.kind())));
        }
        seen.push(stage.kind());
        let cat = stage.category();
        if cat < last {
            return Err((
                field,
                format!(
                    "a {} stage cannot follow a {} stage (order: transforms, decompositions, one quantizer, entropy coders)",
                    cat.name(),
                    last.name()
                ),
            ));
        }
        if cat == StageCategory::Quantizer {
            quantizers += 1;
            if ends_signal {
                return Err((field, "nothing is left to quantize: the low-rank stage drops its residual (keep_residual: false)".into()));
            }
        }
        if let StageSpec::Lowrank(l) = stage
            && !l.keep_residual
        {
            ends_signal = true;
        }
        if let StageSpec::Uniform(_) = stage
            && !chain
                .iter()
                .any(|s| s.category() == crate::stage::StageCategory::Entropy)
        {
            return Err((
                field,
                "the uniform quantizer writes one byte per code and needs an entropy coder after it (add `- rans: {}` or `- zstd: {}`)".into(),
            ));
        }
        last = cat;
    }
    if quantizers == 0 && !ends_signal && !chain.is_empty() {
        return Err((
            at.to_string(),
            "needs exactly one quantizer (cast, rtn, uniform, nonuniform, ternary, seedlm, vq) or a low-rank stage with keep_residual: false".into(),
        ));
    }
    Ok(())
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// The parser's message without what the error's place already says: its
/// own `error:` tag and `line N column M:` prefix.
fn parser_message(s: &str) -> String {
    let mut m = first_line(s);
    if let Some(rest) = m.strip_prefix("error: ") {
        m = rest.to_string();
    }
    if let Some(rest) = m.strip_prefix("line ")
        && let Some((pos, tail)) = rest.split_once(": ")
        && pos
            .split(" column ")
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    {
        m = tail.to_string();
    }
    m
}

/// Best-effort location of a field path such as `rules[1].pipeline[0].rtn.bits`
/// in the YAML text: the line of the deepest key that can be found in order.
fn locate_field(text: &str, file: &Path, field: &str) -> Place {
    let mut line_no = 0usize;
    let mut col = 0usize;
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0usize;
    for segment in field.split('.') {
        let (key, index) = match segment.find('[') {
            Some(p) => (
                &segment[..p],
                segment[p + 1..segment.len().saturating_sub(1)]
                    .parse::<usize>()
                    .ok(),
            ),
            None => (segment, None),
        };
        let found = (from..lines.len()).find(|&i| {
            let t = lines[i].trim_start().trim_start_matches("- ").trim_start();
            t.starts_with(&format!("{key}:"))
                || t.starts_with(&format!("{key} :"))
                || t.starts_with(&format!("{{{key}:"))
        });
        let Some(mut i) = found else { break };
        line_no = i + 1;
        col = lines[i].find(key).map(|c| c + 1).unwrap_or(1);
        if let Some(n) = index {
            // Walk to the n-th list item after the key.
            let mut count = 0usize;
            let mut j = i + 1;
            let mut hit = None;
            while j < lines.len() {
                if lines[j].trim_start().starts_with("- ") || lines[j].trim() == "-" {
                    if count == n {
                        hit = Some(j);
                        break;
                    }
                    count += 1;
                }
                j += 1;
            }
            match hit {
                Some(j) => {
                    i = j;
                    line_no = j + 1;
                    col = lines[j].find('-').map(|c| c + 1).unwrap_or(1);
                }
                None => break,
            }
        }
        from = i;
    }
    Place {
        file: file.to_path_buf(),
        line: line_no as u64,
        column: col as u64,
    }
}

/// The source model of a job: where it is, and whether the coordinators read
/// it there or it was sent to the cluster.
///
/// In YAML either a path (`model: minilm`) or a map
/// (`model: {path: minilm, shared: true}`). A plain path is read in place
/// when the leader can read it inside its `--model-root`; otherwise
/// `hcx-cluster submit` sends the files to the cluster (`sent`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(into = "ModelRefRepr")]
pub struct ModelRef {
    /// The model folder or file, as the job names it (relative to the job
    /// file until [`JobSpec::parse`] resolves it).
    pub path: PathBuf,
    /// Every coordinator (and, for calibrated jobs, every node) reads the
    /// model at `path` itself: it is never sent.
    pub shared: bool,
    /// The files `submit` sent to the cluster, by content; the
    /// coordinators then read these rather than `path`.
    pub sent: Option<SentModel>,
    /// Where this machine reads a sent model (its files laid out locally);
    /// never written out, so `path` stays what the job named.
    pub local: Option<PathBuf>,
}

/// A model sent to the cluster: its files by content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SentModel {
    /// The files, sorted by name.
    pub files: Vec<BlobFile>,
    /// The model was this one of the files (a `.safetensors` or `.gguf`
    /// file; the others lay beside it and a run copies them into the
    /// artifact) rather than the folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// One file held in the cluster as a blob: of a sent model, or of an
/// artifact kept in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlobFile {
    /// Its name in its folder (no `/`).
    pub name: String,
    /// SHA-256 of its bytes, lowercase hex.
    pub sha256: String,
    /// Its length in bytes.
    pub bytes: u64,
}

impl SentModel {
    /// Checks names and hashes: plain, distinct names and 64-hex digests.
    pub fn validate(&self) -> Result<(), String> {
        if self.files.is_empty() {
            return Err("a sent model needs at least one file".into());
        }
        if let Some(file) = &self.file
            && !self.files.iter().any(|f| &f.name == file)
        {
            return Err(format!("the model file {file:?} is not among its files"));
        }
        for (i, f) in self.files.iter().enumerate() {
            if f.name.is_empty()
                || f.name.contains('/')
                || f.name.contains('\\')
                || f.name == "."
                || f.name == ".."
            {
                return Err(format!("file name {:?} is not a plain name", f.name));
            }
            if !is_sha256_hex(&f.sha256) {
                return Err(format!(
                    "file {:?}: {:?} is not a SHA-256 in lowercase hex",
                    f.name, f.sha256
                ));
            }
            if i > 0 && self.files[i - 1].name >= f.name {
                return Err(format!(
                    "files must be sorted by name and distinct: {:?} then {:?}",
                    self.files[i - 1].name,
                    f.name
                ));
            }
        }
        Ok(())
    }

    /// A digest of the whole file list: names a folder where the files are
    /// laid out, the same on every machine.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(format!("{}\n", self.file.as_deref().unwrap_or("/")).as_bytes());
        for f in &self.files {
            h.update(format!("{} {} {}\n", f.sha256, f.bytes, f.name).as_bytes());
        }
        hex_lower(&h.finalize())
    }

    /// Total bytes of its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// A calibration file sent to the cluster: the path the job names, and
/// its content by SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SentFile {
    /// The path as the job names it (absolute once submitted).
    pub path: PathBuf,
    /// SHA-256 of its bytes, lowercase hex.
    pub sha256: String,
    /// Its length in bytes.
    pub bytes: u64,
}

impl Calibration {
    /// Checks the sent files: each one of the job's `text` or `sentences`
    /// files, named once, with a SHA-256 in lowercase hex; and, once any
    /// is sent, every such file sent.
    pub fn validate_sent(&self) -> Result<(), String> {
        if self.sent.is_empty() {
            return Ok(());
        }
        let shared: Vec<&PathBuf> = self.shared_files().flat_map(|f| f.as_slice()).collect();
        for (i, f) in self.sent.iter().enumerate() {
            if !shared.contains(&&f.path) {
                return Err(format!(
                    "sent file {} is not among the job's `text` or `sentences` files",
                    f.path.display()
                ));
            }
            if !is_sha256_hex(&f.sha256) {
                return Err(format!(
                    "sent file {}: {:?} is not a SHA-256 in lowercase hex",
                    f.path.display(),
                    f.sha256
                ));
            }
            if self.sent[..i].iter().any(|g| g.path == f.path) {
                return Err(format!("sent file {} is named twice", f.path.display()));
            }
        }
        if let Some(missing) = shared
            .iter()
            .find(|p| !self.sent.iter().any(|f| &f.path == **p))
        {
            return Err(format!(
                "{} is not sent though other calibration files are",
                missing.display()
            ));
        }
        Ok(())
    }

    /// Where a sent calibration file lies on this machine once fetched:
    /// `dir`/its SHA-256, the same path for every job that sends it.
    pub fn sent_path(dir: &Path, f: &SentFile) -> PathBuf {
        dir.join(&f.sha256)
    }
}

/// Whether `s` is 64 lowercase hex digits (a SHA-256 as we write it).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How a [`ModelRef`] is written: a bare path, or a map.
#[derive(Serialize, JsonSchema)]
#[serde(untagged)]
enum ModelRefRepr {
    /// `model: path`.
    Path(PathBuf),
    /// `model: {path: ..., shared: true}`.
    Full(ModelRefMap),
}

/// The map form of `model:`.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ModelRefMap {
    /// The model folder or file.
    path: PathBuf,
    /// Read in place by every coordinator and node; never sent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    shared: bool,
    /// Set by `submit`: the files it sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sent: Option<SentModel>,
}

impl<'de> Deserialize<'de> for ModelRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ModelRef, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = ModelRef;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a model path, or a map {path, shared}")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ModelRef, E> {
                Ok(ModelRef::at(v))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<ModelRef, A::Error> {
                let m =
                    ModelRefMap::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(ModelRef {
                    path: m.path,
                    shared: m.shared,
                    sent: m.sent,
                    local: None,
                })
            }
        }
        d.deserialize_any(Visit)
    }
}

impl From<ModelRef> for ModelRefRepr {
    fn from(m: ModelRef) -> ModelRefRepr {
        if !m.shared && m.sent.is_none() {
            ModelRefRepr::Path(m.path)
        } else {
            ModelRefRepr::Full(ModelRefMap {
                path: m.path,
                shared: m.shared,
                sent: m.sent,
            })
        }
    }
}

impl JsonSchema for ModelRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ModelRef".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        ModelRefRepr::json_schema(generator)
    }
}

impl ModelRef {
    /// A model at `path`, neither shared nor sent.
    pub fn at(path: impl Into<PathBuf>) -> ModelRef {
        ModelRef {
            path: path.into(),
            shared: false,
            sent: None,
            local: None,
        }
    }

    /// Where to open the model on this machine: the local copy of a sent
    /// model, else `path`.
    pub fn read_path(&self) -> &Path {
        self.local.as_deref().unwrap_or(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<JobSpec, JobError> {
        JobSpec::parse(y, Path::new("job.yaml"), Path::new("/base"))
    }

    const GOOD: &str = "name: t\nseed: 7\nmodel: m\noutput: out\npipeline:\n  - hadamard: {}\n  - rtn: {bits: 4, group: 128}\n  - zstd: {}\nrules:\n  - match: [\"*LayerNorm*\", \"*.bias\"]\n    keep: source\n  - match: \"embeddings.*\"\n    keep: int8\n";

    #[test]
    fn good_job_parses_and_resolves_paths() {
        let j = parse(GOOD).unwrap();
        assert_eq!(j.model, ModelRef::at("/base/m"));
        assert_eq!(j.output, PathBuf::from("/base/out"));
        assert_eq!(j.pipeline.len(), 3);
        assert_eq!(
            j.stages_for("encoder.layer.0.output.LayerNorm.weight"),
            vec![]
        );
        assert_eq!(
            j.stages_for("embeddings.word_embeddings.weight"),
            Keep::Int8.stages()
        );
        assert_eq!(j.stages_for("encoder.layer.0.output.dense.weight").len(), 3);
    }

    #[test]
    fn unknown_field_names_line_and_column() {
        let y = "name: t\nmodel: m\noutput: o\npipeline: []\nbogus: 1\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(e.contains("job.yaml:5:"), "{e}");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn unknown_stage_parameter_is_refused() {
        let y = "name: t\nmodel: m\noutput: o\npipeline:\n  - rtn: {bits: 4, grup: 64}\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(e.contains("grup"), "{e}");
        assert!(e.contains("job.yaml:5:"), "{e}");
    }

    #[test]
    fn bad_value_names_the_field_and_line() {
        let y =
            "name: t\nmodel: m\noutput: o\npipeline:\n  - hadamard: {}\n  - rtn:\n      bits: 12\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(e.contains("pipeline[1].rtn.bits"), "{e}");
        assert!(e.contains("job.yaml:7:7"), "{e}");
    }

    #[test]
    fn placement_parses_and_is_checked() {
        let y = "name: t\nmodel: m\noutput: o\npipeline: []\nplacement:\n  labels: {site: b}\n  layers_per_shard: 2\n";
        let p = parse(y).unwrap().placement.unwrap();
        assert_eq!(p.labels.get("site").map(String::as_str), Some("b"));
        assert_eq!(p.layers_per_shard, Some(2));
        let y = "name: t\nmodel: m\noutput: o\npipeline: []\nplacement:\n  layers_per_shard: 0\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(e.contains("placement.layers_per_shard"), "{e}");
        let y = "name: t\nmodel: m\noutput: o\npipeline: []\nplacement:\n  site: b\n";
        assert!(parse(y).is_err(), "unknown placement fields are refused");
    }

    #[test]
    fn end_to_end_tuning_parses_and_is_checked() {
        let cal = "calibration:\n  text: t.txt\n";
        let job =
            |d: &str| format!("name: t\nmodel: m\noutput: o\npipeline: []\n{cal}distill: {d}\n");
        let d = parse(&job("{steps: 0, end_to_end: {}}"))
            .unwrap()
            .distill
            .unwrap();
        assert_eq!(d.steps, 0, "no block-wise tuning");
        let e = d.end_to_end.unwrap();
        assert_eq!((e.steps, e.lr, e.batch), (50, 1e-4, 8));
        let d = parse(&job("{end_to_end: {steps: 7, lr: 0.002, batch: 16}}"))
            .unwrap()
            .distill
            .unwrap();
        assert_eq!(
            d.end_to_end,
            Some(EndToEnd {
                steps: 7,
                lr: 0.002,
                batch: 16
            })
        );
        let e = parse(&job("{steps: 0}")).unwrap_err().to_string();
        assert!(
            e.contains("distill.steps") && e.contains("end_to_end"),
            "{e}"
        );
        for (d, field) in [
            ("{end_to_end: {steps: 0}}", "distill.end_to_end.steps"),
            ("{end_to_end: {lr: 2}}", "distill.end_to_end.lr"),
            ("{end_to_end: {batch: 0}}", "distill.end_to_end.batch"),
        ] {
            let e = parse(&job(d)).unwrap_err().to_string();
            assert!(e.contains(field), "{d}: {e}");
        }
        let e = parse(&job("{end_to_end: {step: 3}}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("step"), "{e}");
        let y = "name: t\nmodel: m\noutput: o\npipeline: []\ncalibration:\n  text: t.txt\n  parallel: layers\ndistill: {end_to_end: {}}\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(
            e.contains("distill.end_to_end") && e.contains("parallel: layers"),
            "{e}"
        );
    }

    #[test]
    fn distill_section_parses_and_is_checked() {
        let cal = "calibration:\n  sentences: s.txt\n";
        let y = format!("name: t\nmodel: m\noutput: o\npipeline: []\n{cal}distill: {{steps: 3}}\n");
        let d = parse(&y).unwrap().distill.unwrap();
        assert_eq!((d.steps, d.lr, d.batch), (3, 1e-3, 16));
        assert_eq!(d.params, vec![DistillParam::Norms, DistillParam::Offsets]);
        let y = "name: t\nmodel: m\noutput: o\npipeline: []\ndistill:\n  steps: 3\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(e.contains("add a `calibration:` section"), "{e}");
        assert!(e.contains("job.yaml:5:"), "{e}");
        let y = format!(
            "name: t\nmodel: m\noutput: o\npipeline: []\n{cal}distill:\n  params: [norms, scales, lowrank_correction]\n  rank: 8\n"
        );
        let d = parse(&y).unwrap().distill.unwrap();
        assert_eq!(d.rank, 8);
        assert_eq!(d.params[1], DistillParam::Scales);
        let y = format!(
            "name: t\nmodel: m\noutput: o\npipeline: []\n{cal}distill:\n  params: [lowrank_correction]\n  rank: 0\n"
        );
        let e = parse(&y).unwrap_err().to_string();
        assert!(
            e.contains("distill.rank") && e.contains("0 is not in 1..=256"),
            "{e}"
        );
        // Corrections are distillation's to write, not a pipeline's.
        let y = "name: t\nmodel: m\noutput: o\npipeline:\n  - correction: {rows: true}\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(
            e.contains("pipeline[0].correction") && e.contains("written by distillation"),
            "{e}"
        );
        let y = format!(
            "name: t\nmodel: m\noutput: o\npipeline: []\n{cal}distill:\n  params: [norms, norms]\n"
        );
        assert!(parse(&y).unwrap_err().to_string().contains("named twice"));
        let y = format!("name: t\nmodel: m\noutput: o\npipeline: []\n{cal}distill: {{lr: 0}}\n");
        assert!(parse(&y).unwrap_err().to_string().contains("distill.lr"));
        let y = format!(
            "name: t\nmodel: m\noutput: o\npipeline: []\n{cal}distill: {{params: [weights, norms]}}\n"
        );
        let d = parse(&y).unwrap().distill.unwrap();
        assert_eq!(d.params[0], DistillParam::Weights);
        assert_eq!(d.weights_lr, 1e-4);
        let y = format!(
            "name: t\nmodel: m\noutput: o\npipeline: []\n{cal}distill: {{params: [weights], weights_lr: 2}}\n"
        );
        let e = parse(&y).unwrap_err().to_string();
        assert!(
            e.contains("distill.weights_lr") && e.contains("2 is not in (0, 1]"),
            "{e}"
        );
        let y = format!("name: t\nmodel: m\noutput: o\npipeline: []\n{cal}distill: {{step: 3}}\n");
        assert!(parse(&y).is_err(), "unknown distill fields are refused");
        let y = "name: t\nmodel: m\noutput: o\npipeline: []\ndistillation:\n  steps: 3\n";
        assert!(parse(y).is_err(), "the old name is an unknown field");
    }

    #[test]
    fn calibration_section_parses_and_is_checked() {
        let y = "name: t\nmodel: m\noutput: o\npipeline: []\ncalibration:\n  text: [a.txt, /abs/b.txt]\n  samples: 4\n";
        let s = parse(y).unwrap();
        let c = s.calibration.unwrap();
        assert_eq!(c.samples, 4);
        assert_eq!(c.seq_len, 256);
        assert_eq!(c.order, CalibrationOrder::Sequential);
        let files = c.text.unwrap();
        assert!(
            files.as_slice()[0].is_absolute(),
            "relative paths resolve against the job file"
        );
        assert_eq!(files.as_slice()[1], PathBuf::from("/abs/b.txt"));
        let y = "name: t\nmodel: m\noutput: o\npipeline: []\ncalibration:\n  file: x\n";
        assert!(parse(y).is_err(), "unknown calibration fields are refused");
        let y = "name: t\nmodel: m\noutput: o\npipeline: []\ncalibration:\n  samples: 3\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(e.contains("give one of `text`"), "{e}");
        let y =
            "name: t\nmodel: m\noutput: o\npipeline: []\ncalibration:\n  text: a\n  seq_len: 1\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(e.contains("calibration.seq_len"), "{e}");
        let y = "name: t\nmodel: m\noutput: o\npipeline:\n  - gptq: {grid: {uniform: {bits: 4}}}\n  - zstd: {}\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(e.contains("needs calibration data"), "{e}");
    }

    #[test]
    fn federated_calibration_names_one_source_per_site() {
        let head = "name: t\nmodel: m\noutput: o\npipeline: []\ncalibration:\n";
        let y = format!("{head}  sites:\n    b: b.txt\n    a: [a1.txt, /abs/a2.txt]\n");
        let c = parse(&y).unwrap().calibration.unwrap();
        assert!(c.is_federated() && !c.allow_small_sites);
        assert_eq!(c.sites.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert!(c.sites["b"].as_slice()[0].is_absolute());
        assert_eq!(c.sites["a"].as_slice()[1], PathBuf::from("/abs/a2.txt"));
        assert_eq!(c.files().count(), 2);
        // It round-trips through the JSON a cluster carries.
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Calibration>(&json).unwrap(), c);
        let y = format!("{head}  sites: {{a: a.txt}}\n  allow_small_sites: true\n");
        assert!(parse(&y).unwrap().calibration.unwrap().allow_small_sites);
        // Sites are instead of `text` / `sentences`.
        let y = format!("{head}  text: t.txt\n  sites: {{a: a.txt}}\n");
        let e = parse(&y).unwrap_err().to_string();
        assert!(e.contains("not several"), "{e}");
        let y = format!("{head}  sites: {{\"a b\": a.txt}}\n");
        let e = parse(&y).unwrap_err().to_string();
        assert!(e.contains("calibration.sites.a b"), "{e}");
        let y = format!("{head}  sites: {{a: []}}\n");
        let e = parse(&y).unwrap_err().to_string();
        assert!(
            e.contains("calibration.sites.a") && e.contains("empty"),
            "{e}"
        );
        let y = format!("{head}  text: t.txt\n  allow_small_sites: true\n");
        let e = parse(&y).unwrap_err().to_string();
        assert!(e.contains("calibration.allow_small_sites"), "{e}");
    }

    #[test]
    fn sent_calibration_files_are_the_jobs_own_and_all_of_them() {
        let head = "name: t\nmodel: m\noutput: o\npipeline: []\ncalibration:\n  text: [/d/a.txt, /d/b.txt]\n";
        let sha = "ab".repeat(32);
        let sent = |p: &str, h: &str| format!("    - {{path: {p}, sha256: \"{h}\", bytes: 3}}\n");
        let y = format!(
            "{head}  sent:\n{}{}",
            sent("/d/a.txt", &sha),
            sent("/d/b.txt", &sha)
        );
        let j = parse(&y).unwrap();
        let c = j.calibration.as_ref().unwrap();
        assert_eq!(c.sent.len(), 2);
        assert_eq!(
            Calibration::sent_path(Path::new("/w"), &c.sent[0]),
            PathBuf::from(format!("/w/{sha}"))
        );
        assert_eq!(j.sent_blobs(), vec![(sha.as_str(), 3), (sha.as_str(), 3)]);
        let json = serde_json::to_string(c).unwrap();
        assert_eq!(&serde_json::from_str::<Calibration>(&json).unwrap(), c);
        // Only the job's own files, each once, all of them, by SHA-256.
        for (body, why) in [
            (sent("/d/c.txt", &sha), "not among the job's"),
            (sent("/d/a.txt", &sha), "/d/b.txt is not sent"),
            (
                format!("{}{}", sent("/d/a.txt", &sha), sent("/d/a.txt", &sha)),
                "named twice",
            ),
            (
                format!("{}{}", sent("/d/a.txt", "AB"), sent("/d/b.txt", &sha)),
                "not a SHA-256",
            ),
        ] {
            let e = parse(&format!("{head}  sent:\n{body}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("calibration.sent") && e.contains(why), "{e}");
        }
    }

    #[test]
    fn calibration_splits_by_data_or_by_layer() {
        let head = "name: t\nmodel: m\noutput: o\npipeline: []\ncalibration:\n";
        let c = parse(&format!("{head}  text: t.txt\n")).unwrap();
        assert_eq!(c.calibration.unwrap().parallel, CalibrationParallel::Data);
        let c = parse(&format!("{head}  text: t.txt\n  parallel: layers\n")).unwrap();
        let c = c.calibration.unwrap();
        assert_eq!(c.parallel, CalibrationParallel::Layers);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Calibration>(&json).unwrap(), c);
        let e = parse(&format!("{head}  text: t.txt\n  parallel: pipes\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("7:13") && e.contains("`pipes`, expected one of data, layers"),
            "{e}"
        );
        // Activations must not leave a federated site.
        let e = parse(&format!(
            "{head}  sites: {{a: a.txt}}\n  parallel: layers\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("calibration.parallel"), "{e}");
    }

    #[test]
    fn targets_parse_and_are_checked() {
        let base = "name: t\nmodel: m.safetensors\noutput: out\npipeline:\n  - hadamard: {}\n  - uniform: {bits: 4}\n  - zstd: {level: 3}\n";
        let parse = |text: &str| JobSpec::parse(text, Path::new("t.yaml"), Path::new("/j"));
        let j = parse(&format!("{base}target: {{bits_per_weight: 3.0}}\n")).unwrap();
        assert_eq!(j.target.unwrap().bits_per_weight, Some(3.0));
        let j = parse(&format!("{base}target: {{size: 60MB}}\n")).unwrap();
        assert_eq!(j.target.unwrap().size_bytes(), Some(Ok(60_000_000)));
        for (bad, field) in [
            ("target: {}\n", "target"),
            ("target: {bits_per_weight: 3, size: 1MB}\n", "target"),
            ("target: {bits_per_weight: 0}\n", "target.bits_per_weight"),
            ("target: {size: 12 parsecs}\n", "target.size"),
        ] {
            let e = parse(&format!("{base}{bad}")).unwrap_err().to_string();
            assert!(e.contains(field), "{bad}: {e}");
        }
        // A pipeline without `uniform` has no rate to choose.
        let rtn = base.replace("uniform: {bits: 4}", "rtn: {bits: 4}");
        let e = parse(&format!("{rtn}target: {{bits_per_weight: 3}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("uniform"), "{e}");
        // With calibration the statistics weight the curves; a calibrated
        // stage in the default pipeline cannot run on a sample of rows.
        let cal = "calibration: {sentences: s.txt, samples: 8}\n";
        let j = parse(&format!("{base}{cal}target: {{bits_per_weight: 3}}\n")).unwrap();
        assert_eq!(j.target.unwrap().error, TargetError::Weights);
        let j = parse(&format!(
            "{base}{cal}target: {{bits_per_weight: 3, error: outputs}}\n"
        ))
        .unwrap();
        assert_eq!(j.target.unwrap().error, TargetError::Outputs);
        let e = parse(&format!(
            "{base}target: {{bits_per_weight: 3, error: outputs}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("target.error") && e.contains("calibration"),
            "{e}"
        );
        let gptq = base.replace("uniform: {bits: 4}", "gptq: {grid: {uniform: {bits: 4}}}");
        let e = parse(&format!("{gptq}{cal}target: {{bits_per_weight: 3}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("the default pipeline has a `gptq` stage"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn sizes_parse_to_their_bytes(n in 1u64..1_000_000, unit in proptest::sample::select(vec![("", 1u64), ("B", 1), ("KB", 1000), ("MB", 1_000_000), ("KiB", 1024), ("MiB", 1 << 20), ("GiB", 1 << 30)])) {
            proptest::prop_assert_eq!(parse_size(&format!("{n}{}", unit.0)), Ok(n * unit.1));
            proptest::prop_assert_eq!(parse_size(&format!(" {n} {} ", unit.0)), Ok(n * unit.1));
        }

        #[test]
        fn size_parsing_never_panics(s in ".{0,16}") {
            let _ = parse_size(&s);
        }
    }

    #[test]
    fn gates_parse_are_checked_and_raise_the_rate() {
        let base = "name: g\nmodel: m.safetensors\noutput: out\npipeline:\n  - hadamard: {}\n  - rtn: {bits: 3}\n  - zstd: {level: 3}\nrules:\n  - {match: ['*emb*'], pipeline: [{uniform: {bits: 7.5}}, {zstd: {level: 3}}]}\n";
        let parse = |extra: &str| {
            JobSpec::parse(
                &format!("{base}{extra}"),
                Path::new("g.yaml"),
                Path::new("/j"),
            )
        };
        let j = parse("gates: {min_cosine: 0.98, on_miss: raise_rate, max_raises: 2}\n").unwrap();
        let g = j.gates.clone().unwrap();
        assert_eq!(
            (g.min_cosine, g.on_miss, g.max_raises, g.tokens),
            (Some(0.98), OnMiss::RaiseRate, 2, 2048)
        );
        assert_eq!(
            parse("gates: {max_kl: 0.05}\n")
                .unwrap()
                .gates
                .unwrap()
                .on_miss,
            OnMiss::Fail
        );
        for (bad, field) in [
            ("gates: {}\n", "gates"),
            ("gates: {min_cosine: 1.5}\n", "gates.min_cosine"),
            ("gates: {max_kl: -1}\n", "gates.max_kl"),
            ("gates: {min_cosine: 0.9, max_kl: 0.1}\n", "gates"),
            ("gates: {max_kl: 0.1, max_raises: 0}\n", "gates.max_raises"),
            ("gates: {max_kl: 0.1, tokens: 10}\n", "gates.tokens"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(field), "{bad}: {e}");
        }
        assert!(parse("gates: {max_kl: 0.1, on_miss: retry}\n").is_err());
        // One raise: a bit more for every quantizer; the transform and the
        // entropy coder stay; a rate at its top stays there.
        let up = j.raised_rate(1).unwrap();
        assert_eq!(
            up.pipeline[1],
            StageSpec::Rtn(crate::stage::RtnSpec {
                bits: 4,
                ..rtn_of(&j.pipeline[1])
            })
        );
        assert_eq!(up.pipeline[0], j.pipeline[0]);
        assert_eq!(up.pipeline[2], j.pipeline[2]);
        let StageSpec::Uniform(u) = &up.rules[0].pipeline.as_ref().unwrap()[0] else {
            panic!()
        };
        assert_eq!(u.bits, 8.0);
        assert_eq!(j.raised_rate(0).unwrap(), j);
        // rtn 3 reaches 8 after five raises; a sixth has nothing to raise.
        assert!(j.raised_rate(5).is_some());
        assert!(j.raised_rate(6).is_none());
        let ternary = JobSpec::parse(
            "name: t\nmodel: m.safetensors\noutput: o\npipeline: [{ternary: {}}]\n",
            Path::new("t.yaml"),
            Path::new("/j"),
        )
        .unwrap();
        assert!(ternary.raised_rate(1).is_none());
    }

    fn rtn_of(s: &StageSpec) -> crate::stage::RtnSpec {
        match s {
            StageSpec::Rtn(r) => r.clone(),
            _ => panic!("not rtn"),
        }
    }

    #[test]
    fn stage_order_is_checked() {
        let y = "name: t\nmodel: m\noutput: o\npipeline:\n  - rtn: {bits: 4}\n  - hadamard: {}\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(e.contains("cannot follow"), "{e}");
        let y = "name: t\nmodel: m\noutput: o\npipeline:\n  - hadamard: {}\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(e.contains("exactly one quantizer"), "{e}");
    }

    #[test]
    fn malformed_yaml_has_a_place() {
        let y = "name: t\nmodel: [unclosed\n";
        let e = parse(y).unwrap_err();
        assert!(matches!(e, JobError::Syntax { .. }));
        assert!(e.to_string().starts_with("job.yaml:"), "{e}");
    }

    #[test]
    fn errors_say_the_place_once() {
        let y = "name: t\nmodel: m\noutput: o\npipeline:\n  - bogus: {}\n";
        let e = parse(y).unwrap_err().to_string();
        assert!(e.starts_with("job.yaml:5:"), "{e}");
        assert!(!e.contains("line 5"), "{e}");
        assert!(!e.contains("error:"), "{e}");
        let missing = JobSpec::load(Path::new("/nonexistent/job.yaml")).unwrap_err();
        let text = missing.to_string();
        assert_eq!(text, "/nonexistent/job.yaml: cannot read job file");
        // The I/O error is the source, printed once by whoever walks the chain.
        let cause = std::error::Error::source(&missing).unwrap().to_string();
        assert!(cause.contains("No such file"), "{cause}");
    }

    #[test]
    fn a_model_is_a_path_or_a_map_and_round_trips_either_way() {
        let y = "name: t\nmodel: {path: m, shared: true}\noutput: o\npipeline: []\n";
        let j = JobSpec::parse(y, Path::new("job.yaml"), Path::new("/base")).unwrap();
        assert_eq!(j.model.path, PathBuf::from("/base/m"));
        assert!(j.model.shared && j.model.sent.is_none());
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(&j).unwrap()).unwrap();
        assert_eq!(back, j);
        // A plain path is written back as a plain path.
        let plain = JobSpec::parse(GOOD, Path::new("job.yaml"), Path::new("/base")).unwrap();
        let v = serde_json::to_value(&plain).unwrap();
        assert_eq!(v["model"], "/base/m");
        // A sent model keeps its files; `local` never travels.
        let mut sent = plain.clone();
        sent.model.sent = Some(SentModel {
            files: vec![BlobFile {
                name: "model.safetensors".into(),
                sha256: "ab".repeat(32),
                bytes: 7,
            }],
            file: Some("model.safetensors".into()),
        });
        sent.validate().unwrap();
        let mut with_local = sent.clone();
        with_local.model.local = Some("/data/models/x".into());
        let back: JobSpec =
            serde_json::from_str(&serde_json::to_string(&with_local).unwrap()).unwrap();
        assert_eq!(back, sent);
        // Unknown keys in the map are named, with their place.
        let y = "name: t\nmodel: {path: m, share: true}\noutput: o\npipeline: []\n";
        let e = JobSpec::parse(y, Path::new("job.yaml"), Path::new("/base"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("job.yaml:2") && e.contains("share"), "{e}");
    }

    #[test]
    fn a_sent_model_needs_plain_sorted_names_and_real_digests() {
        let f = |name: &str, sha: &str| BlobFile {
            name: name.into(),
            sha256: sha.into(),
            bytes: 1,
        };
        let ok = "0f".repeat(32);
        let check = |files: Vec<BlobFile>, file: Option<&str>| {
            SentModel {
                files,
                file: file.map(String::from),
            }
            .validate()
        };
        assert!(check(vec![f("a", &ok), f("b", &ok)], None).is_ok());
        for (files, file, why) in [
            (vec![], None, "at least one"),
            (vec![f("../x", &ok)], None, "plain name"),
            (vec![f("a", "0F")], None, "lowercase hex"),
            (vec![f("b", &ok), f("a", &ok)], None, "sorted"),
            (vec![f("a", &ok), f("a", &ok)], None, "distinct"),
            (vec![f("a", &ok)], Some("z"), "not among"),
        ] {
            let e = check(files, file).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
