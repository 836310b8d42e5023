//! Stage specs: one variant per compression stage a job can name.
//!
//! In YAML each stage is a one-key map, `- rtn: {bits: 4, group: 128}`.
//! The math lives in `hcx-kernels`; this module only says what the
//! parameters are and which values are acceptable.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One stage of a tensor's pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StageSpec {
    /// Random-sign Walsh–Hadamard rotation along rows (lossless).
    Hadamard(HadamardSpec),
    /// Truncated SVD: factors stored f16, the residual goes on down the chain.
    Lowrank(LowrankSpec),
    /// Magnitude pruning: a mask is stored, the kept values go on.
    Sparse(SparseSpec),
    /// Store as a float type (f16, bf16, f32).
    Cast(CastSpec),
    /// Round-to-nearest integers, per row or by group.
    Rtn(RtnSpec),
    /// Uniform grid, step chosen for a target entropy; needs `zstd` after it.
    Uniform(UniformSpec),
    /// Non-uniform scalar grid (Lloyd–Max or learned levels) by group.
    Nonuniform(NonuniformSpec),
    /// BitNet b1.58 absmean ternary, 1.6 bits per weight.
    Ternary(TernarySpec),
    /// SeedLM: LFSR-generated bases chosen by seed, low-bit coefficients.
    Seedlm(SeedlmSpec),
    /// Vector quantization with k-means codebooks.
    Vq(VqSpec),
    /// GPTQ: a scalar grid (rtn, uniform, nonuniform) with Hessian-weighted
    /// error feedback; needs calibration inputs.
    Gptq(GptqSpec),
    /// zstd over every part, floats split into byte planes first (lossless).
    Zstd(ZstdSpec),
    /// rANS over every part's bytes with one frequency table a byte plane
    /// (lossless): within a few thousandths of a bit of the codes'
    /// entropy, and faster than zstd's high levels.
    Rans(RansSpec),
    /// Learned corrections of the decoded weight (per-row and per-column
    /// gains, a low-rank term) that block-wise distillation adds after the
    /// chain; never written in a job's pipeline.
    Correction(CorrectionSpec),
}

/// The kinds of stage, in the order a chain must list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StageCategory {
    /// Lossless rotations.
    Transform,
    /// Splits off a part (factors, mask) and passes a residual on.
    Decomposition,
    /// Turns the signal into codes; exactly one per chain.
    Quantizer,
    /// Lossless coding of the parts.
    Entropy,
    /// Added after the chain by distillation.
    Correction,
}

impl StageCategory {
    /// Lowercase name for messages.
    pub fn name(self) -> &'static str {
        match self {
            StageCategory::Transform => "transform",
            StageCategory::Decomposition => "decomposition",
            StageCategory::Quantizer => "quantizer",
            StageCategory::Entropy => "entropy",
            StageCategory::Correction => "correction",
        }
    }
}

impl StageSpec {
    /// The stage's name as written in YAML.
    pub fn kind(&self) -> &'static str {
        match self {
            StageSpec::Hadamard(_) => "hadamard",
            StageSpec::Lowrank(_) => "lowrank",
            StageSpec::Sparse(_) => "sparse",
            StageSpec::Cast(_) => "cast",
            StageSpec::Rtn(_) => "rtn",
            StageSpec::Uniform(_) => "uniform",
            StageSpec::Nonuniform(_) => "nonuniform",
            StageSpec::Ternary(_) => "ternary",
            StageSpec::Seedlm(_) => "seedlm",
            StageSpec::Vq(_) => "vq",
            StageSpec::Gptq(_) => "gptq",
            StageSpec::Zstd(_) => "zstd",
            StageSpec::Rans(_) => "rans",
            StageSpec::Correction(_) => "correction",
        }
    }

    /// Where the stage sits in a chain.
    pub fn category(&self) -> StageCategory {
        match self {
            StageSpec::Hadamard(_) => StageCategory::Transform,
            StageSpec::Lowrank(_) | StageSpec::Sparse(_) => StageCategory::Decomposition,
            StageSpec::Zstd(_) | StageSpec::Rans(_) => StageCategory::Entropy,
            StageSpec::Correction(_) => StageCategory::Correction,
            _ => StageCategory::Quantizer,
        }
    }

    /// Whether the stage needs calibration statistics (the Hessian of the
    /// layer's inputs) to encode a tensor.
    pub fn needs_calibration(&self) -> bool {
        matches!(self, StageSpec::Gptq(_))
    }

    /// The same stage one rate step up (one more bit per code, index or
    /// coefficient), for a quality gate's `on_miss: raise_rate`. A stage
    /// with no rate (a transform, an entropy coder) comes back unchanged;
    /// `None` for a quantizer already at its highest rate, or ternary,
    /// which has only one.
    pub fn raised(&self) -> Option<StageSpec> {
        let mut s = self.clone();
        match &mut s {
            StageSpec::Rtn(r) if r.bits < 8 => r.bits += 1,
            StageSpec::Uniform(u) if u.bits < 8.0 => u.bits = (u.bits + 1.0).min(8.0),
            StageSpec::Nonuniform(n) if n.bits < 4 => n.bits += 1,
            StageSpec::Seedlm(sl) if sl.coefficient_bits < 8 => sl.coefficient_bits += 1,
            StageSpec::Vq(v) if v.bits < 16 => v.bits += 1,
            StageSpec::Gptq(g) => {
                let inner = g.grid.stage().raised()?;
                g.grid = match inner {
                    StageSpec::Rtn(r) => GptqGrid::Rtn(r),
                    StageSpec::Uniform(u) => GptqGrid::Uniform(u),
                    StageSpec::Nonuniform(n) => GptqGrid::Nonuniform(n),
                    _ => return None,
                };
            }
            _ if self.category() == StageCategory::Quantizer => return None,
            _ => {}
        }
        Some(s)
    }

    /// Checks the parameters; on error returns the parameter name (empty for
    /// the stage as a whole) and what is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        fn err(f: &str, m: impl Into<String>) -> Result<(), (String, String)> {
            Err((f.to_string(), m.into()))
        }
        match self {
            StageSpec::Hadamard(h) => {
                if let Some(b) = h.block
                    && (!b.is_power_of_two() || !(2..=1 << 16).contains(&b))
                {
                    return err("block", format!("{b} is not a power of two in 2..=65536"));
                }
            }
            StageSpec::Lowrank(l) => {
                let given = [
                    l.rank.is_some(),
                    l.rank_fraction.is_some(),
                    l.energy.is_some(),
                ]
                .iter()
                .filter(|x| **x)
                .count();
                if given != 1 {
                    return err("", "give exactly one of `rank`, `rank_fraction`, `energy`");
                }
                if let Some(0) = l.rank {
                    return err("rank", "must be at least 1");
                }
                if let Some(f) = l.rank_fraction
                    && !(f > 0.0 && f <= 1.0)
                {
                    return err("rank_fraction", format!("{f} is not in (0, 1]"));
                }
                if let Some(e) = l.energy
                    && !(e > 0.0 && e <= 1.0)
                {
                    return err("energy", format!("{e} is not in (0, 1]"));
                }
            }
            StageSpec::Sparse(s) => match s.pattern {
                SparsePattern::Unstructured => {
                    if !(s.density > 0.0 && s.density < 1.0) {
                        return err("density", format!("{} is not in (0, 1)", s.density));
                    }
                }
                SparsePattern::TwoFour => {
                    if s.density != 0.5 {
                        return err("density", "2:4 sparsity keeps exactly 0.5");
                    }
                }
            },
            StageSpec::Cast(_) => {}
            StageSpec::Rtn(r) => {
                if !(2..=8).contains(&r.bits) {
                    return err("bits", format!("{} is not in 2..=8", r.bits));
                }
                check_group(r.group)?;
            }
            StageSpec::Uniform(u) => {
                if !(u.bits >= 0.5 && u.bits <= 8.0) {
                    return err("bits", format!("{} is not in 0.5..=8", u.bits));
                }
                if !(u.deadzone >= 0.0 && u.deadzone <= 0.5) {
                    return err("deadzone", format!("{} is not in 0..=0.5", u.deadzone));
                }
            }
            StageSpec::Nonuniform(n) => {
                if !(2..=4).contains(&n.bits) {
                    return err("bits", format!("{} is not in 2..=4", n.bits));
                }
                check_group(Some(n.group))?;
            }
            StageSpec::Ternary(t) => check_group(t.group)?,
            StageSpec::Seedlm(s) => {
                if !(2..=64).contains(&s.block) {
                    return err("block", format!("{} is not in 2..=64", s.block));
                }
                if !(1..=16).contains(&s.coefficients) || s.coefficients > s.block {
                    return err("coefficients", "must be in 1..=16 and at most `block`");
                }
                if !(2..=8).contains(&s.coefficient_bits) {
                    return err("coefficient_bits", "must be in 2..=8");
                }
                if !(2..=8).contains(&s.exponent_bits) {
                    return err("exponent_bits", "must be in 2..=8");
                }
            }
            StageSpec::Vq(v) => {
                if !(1..=16).contains(&v.dim) {
                    return err("dim", format!("{} is not in 1..=16", v.dim));
                }
                if !(1..=16).contains(&v.bits) {
                    return err("bits", format!("{} is not in 1..=16", v.bits));
                }
                if v.iterations == 0 || v.iterations > 1000 {
                    return err("iterations", "must be in 1..=1000");
                }
            }
            StageSpec::Gptq(g) => {
                let kind = g.grid.kind();
                g.grid.stage().validate().map_err(|(f, m)| {
                    if f.is_empty() {
                        (format!("grid.{kind}"), m)
                    } else {
                        (format!("grid.{kind}.{f}"), m)
                    }
                })?;
                if !(g.damp > 0.0 && g.damp <= 1.0) {
                    return err("damp", format!("{} is not in (0, 1]", g.damp));
                }
                if !(1..=4096).contains(&g.block) {
                    return err("block", format!("{} is not in 1..=4096", g.block));
                }
            }
            StageSpec::Zstd(z) => {
                if !(1..=22).contains(&z.level) {
                    return err("level", format!("{} is not in 1..=22", z.level));
                }
            }
            StageSpec::Rans(_) => {}
            StageSpec::Correction(c) => {
                if !(c.rows || c.cols || c.rank > 0) {
                    return err("", "corrects nothing (no rows, no columns, rank 0)");
                }
                if c.rank > MAX_CORRECTION_RANK {
                    return err(
                        "rank",
                        format!("{} is more than {MAX_CORRECTION_RANK}", c.rank),
                    );
                }
            }
        }
        Ok(())
    }
}

fn check_group(group: Option<usize>) -> Result<(), (String, String)> {
    if let Some(g) = group
        && !(2..=1 << 20).contains(&g)
    {
        return Err(("group".into(), format!("{g} is not in 2..=1048576")));
    }
    Ok(())
}

/// Parameters of the Hadamard rotation.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HadamardSpec {
    /// Block length; default: the largest power of two dividing the row
    /// length, at most 4096 (384 → 128, 1536 → 512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<usize>,
}

/// Parameters of the low-rank decomposition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LowrankSpec {
    /// Fixed rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// Rank as a fraction of min(rows, cols).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_fraction: Option<f64>,
    /// Smallest rank keeping this fraction of the squared singular values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<f64>,
    /// Pass the residual on to the next stages (true) or drop it (false:
    /// pure low-rank approximation).
    #[serde(default = "yes")]
    pub keep_residual: bool,
}

fn yes() -> bool {
    true
}

/// Which weights a sparse stage keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SparsePattern {
    /// The largest-magnitude fraction `density` of the tensor.
    #[serde(rename = "unstructured")]
    Unstructured,
    /// The two largest of every four consecutive weights.
    #[serde(rename = "2:4")]
    TwoFour,
}

/// Parameters of magnitude pruning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SparseSpec {
    /// Unstructured or 2:4.
    pub pattern: SparsePattern,
    /// Fraction of weights kept (0.5 for 2:4).
    pub density: f64,
}

/// A float storage type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CastDtype {
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE single.
    F32,
}

/// Parameters of a cast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CastSpec {
    /// Target type.
    pub dtype: CastDtype,
}

/// Parameters of round-to-nearest quantization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RtnSpec {
    /// Bits per code, 2..=8.
    pub bits: u8,
    /// Group length along rows; absent: one scale per row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<usize>,
    /// Symmetric (scale only) or asymmetric (scale and zero point).
    #[serde(default = "yes")]
    pub symmetric: bool,
    /// Search the clipping scale that minimises squared error per group.
    #[serde(default)]
    pub search: bool,
}

/// Parameters of the entropy-constrained uniform quantizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UniformSpec {
    /// Target empirical entropy of the codes, bits per weight.
    pub bits: f64,
    /// Rounding offset toward zero (0 = plain rounding, up to 0.5); a small
    /// dead zone trades a little error for fewer bits.
    #[serde(default)]
    pub deadzone: f64,
}

/// Where non-uniform levels come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LevelSource {
    /// Lloyd–Max levels for a unit Gaussian, scaled per group.
    LloydMax,
    /// Levels fitted to this tensor by Lloyd iterations, stored f16.
    Learned,
}

/// Parameters of the non-uniform scalar quantizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NonuniformSpec {
    /// Bits per code, 2..=4.
    pub bits: u8,
    /// Group length along rows.
    pub group: usize,
    /// Level set.
    #[serde(default = "lloyd")]
    pub levels: LevelSource,
}

fn lloyd() -> LevelSource {
    LevelSource::LloydMax
}

/// Parameters of ternary quantization.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TernarySpec {
    /// Group length; absent: one absmean scale for the whole tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<usize>,
}

/// Parameters of SeedLM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SeedlmSpec {
    /// Weights per block (C).
    pub block: usize,
    /// Basis vectors per block (P).
    pub coefficients: usize,
    /// Bits per coefficient (two's complement).
    pub coefficient_bits: u8,
    /// Bits of the shared exponent.
    pub exponent_bits: u8,
    /// How a seed becomes the basis matrix; absent: `bits`.
    #[serde(default, skip_serializing_if = "SeedlmBasis::is_bits")]
    pub basis: SeedlmBasis,
}

/// How SeedLM turns a seed into its `block × coefficients` basis matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SeedlmBasis {
    /// One LFSR output bit per entry: ±1/√block (columns of unit norm).
    #[default]
    Bits,
    /// One 16-bit LFSR state per entry, scaled to [−1, 1) (the paper's basis).
    Lfsr,
}

impl SeedlmBasis {
    /// True for the default basis (kept out of serialized specs).
    pub fn is_bits(&self) -> bool {
        *self == SeedlmBasis::Bits
    }
}

/// Parameters of vector quantization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VqSpec {
    /// Vector length v.
    pub dim: usize,
    /// Index bits k: the codebook has 2^k entries.
    pub bits: u8,
    /// Add a second codebook over the first one's residual.
    #[serde(default)]
    pub residual: bool,
    /// k-means iterations.
    #[serde(default = "twenty")]
    pub iterations: usize,
}

fn twenty() -> usize {
    20
}

/// The grid a GPTQ stage quantizes to: one of the scalar quantizers, with
/// its own parameters (a one-key map, like a stage).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GptqGrid {
    /// Round-to-nearest integers by group (scales fixed from the weights).
    Rtn(RtnSpec),
    /// The entropy-targeted uniform grid (needs `zstd` after the stage).
    Uniform(UniformSpec),
    /// Non-uniform levels by group (scales fixed from the weights).
    Nonuniform(NonuniformSpec),
}

impl GptqGrid {
    /// The grid's name as written in YAML (`rtn`, `uniform`, `nonuniform`).
    pub fn kind(&self) -> &'static str {
        match self {
            GptqGrid::Rtn(_) => "rtn",
            GptqGrid::Uniform(_) => "uniform",
            GptqGrid::Nonuniform(_) => "nonuniform",
        }
    }

    /// The plain quantizer stage with the same parameters.
    pub fn stage(&self) -> StageSpec {
        match self {
            GptqGrid::Rtn(s) => StageSpec::Rtn(s.clone()),
            GptqGrid::Uniform(s) => StageSpec::Uniform(s.clone()),
            GptqGrid::Nonuniform(s) => StageSpec::Nonuniform(s.clone()),
        }
    }
}

/// Parameters of GPTQ (Frantar et al., 2022): quantize a weight column by
/// column, feeding each column's error forward through the inverse Hessian
/// of the layer's calibration inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GptqSpec {
    /// The grid the weights are quantized to.
    pub grid: GptqGrid,
    /// Damping added to the Hessian's diagonal, relative to the mean of the
    /// diagonal, in (0, 1].
    #[serde(default = "one_percent")]
    pub damp: f64,
    /// Columns per lazy batch (the error feedback inside a batch is applied
    /// column by column, to the rest of the row once per batch), 1..=4096.
    #[serde(default = "one_twenty_eight")]
    pub block: usize,
    /// Quantize columns by decreasing Hessian diagonal (act-order); group
    /// scales are fixed from the weights beforehand, so nothing extra is
    /// stored.
    #[serde(default = "yes")]
    pub act_order: bool,
}

fn one_percent() -> f64 {
    0.01
}

fn one_twenty_eight() -> usize {
    128
}

/// Parameters of the rANS entropy stage (none yet: the tables are
/// measured on each byte plane).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RansSpec {}

/// Parameters of the zstd entropy stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ZstdSpec {
    /// zstd level, 1..=22.
    #[serde(default = "nineteen")]
    pub level: i32,
}

impl Default for ZstdSpec {
    fn default() -> Self {
        ZstdSpec { level: 19 }
    }
}

fn nineteen() -> i32 {
    19
}

/// The largest rank of a distilled low-rank correction.
pub const MAX_CORRECTION_RANK: usize = 256;

/// What a `correction` step stores. Distillation writes it after a
/// tensor's chain: the decoded weight Ŵ (`[rows, cols]`) becomes
/// diag(r)·Ŵ·diag(c) + A·B, with r (`rows` values), c (`cols` values),
/// A (`[rows, rank]`) and B (`[rank, cols]`) stored in f16.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CorrectionSpec {
    /// A gain per output row.
    #[serde(default)]
    pub rows: bool,
    /// A gain per input column.
    #[serde(default)]
    pub cols: bool,
    /// Rank of the additive low-rank term (0: none).
    #[serde(default)]
    pub rank: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seedlm_basis_defaults_to_bits_and_stays_out_of_serialized_specs() {
        let plain: StageSpec = serde_saphyr::from_str(
            "seedlm: {block: 8, coefficients: 3, coefficient_bits: 4, exponent_bits: 4}",
        )
        .unwrap();
        let StageSpec::Seedlm(s) = &plain else {
            panic!("{plain:?}")
        };
        assert_eq!(s.basis, SeedlmBasis::Bits);
        // Specs written before the option serialize as they did.
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("basis"), "{json}");
        let lfsr: StageSpec = serde_saphyr::from_str(
            "seedlm: {block: 8, coefficients: 3, coefficient_bits: 4, exponent_bits: 4, basis: lfsr}",
        )
        .unwrap();
        let StageSpec::Seedlm(s) = &lfsr else {
            panic!("{lfsr:?}")
        };
        assert_eq!(s.basis, SeedlmBasis::Lfsr);
        assert!(
            serde_json::to_string(&lfsr)
                .unwrap()
                .contains(r#""basis":"lfsr""#)
        );
        let bad = serde_saphyr::from_str::<StageSpec>(
            "seedlm: {block: 8, coefficients: 3, coefficient_bits: 4, exponent_bits: 4, basis: gauss}",
        )
        .unwrap_err()
        .to_string();
        assert!(bad.contains("gauss"), "{bad}");
    }

    #[test]
    fn gptq_parses_with_defaults_and_validates() {
        let full: Vec<StageSpec> = serde_saphyr::from_str(
            "- gptq: {grid: {uniform: {bits: 4}}, damp: 0.01, block: 128, act_order: true}\n",
        )
        .unwrap();
        let StageSpec::Gptq(g) = &full[0] else {
            panic!("{full:?}")
        };
        assert_eq!(
            g.grid,
            GptqGrid::Uniform(UniformSpec {
                bits: 4.0,
                deadzone: 0.0
            })
        );
        assert_eq!(full[0].kind(), "gptq");
        assert_eq!(full[0].category(), StageCategory::Quantizer);
        assert!(full[0].needs_calibration());
        assert!(!StageSpec::Zstd(ZstdSpec::default()).needs_calibration());
        full[0].validate().unwrap();

        let short: StageSpec =
            serde_saphyr::from_str("gptq: {grid: {rtn: {bits: 4, group: 64}}}").unwrap();
        let StageSpec::Gptq(g) = &short else {
            panic!("{short:?}")
        };
        assert_eq!((g.damp, g.block, g.act_order), (0.01, 128, true));
        assert_eq!(g.grid.kind(), "rtn");
        short.validate().unwrap();

        let bad: StageSpec =
            serde_saphyr::from_str("gptq: {grid: {rtn: {bits: 9}}, damp: 0, block: 0}").unwrap();
        assert_eq!(bad.validate().unwrap_err().0, "grid.rtn.bits");
        let bad: StageSpec =
            serde_saphyr::from_str("gptq: {grid: {nonuniform: {bits: 3, group: 64}}, damp: 1.5}")
                .unwrap();
        assert_eq!(bad.validate().unwrap_err().0, "damp");
        let bad: StageSpec =
            serde_saphyr::from_str("gptq: {grid: {nonuniform: {bits: 3, group: 64}}, block: 5000}")
                .unwrap();
        assert_eq!(bad.validate().unwrap_err().0, "block");
        assert!(
            serde_saphyr::from_str::<StageSpec>("gptq: {grid: {rtn: {bits: 4}}, lr: 1}").is_err()
        );
        assert!(
            serde_saphyr::from_str::<StageSpec>("gptq: {grid: {vq: {dim: 2, bits: 8}}}").is_err()
        );
        assert!(
            serde_saphyr::from_str::<StageSpec>(
                "gptq: {grid: {rtn: {bits: 4}, uniform: {bits: 4}}}"
            )
            .is_err()
        );
    }
}
