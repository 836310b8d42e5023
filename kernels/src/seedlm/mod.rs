//! SeedLM: each block of weights is a seed of a pseudo-random generator and
//! a few low-bit coefficients (Shafipour et al., "SeedLM: Compressing LLM
//! Weights into Seeds of Pseudo-Random Generators", 2024).
//!
//! Each row is split into blocks of `C = block` weights. A block `w` is
//! approximated as `U t`, where `U` is a `C × P` (`P = coefficients`) sign
//! matrix generated from a 16-bit seed and `t` is stored as a shared
//! power-of-two exponent and `P` small integers. The encoder tries every one
//! of the 65535 seeds for every block and keeps the one whose *quantized*
//! coefficients give the least squared error.
//!
//! # Conventions (the decoder depends on all of them)
//!
//! **Generator.** A 16-bit Fibonacci LFSR with taps 16, 14, 13, 11
//! (feedback polynomial x^16 + x^14 + x^13 + x^11 + 1, maximal length: it
//! visits all 65535 nonzero states). On a state `s`, one step outputs bit
//! `s & 1`, then computes `f = (s ^ s>>2 ^ s>>3 ^ s>>5) & 1` and moves to
//! `(s >> 1) | (f << 15)`.
//!
//! **Seed to matrix.** The LFSR starts in state `seed` (1..=65535; 0 is
//! invalid). Two bases (`basis:` in the stage):
//! - `bits` (the default): its first `C·P` output bits `o_0, o_1, …` fill
//!   `U` column-major: `U[i][j] = (2·o_{j·C+i} − 1) / √C`, i.e. bit 1 →
//!   +1/√C, bit 0 → −1/√C, so every column has unit norm.
//! - `lfsr` (the paper's): its successive states `s_0 = seed, s_1, …` fill
//!   `U` column-major as `U[i][j] = (s_{j·C+i} − 2^15) / 2^15`, in [−1, 1).
//!
//! **Coefficients.** `t ≈ 2^e · q` with `q_j` in `−2^(b−1) ..= 2^(b−1) − 1`
//! (`b = coefficient_bits`), stored as `b`-bit two's complement.
//!
//! **Exponent.** The stored code `k` (`exponent_bits` bits, offset binary)
//! stands for `e = exponent_min + k`; `exponent_min` is chosen per tensor
//! and kept in the metadata, so any weight scale fits without a fixed
//! offset. The encoder sets `e_top = ceil(log2(2 · max_block ‖w‖ / qmax))`
//! (clamped to −126..=100; the factor 2 is headroom for least-squares
//! coefficients of moderately conditioned bases, which exceed `‖w‖`) and
//! `exponent_min = e_top − (2^exponent_bits − 1)`, so the exponents cover
//! the `2^exponent_bits` octaves below the tensor's largest block.
//!
//! **Encoder rule.** With `qmax = 2^(b−1) − 1` and `t` the least-squares
//! coefficients for a seed, `e = ceil(log2(max_j |t_j| / qmax))` clamped to
//! the stored range (and to ≥ −126); then `q = clamp(round(t / 2^e), −qmax−1,
//! qmax)`. (The exponent rule printed in the paper performs badly; this is
//! the rule of a public replication.) `e − 1` is tried as well — a finer
//! step that clips the largest coefficient is sometimes better — and the
//! (seed, e) pair with the least squared error after quantization is kept,
//! the lowest seed on ties.
//!
//! **Reconstruction.** Bit basis: `w_i = (Σ_j ±q_j) · f32(2^e / √C)`: the
//! sign sum is an exact integer, and the factor is computed in f64 and
//! rounded once to f32. LFSR basis: `w_i = f32(Σ_j k_ij q_j) · 2^(e−15)` with
//! the integer entries `k_ij = s − 2^15`. Either way the decoder reproduces
//! the encoder's reconstruction bit for bit.
//!
//! Storage: `16 + exponent_bits + P · coefficient_bits` bits per block (parts
//! `seeds`: u16 per block; `exponents`: packed codes; `coefficients`: packed
//! two's complement, block-major), e.g. C = 8, P = 3, 4-bit coefficients and
//! a 4-bit exponent: (16 + 4 + 12) / 8 = 4 bits per weight.
//!
//! # Search
//!
//! The pseudo-inverse `(UᵀU)⁻¹Uᵀ` and the Gram matrix `UᵀU` depend only on
//! the seed, the basis, C and P, so they are computed once per process for
//! each such shape and shared by every tensor ([`table`]; shapes whose table
//! exceeds 32 MiB build it a chunk of seeds at a time instead), laid out
//! eight seeds side by side so the per-seed arithmetic vectorises. For each
//! seed the least-squares residual `‖w‖² − tᵀGt` is a lower bound on the
//! quantized error, `‖w‖² − tᵀGt + dᵀGd` with `d = t − 2^e q`, so only seeds
//! whose residual beats the block's best so far (at first: the all-zero
//! block) are quantized; `round` is to nearest, ties to even, and the
//! errors are estimated in f32 on the block scaled by a power of two to
//! unit norm (exact, and safe from overflow for any finite input). Rank
//! deficient bases (possible for small C) drop dependent columns, whose
//! coefficients are then 0.
//!
//! That reference search computes `t` for every seed. For the bit basis with
//! blocks of at most 12 weights, the bounded search ([`bounded`]) first
//! bounds each seed's fit from a block's `2^C` sign-pattern sums and rules
//! out most seeds without computing `t`; the seeds it keeps get the
//! reference's arithmetic in the reference's order, so both choose the same
//! seed, exponent and coefficients (a unit test compares them). Blocks are
//! searched in parallel; each block's result depends only on its own
//! weights, so the output does not depend on the number of threads.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::part::{Coded, parse_meta, to_meta};
use crate::{KernelError, Part, Parts, Signal, bits};
use hcx_protocol::stage::{SeedlmBasis, SeedlmSpec};
use table::Shape;

mod bounded;
mod table;

const STAGE: &str = "seedlm";
/// Number of seeds: every nonzero 16-bit LFSR state.
const SEEDS: usize = 65535;
/// Largest block length.
const MAX_BLOCK: usize = 64;
/// Largest number of coefficients.
const MAX_COEFS: usize = 16;
/// Largest exponent the encoder uses: keeps reconstructions finite.
const EXP_MAX: i32 = 100;
/// Smallest exponent the encoder uses: 2^e stays a normal f32.
const EXP_MIN: i32 = -126;
/// Seeds evaluated side by side.
const LANES: usize = 8;
/// Target size of one chunk of the seed table.
const TABLE_BYTES: usize = 256 * 1024;
/// Blocks per parallel task.
const TASK_BLOCKS: usize = 8;
/// Cholesky pivots below this drop the column (the basis is rank deficient).
const PIVOT_MIN: f64 = 1e-6;

/// What the decoder needs besides the parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedlmMeta {
    /// Weights per block (C).
    pub block: usize,
    /// Coefficients per block (P).
    pub coefficients: usize,
    /// Bits per coefficient (two's complement).
    pub coefficient_bits: u8,
    /// Bits per block exponent.
    pub exponent_bits: u8,
    /// The exponent that a stored exponent code of 0 stands for.
    pub exponent_min: i32,
    /// How seeds become bases; absent: the bit basis.
    #[serde(default, skip_serializing_if = "SeedlmBasis::is_bits")]
    pub basis: SeedlmBasis,
}

/// Validated block geometry.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    c: usize,
    p: usize,
    cb: u8,
    eb: u8,
}

impl Geometry {
    fn new(c: usize, p: usize, cb: u8, eb: u8) -> Result<Geometry, KernelError> {
        let why = if !(2..=MAX_BLOCK).contains(&c) {
            format!("block {c} is not in 2..={MAX_BLOCK}")
        } else if !(1..=MAX_COEFS).contains(&p) || p > c {
            format!("coefficients {p} is not in 1..={MAX_COEFS} and at most block {c}")
        } else if !(2..=8).contains(&cb) {
            format!("coefficient_bits {cb} is not in 2..=8")
        } else if !(2..=8).contains(&eb) {
            format!("exponent_bits {eb} is not in 2..=8")
        } else {
            return Ok(Geometry { c, p, cb, eb });
        };
        Err(KernelError::Meta {
            stage: STAGE.into(),
            why,
        })
    }

    /// Largest coefficient magnitude on the positive side.
    fn qmax(self) -> i32 {
        (1 << (self.cb - 1)) - 1
    }

    /// Number of exponent codes minus one.
    fn exp_span(self) -> i32 {
        (1 << self.eb) - 1
    }

    fn check_cols(self, rows: usize, cols: usize) -> Result<(), KernelError> {
        if !cols.is_multiple_of(self.c) {
            return Err(KernelError::shape(
                rows,
                cols,
                format!("row length {cols} not divisible by block {}", self.c),
            ));
        }
        Ok(())
    }
}

/// One LFSR step: returns the next state and the output bit.
#[inline]
fn lfsr_step(s: u16) -> (u16, u16) {
    let out = s & 1;
    let f = (s ^ (s >> 2) ^ (s >> 3) ^ (s >> 5)) & 1;
    ((s >> 1) | (f << 15), out)
}

/// The signs of `U` for a seed: bit `i` of column `j` is set when
/// `U[i][j] = +1/√C`.
fn basis_columns(seed: u16, c: usize, p: usize) -> [u64; MAX_COEFS] {
    let mut s = seed;
    let mut cols = [0u64; MAX_COEFS];
    for col in cols.iter_mut().take(p) {
        for i in 0..c {
            let (next, out) = lfsr_step(s);
            *col |= (out as u64) << i;
            s = next;
        }
    }
    cols
}

/// The integer entries of the LFSR basis for a seed, column-major (entry
/// `n = j·C + i` in `out[n]`): the register's successive states `s_0 =
/// seed, s_1, …` minus `2^15`, so that `U[i][j] = out[n] / 2^15` lies in
/// [−1, 1).
fn lfsr_entries(seed: u16, out: &mut [i32]) {
    let mut s = seed;
    for o in out {
        *o = s as i32 - 32768;
        s = lfsr_step(s).0;
    }
}

/// Reconstructs one block from its seed, exponent and coefficients.
fn reconstruct_block(basis: SeedlmBasis, seed: u16, e: i32, q: &[i32], out: &mut [f32]) {
    let c = out.len();
    match basis {
        SeedlmBasis::Bits => {
            let cols = basis_columns(seed, c, q.len());
            // The factor `2^e / √C`, rounded once to f32.
            let f = (2f64.powi(e) / (c as f64).sqrt()) as f32;
            for (i, o) in out.iter_mut().enumerate() {
                let mut acc = 0i32;
                for (col, qj) in cols.iter().zip(q) {
                    acc += if (col >> i) & 1 == 1 { *qj } else { -*qj };
                }
                *o = acc as f32 * f;
            }
        }
        SeedlmBasis::Lfsr => {
            let mut k = [0i32; MAX_BLOCK * MAX_COEFS];
            let k = &mut k[..c * q.len()];
            lfsr_entries(seed, k);
            // `2^(e − 15)`: exact in f32 (a subnormal at worst).
            let f = 2f64.powi(e - 15) as f32;
            for (i, o) in out.iter_mut().enumerate() {
                // |k| ≤ 2^15, |q| ≤ 2^7, P ≤ 16: the sum fits in i32.
                let acc: i32 = q.iter().enumerate().map(|(j, qj)| k[j * c + i] * qj).sum();
                *o = acc as f32 * f;
            }
        }
    }
}

/// `ceil(log2(y))` for positive finite `y` (−127 or less for 0 and subnormals).
#[inline]
fn ceil_log2(y: f32) -> i32 {
    let b = y.to_bits();
    let e = ((b >> 23) & 0xff) as i32 - 127;
    if b & 0x7f_ffff == 0 { e } else { e + 1 }
}

/// `2^e` for `e` in −126..=127.
#[inline]
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Rounds to nearest (ties to even) for `|x| < 2^22`.
#[inline]
fn round_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    (x + MAGIC) - MAGIC
}

/// The best (seed, exponent, coefficients) found so far for one block.
#[derive(Debug, Clone, Copy)]
struct Best {
    /// Squared error, in the units of the block scaled by `2^-shift`.
    err: f32,
    seed: u16,
    /// Absolute exponent.
    exp: i32,
    q: [i8; MAX_COEFS],
}

/// Per-tensor exponent range.
#[derive(Debug, Clone, Copy)]
struct ExpRange {
    /// Smallest exponent the encoder uses.
    lo: i32,
    /// Largest exponent.
    top: i32,
}

/// Signature of [`search_block`] for one number of coefficients.
type SearchFn = fn(&[f32], &[f32], usize, usize, Geometry, ExpRange, &mut Best);

/// [`search_block`] compiled for `p` coefficients (`p` is validated to
/// 1..=16), so the per-seed arrays live in registers.
fn searcher(p: usize) -> SearchFn {
    macro_rules! by_p {
        ($($n:literal)*) => {
            match p {
                $($n => search_block::<$n>,)*
                _ => unreachable!("coefficients are validated to 1..=16"),
            }
        };
    }
    by_p!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
}

/// A block ready to search: scaled by a power of two to a norm in
/// (1/2, 1], which keeps the f32 search arithmetic far from overflow and
/// underflow.
#[derive(Debug, Clone, Copy)]
struct Prepared {
    /// The scaled block.
    ws: [f32; MAX_BLOCK],
    /// Its energy `‖ws‖²` (the error of the zero block).
    ww: f32,
    /// The scale's exponent: `ws = w · 2^-shift`.
    shift: i32,
    /// Smallest exponent the search uses, relative to the scaled block.
    lo: i32,
    /// Largest exponent, relative to the scaled block.
    hi: i32,
}

/// Scales a block for the search, or `None` when every seed codes it as
/// zeros (a zero block, or one far below the tensor's smallest step).
/// Sets `best.err` to the zero block's error on the block's first search.
fn prepare(w: &[f32], g: Geometry, range: ExpRange, best: &mut Best) -> Option<Prepared> {
    let norm = w
        .iter()
        .map(|v| (*v as f64) * (*v as f64))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 {
        return None;
    }
    let shift = norm.log2().ceil() as i32;
    let lo = (range.lo - shift).max(-100);
    let hi = (range.top - shift).min(100);
    if range.lo - shift > 60 || lo > hi {
        // Every coefficient rounds to 0 at the smallest step: keep the zero block.
        return None;
    }
    let unscale = 2f64.powi(-shift);
    let mut ws = [0f32; MAX_BLOCK];
    for (s, v) in ws.iter_mut().zip(w) {
        *s = (*v as f64 * unscale) as f32;
    }
    let ww: f32 = ws[..g.c].iter().map(|v| v * v).sum();
    if best.err.is_infinite() {
        // The zero block (q = 0, any seed) is the first candidate to beat.
        best.err = ww;
    }
    Some(Prepared {
        ws,
        ww,
        shift,
        lo,
        hi,
    })
}

/// Considers one seed for a prepared block, given its least-squares
/// coefficients `t` and fit `tᵀGt` (`gram(at)`: the seed's doubled upper
/// triangle of `G = UᵀU`): quantizes `t` at two exponents and keeps the
/// better in `best` if it beats it. Seeds whose least-squares residual does
/// not beat `best` are not quantized (the residual bounds the error).
#[inline(always)]
fn consider<const P: usize>(
    p: &Prepared,
    t: &[f32; P],
    fit: f32,
    gram: impl Fn(usize) -> f32,
    seed: usize,
    qmax: f32,
    best: &mut Best,
) {
    let resid = p.ww - fit;
    if resid >= best.err {
        return;
    }
    let amax = t.iter().fold(0f32, |m, v| m.max(v.abs()));
    let e0 = ceil_log2(amax * (1.0 / qmax)).clamp(p.lo, p.hi);
    for e in [e0, e0 - 1] {
        if e < p.lo {
            break;
        }
        let (s, inv) = (pow2(e), pow2(-e));
        let q: [f32; P] =
            std::array::from_fn(|j| round_small((t[j] * inv).clamp(-qmax - 1.0, qmax)));
        let d: [f32; P] = std::array::from_fn(|j| t[j] - s * q[j]);
        let mut dgd = 0f32;
        let mut at = 0;
        for j in 0..P {
            for k in j..P {
                dgd += gram(at) * d[j] * d[k];
                at += 1;
            }
        }
        let err = resid + dgd;
        if err < best.err {
            best.err = err;
            best.seed = seed as u16;
            best.exp = e + p.shift;
            for (bq, qv) in best.q.iter_mut().zip(q) {
                *bq = qv as i8;
            }
        }
    }
}

/// The reference search: one chunk of a seed table (seeds from `first`)
/// for one block of `P` coefficients, eight seeds at a time, updating
/// `best`. Used for every shape without a bound table, and by the tests as
/// the definition of what the bounded search must find.
fn search_block<const P: usize>(
    w: &[f32],
    table: &[f32],
    first: usize,
    max_seed: usize,
    g: Geometry,
    range: ExpRange,
    best: &mut Best,
) {
    let c = g.c;
    let Some(prep) = prepare(w, g, range, best) else {
        return;
    };
    let ws = &prep.ws[..c];
    let ww = prep.ww;
    let qmax = g.qmax() as f32;
    for (gi, group) in table.chunks_exact(table::group_stride(c, P)).enumerate() {
        let (pinv, gram) = group.split_at(P * c * LANES);
        let (pinv, _) = pinv.as_chunks::<LANES>();
        let (gram, _) = gram.as_chunks::<LANES>();
        // t = pinv · w for eight seeds at once.
        let mut t = [[0f32; LANES]; P];
        for (rows, wi) in pinv.chunks_exact(P).zip(ws) {
            for (tj, row) in t.iter_mut().zip(rows) {
                for l in 0..LANES {
                    tj[l] += row[l] * wi;
                }
            }
        }
        // Least-squares fit tᵀGt; the residual ww − fit bounds the error.
        let mut fit = [0f32; LANES];
        let mut at = 0;
        for j in 0..P {
            for k in j..P {
                let gjk = &gram[at];
                at += 1;
                for l in 0..LANES {
                    fit[l] += gjk[l] * t[j][l] * t[k][l];
                }
            }
        }
        let mut promising = false;
        for f in fit {
            promising |= ww - f < best.err;
        }
        if !promising {
            continue;
        }
        for l in 0..LANES {
            let seed = first + gi * LANES + l;
            if seed > max_seed {
                continue;
            }
            let tl: [f32; P] = std::array::from_fn(|j| t[j][l]);
            consider::<P>(&prep, &tl, fit[l], |at| gram[at][l], seed, qmax, best);
        }
    }
}

/// Which search [`search`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// The bounded search where the shape has a bound table, else the
    /// reference search.
    Fastest,
    /// The reference search only (tests compare the two).
    #[cfg_attr(not(test), allow(dead_code))]
    Reference,
}

/// Finds the best seed, exponent and coefficients of every block of `x`
/// among seeds `1..=max_seed`.
fn search(
    x: &[f32],
    best: &mut [Best],
    shape: Shape,
    g: Geometry,
    range: ExpRange,
    max_seed: usize,
    how: How,
) {
    let c = g.c;
    if best.is_empty() {
        return;
    }
    let shared = table::shared(shape);
    if let Some(table) = &shared
        && let Some(bound) = &table.bound
        && how == How::Fastest
    {
        x.par_chunks(c * bounded::TILE)
            .zip(best.par_chunks_mut(bounded::TILE))
            .for_each(|(ws, bs)| bounded::search_tile(ws, bs, table, bound, max_seed, g, range));
        return;
    }
    let stride = table::group_stride(c, g.p);
    let groups_per_chunk = (TABLE_BYTES / (stride * 4)).max(1);
    let mut own = Vec::new();
    let all_groups = max_seed.div_ceil(LANES);
    let mut done = 0;
    let search = searcher(g.p);
    while done < all_groups {
        let groups = groups_per_chunk.min(all_groups - done);
        let first = 1 + done * LANES;
        let chunk: &[f32] = match &shared {
            Some(t) => &t.exact[done * stride..][..groups * stride],
            None => {
                own.resize(groups * stride, 0.0);
                table::build_groups(&mut own, first, max_seed, shape);
                &own
            }
        };
        x.par_chunks(c * TASK_BLOCKS)
            .zip(best.par_chunks_mut(TASK_BLOCKS))
            .for_each(|(ws, bs)| {
                for (w, b) in ws.chunks_exact(c).zip(bs.iter_mut()) {
                    search(w, chunk, first, max_seed, g, range, b);
                }
            });
        done += groups;
    }
}

/// Checks that values are finite.
fn check_finite(x: &[f32]) -> Result<(), KernelError> {
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(KernelError::Values(format!(
            "value {} at flat index {i} is not finite",
            x[i]
        )));
    }
    Ok(())
}

/// Encodes with seeds 1..=`max_seed`; returns the coded form and the
/// encoder's own reconstruction.
fn encode_with(
    spec: &SeedlmSpec,
    x: &Signal,
    max_seed: usize,
    how: How,
) -> Result<(Coded, Vec<f32>), KernelError> {
    encode_with_top(spec, x, max_seed, how, None)
}

fn geometry(spec: &SeedlmSpec) -> Result<Geometry, KernelError> {
    Geometry::new(
        spec.block,
        spec.coefficients,
        spec.coefficient_bits,
        spec.exponent_bits,
    )
}

/// The largest squared norm of a block of `block` consecutive values of
/// `x` (0 for none). The largest of a tensor's pieces is the tensor's, in
/// any order.
pub(crate) fn max_block_norm_sq(x: &[f32], block: usize) -> f64 {
    x.chunks_exact(block.max(1))
        .map(|b| b.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>())
        .fold(0f64, f64::max)
}

/// The exponent of the tensor's largest block, `e_top`, from its squared
/// norm (see the module's conventions).
pub(crate) fn top_exponent(spec: &SeedlmSpec, max_norm_sq: f64) -> Result<i32, KernelError> {
    let g = geometry(spec)?;
    let max_norm = max_norm_sq.sqrt();
    Ok(if max_norm > 0.0 {
        let raw = (2.0 * max_norm / g.qmax() as f64).log2().ceil();
        raw.clamp(EXP_MIN as f64, EXP_MAX as f64) as i32
    } else {
        0
    })
}

/// Encodes a piece of rows of a tensor whose largest block gives `top`
/// (see [`crate::row_pieces`]): every block is searched on its own, so the
/// piece's parts are the whole tensor's parts for those rows.
pub(crate) fn encode_fitted(spec: &SeedlmSpec, x: &Signal, top: i32) -> Result<Coded, KernelError> {
    encode_with_top(spec, x, SEEDS, How::Fastest, Some(top)).map(|(coded, _)| coded)
}

/// [`encode_with`], with the exponent range's top given (`Some`) or taken
/// from `x`'s largest block.
fn encode_with_top(
    spec: &SeedlmSpec,
    x: &Signal,
    max_seed: usize,
    how: How,
    top: Option<i32>,
) -> Result<(Coded, Vec<f32>), KernelError> {
    let g = geometry(spec)?;
    if x.data.len() != x.rows * x.cols {
        return Err(KernelError::shape(
            x.rows,
            x.cols,
            format!("{} values do not fill the shape", x.data.len()),
        ));
    }
    g.check_cols(x.rows, x.cols)?;
    check_finite(&x.data)?;
    let (c, p) = (g.c, g.p);
    let nb = x.len() / c;

    let top = match top {
        Some(t) => t,
        None => top_exponent(spec, max_block_norm_sq(&x.data, c))?,
    };
    let exponent_min = top - g.exp_span();
    let range = ExpRange {
        lo: exponent_min.max(EXP_MIN),
        top,
    };

    let zero = Best {
        err: f32::INFINITY,
        seed: 1,
        exp: range.lo,
        q: [0; MAX_COEFS],
    };
    let mut best = vec![zero; nb];
    let shape = Shape {
        basis: spec.basis,
        c,
        p,
    };
    search(&x.data, &mut best, shape, g, range, max_seed, how);

    let qmask = ((1u16 << g.cb) - 1) as u8;
    let seeds: Vec<u16> = best.iter().map(|b| b.seed).collect();
    let exps: Vec<u8> = best.iter().map(|b| (b.exp - exponent_min) as u8).collect();
    let coefs: Vec<u8> = best
        .iter()
        .flat_map(|b| b.q[..p].iter().map(|q| (*q as u8) & qmask))
        .collect();
    let mut recon = vec![0f32; x.len()];
    recon
        .par_chunks_mut(c)
        .zip(best.par_iter())
        .for_each(|(o, b)| {
            let mut q = [0i32; MAX_COEFS];
            for (qi, bi) in q.iter_mut().zip(&b.q[..p]) {
                *qi = *bi as i32;
            }
            reconstruct_block(spec.basis, b.seed, b.exp, &q[..p], o);
        });
    let meta = SeedlmMeta {
        block: c,
        coefficients: p,
        coefficient_bits: g.cb,
        exponent_bits: g.eb,
        exponent_min,
        basis: spec.basis,
    };
    let coded = Coded {
        meta: to_meta(&meta),
        parts: vec![
            Part::u16("seeds", &seeds, vec![nb]),
            Part::bytes("exponents", bits::pack(&exps, g.eb)),
            Part::bytes("coefficients", bits::pack(&coefs, g.cb)),
        ],
    };
    Ok((coded, recon))
}

/// Encodes a signal (rows × cols, row-major) into the decoder's metadata and
/// the parts `seeds`, `exponents` and `coefficients`. The search over seeds
/// is exhaustive and makes no random choice: `seed` is accepted for the
/// quantizers' common interface and unused.
pub fn encode(spec: &SeedlmSpec, x: &Signal, seed: u64) -> Result<Coded, KernelError> {
    let _ = seed;
    encode_with(spec, x, SEEDS, How::Fastest).map(|(coded, _)| coded)
}

/// Decodes `rows × cols` values from the metadata and the parts.
pub fn decode(
    meta: &serde_json::Value,
    parts: &Parts,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, KernelError> {
    let m: SeedlmMeta = parse_meta(STAGE, meta)?;
    let g = Geometry::new(m.block, m.coefficients, m.coefficient_bits, m.exponent_bits)?;
    if m.exponent_min < EXP_MIN - g.exp_span() || m.exponent_min > EXP_MAX - g.exp_span() {
        return Err(KernelError::Meta {
            stage: STAGE.into(),
            why: format!("exponent_min {} out of range", m.exponent_min),
        });
    }
    g.check_cols(rows, cols)?;
    let n = rows
        .checked_mul(cols)
        .ok_or_else(|| KernelError::shape(rows, cols, "too many values"))?;
    let (c, p) = (g.c, g.p);
    let nb = n / c;
    let seeds = parts.u16_values("seeds", nb)?;
    if let Some(i) = seeds.iter().position(|s| *s == 0) {
        return Err(KernelError::corrupt(
            "seeds",
            format!("seed 0 at block {i}"),
        ));
    }
    let packed = parts.byte_values("exponents", bits::packed_len(nb, g.eb))?;
    let exps = bits::unpack(packed, g.eb, nb)
        .ok_or_else(|| KernelError::corrupt("exponents", "too short"))?;
    let packed = parts.byte_values("coefficients", bits::packed_len(nb * p, g.cb))?;
    let coefs = bits::unpack(packed, g.cb, nb * p)
        .ok_or_else(|| KernelError::corrupt("coefficients", "too short"))?;
    let half = 1i32 << (g.cb - 1);
    let mut out = vec![0f32; n];
    out.par_chunks_mut(c)
        .zip(coefs.par_chunks(p))
        .zip(seeds.par_iter().zip(exps.par_iter()))
        .for_each(|((o, qc), (seed, ec))| {
            let mut q = [0i32; MAX_COEFS];
            for (qi, code) in q.iter_mut().zip(qc) {
                let v = *code as i32;
                *qi = if v >= half { v - 2 * half } else { v };
            }
            reconstruct_block(m.basis, *seed, m.exponent_min + *ec as i32, &q[..p], o);
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::gaussian_vec;
    use crate::stats::sqnr_db;
    use proptest::prelude::*;

    fn spec(
        block: usize,
        coefficients: usize,
        coefficient_bits: u8,
        exponent_bits: u8,
    ) -> SeedlmSpec {
        SeedlmSpec {
            block,
            coefficients,
            coefficient_bits,
            exponent_bits,
            basis: SeedlmBasis::Bits,
        }
    }

    fn round_trip(s: &SeedlmSpec, x: &Signal) -> (Coded, Vec<f32>) {
        let coded = encode(s, x, 7).unwrap();
        let parts = Parts::new(coded.parts.clone());
        let y = decode(&coded.meta, &parts, x.rows, x.cols).unwrap();
        (coded, y)
    }

    #[test]
    fn lfsr_is_maximal_length() {
        let mut seen = vec![false; 1 << 16];
        let mut s = 1u16;
        for _ in 0..SEEDS {
            assert!(!seen[s as usize], "state {s} repeats early");
            seen[s as usize] = true;
            s = lfsr_step(s).0;
        }
        assert_eq!(s, 1);
        assert!(!seen[0]);
    }

    #[test]
    fn seed_to_matrix_follows_the_documented_convention() {
        // From state 1: outputs 1, then state 0x8000 outputs 0 for 15 steps.
        let cols = basis_columns(1, 8, 2);
        assert_eq!(cols[0], 0b0000_0001);
        assert_eq!(cols[1], 0);
        // 0xACE1 = 1010 1100 1110 0001: the first 16 outputs are its bits, LSB first.
        let cols = basis_columns(0xACE1, 8, 2);
        assert_eq!(cols[0], 0xE1);
        assert_eq!(cols[1], 0xAC);
        // Reconstruction: bit 1 → +q, bit 0 → −q, times 2^e/√C.
        let mut out = [0f32; 8];
        reconstruct_block(SeedlmBasis::Bits, 1, 0, &[3, 1], &mut out);
        let f = (1.0 / 8f64.sqrt()) as f32;
        assert_eq!(out[0], 2.0 * f);
        assert_eq!(out[1], -4.0 * f);
    }

    #[test]
    fn pseudo_inverse_solves_least_squares() {
        let shape = Shape {
            basis: SeedlmBasis::Bits,
            c: 8,
            p: 3,
        };
        let mut group = vec![0f32; shape.group_stride()];
        table::build_lane(shape, 0xACE1, 0, &mut group);
        // pinv · U = I for a full-rank basis.
        let cols = basis_columns(0xACE1, 8, 3);
        let u = |i: usize, j: usize| if (cols[j] >> i) & 1 == 1 { 1.0 } else { -1.0 } / 8f32.sqrt();
        for j in 0..3 {
            for k in 0..3 {
                let v: f32 = (0..8).map(|i| group[(i * 3 + j) * LANES] * u(i, k)).sum();
                assert!(
                    (v - if j == k { 1.0 } else { 0.0 }).abs() < 1e-5,
                    "{j} {k} {v}"
                );
            }
        }
    }

    /// SQNR on Gaussian data at 4 bits per weight (C = 8, P = 3, 4-bit
    /// coefficients and exponent).
    ///
    /// Bound. Without search, one basis keeps on average P/C of a Gaussian
    /// block's energy: SQNR ≈ 10·log10(C / (C − P)) = 2.0 dB before
    /// quantization. With search, order statistics: the residual fraction
    /// of a random P-dim subspace is Beta((C−P)/2, P/2), P(r < x) ≈
    /// 2.04·x^2.5, so the best of 65535 has median r ≈ (ln 2 / (65535 ·
    /// 2.04))^0.4 ≈ 0.77 % of the energy (21 dB). Quantization adds P·s²/12
    /// with step s = 2^e in [max|t|/7, 2·max|t|/7); with max|t| ≈ ‖w‖ ≈ √8
    /// that is 0.5–2 % of the energy. Together 1.3–2.8 %, i.e. 15.5–19 dB,
    /// and choosing the seed after quantization only helps; the floor
    /// asserted is 15 dB, and at least 10 dB above the no-search fit.
    /// Measured: 16.71 dB (16.36 dB without the e − 1 retry); seed 1 alone
    /// gives 1.21 dB (its basis is unusually regular: mostly −1).
    #[test]
    fn gaussian_sqnr_beats_the_derived_bound() {
        let x = Signal::new(gaussian_vec(11, 64 * 64), 64, 64);
        let s = spec(8, 3, 4, 4);
        let (coded, y) = round_trip(&s, &x);
        let searched = sqnr_db(&x.data, &y).unwrap();
        let (_, single) = encode_with(&s, &x, 1, How::Fastest).unwrap();
        let single = sqnr_db(&x.data, &single).unwrap();
        eprintln!(
            "seedlm gaussian 64x64 C=8 P=3 4/4 bits: {searched:.2} dB searched, {single:.2} dB seed 1 only"
        );
        assert!(searched >= 15.0, "{searched}");
        assert!(searched >= single + 10.0, "{searched} vs {single}");
        // 4 bits per weight: (16 + 4 + 3·4) / 8.
        let bytes: usize = coded.parts.iter().map(|p| p.len()).sum();
        assert_eq!(bytes * 8, 64 * 64 * 4);
    }

    #[test]
    fn decode_reproduces_the_encoder_exactly() {
        let x = Signal::new(
            gaussian_vec(5, 16 * 32).iter().map(|v| v * 0.02).collect(),
            16,
            32,
        );
        let s = spec(8, 3, 4, 4);
        let (coded, recon) = encode_with(&s, &x, SEEDS, How::Fastest).unwrap();
        let y = decode(&coded.meta, &Parts::new(coded.parts), 16, 32).unwrap();
        assert_eq!(
            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            recon.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_planted_block_is_found_exactly() {
        let q = [3, -5, 7];
        let mut planted = vec![0f32; 8];
        reconstruct_block(SeedlmBasis::Bits, 12345, -2, &q, &mut planted);
        // A second, larger block sets the tensor's exponent range.
        let mut other = vec![0f32; 8];
        reconstruct_block(SeedlmBasis::Bits, 999, 1, &[1, -7, 2], &mut other);
        let data: Vec<f32> = planted.iter().chain(&other).copied().collect();
        let x = Signal::new(data.clone(), 2, 8);
        let s = spec(8, 3, 4, 4);
        let coded = encode(&s, &x, 0).unwrap();
        let parts = Parts::new(coded.parts.clone());
        assert_eq!(parts.u16_values("seeds", 2).unwrap(), vec![12345, 999]);
        let y = decode(&coded.meta, &parts, 2, 8).unwrap();
        assert_eq!(y, data);
    }

    /// Blocks that stress the search: Gaussian, heavy-tailed, planted
    /// (an exact fit exists), constant, one spike, tiny beside large.
    fn hard_blocks(c: usize, n: usize, seed: u64) -> Vec<f32> {
        let g = gaussian_vec(seed, c * n);
        let mut x = Vec::with_capacity(c * n);
        for (b, w) in g.chunks_exact(c).enumerate() {
            match b % 6 {
                0 => x.extend_from_slice(w),
                1 => x.extend(w.iter().map(|v| v * v * v)),
                2 => {
                    let mut out = vec![0f32; c];
                    let p = 3.min(c);
                    let q: Vec<i32> = (0..p as i32).map(|j| j * 2 - 3).collect();
                    reconstruct_block(SeedlmBasis::Bits, 1 + b as u16 * 37, -3, &q, &mut out);
                    x.extend(out);
                }
                3 => x.extend(std::iter::repeat_n(0.25, c)),
                4 => x.extend((0..c).map(|i| if i == b % c { 3.0 } else { 0.0 })),
                _ => x.extend(w.iter().map(|v| v * 1e-6)),
            }
        }
        x
    }

    /// The bounded search chooses exactly what the reference search does,
    /// for every shape that has a bound table (blocks up to 12).
    #[test]
    fn the_bounded_search_matches_the_reference() {
        for (c, p, cb, eb, n) in [
            (8, 3, 4, 4, 240),
            (4, 2, 5, 3, 120),
            (12, 4, 4, 4, 96),
            (8, 8, 3, 3, 48),
            (2, 1, 3, 2, 60),
            (6, 5, 6, 4, 48),
        ] {
            let x = Signal::new(hard_blocks(c, n, c as u64 * 31 + p as u64), n / 4, c * 4);
            let s = spec(c, p, cb, eb);
            let (fast, fast_recon) = encode_with(&s, &x, SEEDS, How::Fastest).unwrap();
            let (reference, ref_recon) = encode_with(&s, &x, SEEDS, How::Reference).unwrap();
            assert_eq!(fast.meta, reference.meta, "C={c} P={p}");
            assert_eq!(fast.parts, reference.parts, "C={c} P={p}");
            assert_eq!(fast_recon, ref_recon, "C={c} P={p}");
        }
    }

    #[test]
    fn the_lfsr_basis_follows_the_documented_convention() {
        // From state 1 the register holds 1, 0x8000, 0x4000, …
        let mut k = [0i32; 4];
        lfsr_entries(1, &mut k);
        assert_eq!(k, [1 - 32768, 0, 0x4000 - 32768, 0x2000 - 32768]);
        // Entry n of column j is state j·C + i; w = Σ k·q · 2^(e−15).
        let mut out = [0f32; 2];
        reconstruct_block(SeedlmBasis::Lfsr, 1, 15, &[1, 2], &mut out);
        assert_eq!(
            out,
            [
                (1 - 32768 + 2 * (0x4000 - 32768)) as f32,
                (2 * (0x2000 - 32768)) as f32
            ]
        );
    }

    #[test]
    fn the_lfsr_basis_round_trips_and_finds_a_planted_block() {
        let mut s = spec(8, 3, 4, 4);
        s.basis = SeedlmBasis::Lfsr;
        let mut planted = vec![0f32; 8];
        reconstruct_block(SeedlmBasis::Lfsr, 4321, -4, &[3, -5, 7], &mut planted);
        let mut other = vec![0f32; 8];
        reconstruct_block(SeedlmBasis::Lfsr, 77, -1, &[1, -7, 2], &mut other);
        let data: Vec<f32> = planted.iter().chain(&other).copied().collect();
        let (coded, y) = round_trip(&s, &Signal::new(data.clone(), 2, 8));
        assert_eq!(coded.meta["basis"], "lfsr");
        let parts = Parts::new(coded.parts);
        assert_eq!(parts.u16_values("seeds", 2).unwrap(), vec![4321, 77]);
        assert_eq!(y, data);
        // Gaussian data: the decoder reproduces the encoder, and the search
        // does as well as with the bit basis (measured 16.88 dB; seed 1
        // alone 2.02 dB).
        let x = Signal::new(gaussian_vec(11, 32 * 64), 32, 64);
        let (coded, recon) = encode_with(&s, &x, SEEDS, How::Fastest).unwrap();
        let y = decode(&coded.meta, &Parts::new(coded.parts), 32, 64).unwrap();
        assert_eq!(y, recon);
        let searched = sqnr_db(&x.data, &y).unwrap();
        let single = sqnr_db(&x.data, &encode_with(&s, &x, 1, How::Fastest).unwrap().1).unwrap();
        eprintln!("seedlm lfsr basis gaussian: {searched:.2} dB searched, {single:.2} dB seed 1");
        assert!(searched >= 16.5, "{searched}");
        assert!(searched >= single + 10.0, "{searched} vs {single}");
    }

    #[test]
    fn largest_geometry_round_trips() {
        let x = Signal::new(gaussian_vec(6, 2 * 64), 2, 64);
        let s = spec(64, 16, 8, 8);
        let (coded, recon) = encode_with(&s, &x, SEEDS, How::Fastest).unwrap();
        let y = decode(&coded.meta, &Parts::new(coded.parts), 2, 64).unwrap();
        assert_eq!(y, recon);
        // A random 16-dim subspace of 64 keeps 1.25 dB; the search does better.
        let db = sqnr_db(&x.data, &y).unwrap();
        assert!(db > 2.0, "{db}");
    }

    #[test]
    fn result_does_not_depend_on_thread_count() {
        let x = Signal::new(gaussian_vec(12, 32 * 32), 32, 32);
        let s = spec(4, 2, 5, 3);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| encode_with(&s, &x, 3000, How::Fastest).unwrap().0)
        };
        let (a, b) = (run(1), run(3));
        assert_eq!(a.meta, b.meta);
        assert_eq!(a.parts, b.parts);
    }

    #[test]
    fn zero_and_tiny_tensors_encode() {
        let s = spec(4, 2, 3, 3);
        let (_, y) = round_trip(&s, &Signal::new(vec![0.0; 8], 2, 4));
        assert_eq!(y, vec![0.0; 8]);
        let (_, y) = round_trip(&s, &Signal::new(vec![], 0, 4));
        assert!(y.is_empty());
        // Blocks far below the tensor's largest one come back as zeros, finite.
        let x = Signal::new(
            vec![1e30, -2e30, 3e30, 1e30, 1e-30, 2e-30, -1e-30, 0.0],
            2,
            4,
        );
        let (_, y) = round_trip(&s, &x);
        assert!(y.iter().all(|v| v.is_finite()));
        assert!(sqnr_db(&x.data, &y).unwrap() > 3.0);
    }

    #[test]
    fn bad_shapes_and_values_are_refused() {
        let s = spec(8, 3, 4, 4);
        let e = encode(&s, &Signal::new(vec![0.0; 30], 3, 10), 0).unwrap_err();
        assert!(matches!(e, KernelError::Shape { .. }));
        assert!(e.to_string().contains("not divisible by block 8"), "{e}");
        let mut v = vec![0.0; 8];
        v[3] = f32::NAN;
        assert!(matches!(
            encode(&s, &Signal::new(v, 1, 8), 0),
            Err(KernelError::Values(_))
        ));
        assert!(matches!(
            encode(&spec(1, 1, 4, 4), &Signal::new(vec![0.0; 8], 1, 8), 0),
            Err(KernelError::Meta { .. })
        ));
    }

    #[test]
    fn corrupt_parts_are_errors() {
        let x = Signal::new(gaussian_vec(3, 16), 2, 8);
        let s = spec(8, 3, 4, 4);
        let coded = encode_with(&s, &x, 64, How::Fastest).unwrap().0;
        let ok = Parts::new(coded.parts.clone());
        assert!(decode(&coded.meta, &ok, 2, 8).is_ok());
        assert!(matches!(
            decode(&coded.meta, &ok, 2, 12),
            Err(KernelError::Shape { .. })
        ));
        assert!(decode(&coded.meta, &ok, 3, 8).is_err());
        for name in ["seeds", "exponents", "coefficients"] {
            let mut short = coded.parts.clone();
            let p = short.iter_mut().find(|p| p.name == name).unwrap();
            p.data.pop();
            assert!(
                matches!(
                    decode(&coded.meta, &Parts::new(short), 2, 8),
                    Err(KernelError::Corrupt { .. })
                ),
                "{name}"
            );
            let missing: Vec<Part> = coded
                .parts
                .iter()
                .filter(|p| p.name != name)
                .cloned()
                .collect();
            assert!(matches!(
                decode(&coded.meta, &Parts::new(missing), 2, 8),
                Err(KernelError::MissingPart(_))
            ));
        }
        let mut zero_seed = coded.parts.clone();
        zero_seed[0] = Part::u16("seeds", &[0, 5], vec![2]);
        assert!(matches!(
            decode(&coded.meta, &Parts::new(zero_seed), 2, 8),
            Err(KernelError::Corrupt { .. })
        ));
        let mut meta = coded.meta.clone();
        meta["exponent_min"] = serde_json::json!(1000);
        assert!(matches!(
            decode(&meta, &ok, 2, 8),
            Err(KernelError::Meta { .. })
        ));
        meta["exponent_min"] = serde_json::json!("x");
        assert!(matches!(
            decode(&meta, &ok, 2, 8),
            Err(KernelError::Meta { .. })
        ));
        let mut meta = coded.meta.clone();
        meta["coefficients"] = serde_json::json!(9);
        assert!(matches!(
            decode(&meta, &ok, 2, 8),
            Err(KernelError::Meta { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        #[test]
        fn round_trips(
            block in prop_oneof![Just(2usize), Just(4), Just(8)],
            p_raw in 1usize..=4,
            cb in 2u8..=8,
            eb in 2u8..=8,
            rows in 1usize..4,
            blocks in 1usize..3,
            scale in -8i32..8,
            data_seed in any::<u64>(),
            lfsr in any::<bool>(),
        ) {
            let p = p_raw.min(block);
            let cols = block * blocks;
            let f = 10f32.powi(scale);
            let data: Vec<f32> = gaussian_vec(data_seed, rows * cols).iter().map(|v| v * f).collect();
            let x = Signal::new(data, rows, cols);
            let mut s = spec(block, p, cb, eb);
            if lfsr {
                s.basis = SeedlmBasis::Lfsr;
            }
            let (coded, y) = round_trip(&s, &x);
            prop_assert_eq!(y.len(), rows * cols);
            prop_assert!(y.iter().all(|v| v.is_finite()));
            let parts = Parts::new(coded.parts.clone());
            prop_assert_eq!(&decode(&coded.meta, &parts, rows, cols).unwrap(), &y);
            let again = encode(&s, &x, 99).unwrap();
            prop_assert_eq!(&again.meta, &coded.meta);
            prop_assert_eq!(&again.parts, &coded.parts);
            // Never worse than coding the block as zeros.
            prop_assert!(crate::stats::squared_error(&x.data, &y) <= crate::stats::energy(&x.data) * 1.0001);
        }

        #[test]
        fn garbage_never_panics(
            seeds in proptest::collection::vec(any::<u8>(), 0..12),
            exps in proptest::collection::vec(any::<u8>(), 0..4),
            coefs in proptest::collection::vec(any::<u8>(), 0..12),
            exponent_min in -400i32..120,
            rows in 0usize..3,
        ) {
            let meta = serde_json::json!({
                "block": 4, "coefficients": 2, "coefficient_bits": 4,
                "exponent_bits": 3, "exponent_min": exponent_min,
            });
            let parts = Parts::new(vec![
                Part { name: "seeds".into(), dtype: crate::PartDtype::U16, shape: vec![seeds.len() / 2], data: seeds },
                Part::bytes("exponents", exps),
                Part::bytes("coefficients", coefs),
            ]);
            if let Ok(y) = decode(&meta, &parts, rows, 8) {
                prop_assert!(y.iter().all(|v| v.is_finite()));
            }
        }
    }
}
