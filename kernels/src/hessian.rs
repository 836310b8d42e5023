//! Calibration statistics of one linear layer's input: H = Σ x xᵀ over every
//! input row x, and the row count.
//!
//! The sum must come out byte-identical however the calibration batches are
//! spread over nodes, and in whatever order the partial sums are merged.
//! Floating-point sums depend on their order, so H is held in integers:
//!
//! * each batch (a calibration micro-batch, whose rows follow from the data
//!   alone) gives its XᵀX in f64, every entry summed over the rows in row
//!   order ([`crate::gram`]): the products of two f32 values are exact in
//!   f64, so the bits depend on the inputs alone, never on the thread
//!   count, the processor's vector width or whether a GPU computed them;
//! * that f64 matrix is rounded to integer units of 2^-48 ([`SUM_FRAC_BITS`])
//!   and added into the upper triangle's i128 accumulator: integer addition
//!   is associative, so the same batches, merged in any grouping and any
//!   order, give the same integers.
//!
//! The statistic is therefore Σ over batches of round(fl(XᵢᵀXᵢ)), within a
//! relative 2^-53·rows (plus 2^-49 absolute) of the exact sum. Splitting the
//! same rows into other batches may change the last bits, which is why the
//! batches follow the data and not the cluster.
//!
//! Overflow is impossible while the sum of every row's largest x², in units
//! of 2^-48, stays below 2^127 (in real units, Σ max x² below about
//! 6·10^23); past that the batch is refused with an error before anything is
//! added.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use crate::KernelError;
use crate::gram::{PANEL, Panels, TILE_WIDTH};
use crate::hadamard::{HadamardMeta, choose_block, signs};

/// Half of [`SUM_FRAC_BITS`]: an input of magnitude |x| adds at most
/// (|x|·2^`INPUT_FRAC_BITS`)² units to an entry.
pub const INPUT_FRAC_BITS: u32 = 24;

/// The accumulator holds H in integer units of 2^-`SUM_FRAC_BITS`.
pub const SUM_FRAC_BITS: u32 = 2 * INPUT_FRAC_BITS;

/// The largest input magnitude accepted, 2^38.
pub const MAX_INPUT: f32 = 274_877_906_944.0;

/// First bytes of [`HessianSum::to_bytes`].
const MAGIC: &[u8; 8] = b"HCXHESS1";

/// Header length of [`HessianSum::to_bytes`]: magic, fraction bits (u32),
/// dim (u64), count (u64).
const HEADER: usize = 8 + 4 + 8 + 8;

/// Offset of column `j` in the packed upper triangle.
#[inline]
fn tri(j: usize) -> usize {
    j * (j + 1) / 2
}

/// An exact, additive sum of x xᵀ over input rows x of length `dim`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HessianSum {
    dim: usize,
    count: u64,
    /// The upper triangle column by column: column j holds rows 0..=j,
    /// starting at j(j+1)/2, in units of 2^-48.
    acc: Vec<i128>,
    /// The largest |entry| of `acc` (a function of `acc` alone).
    max_abs: u128,
}

fn too_big() -> KernelError {
    KernelError::Values(
        "the calibration Hessian would overflow its exact 128-bit accumulator (inputs too large)"
            .into(),
    )
}

impl HessianSum {
    /// An empty sum for rows of `dim` values.
    pub fn new(dim: usize) -> HessianSum {
        HessianSum {
            dim,
            count: 0,
            acc: vec![0; tri(dim)],
            max_abs: 0,
        }
    }

    /// Length of an input row (the weight's column count).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of rows added.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds `rows` input rows (`x` row-major, `rows × dim`). On error nothing
    /// is added.
    pub fn add_batch(&mut self, x: &[f32], rows: usize) -> Result<(), KernelError> {
        self.add_batch_with(x, rows, true)
    }

    /// [`add_batch`](Self::add_batch) without the GPU, for comparisons.
    #[cfg(test)]
    pub(crate) fn add_batch_on_cpu(&mut self, x: &[f32], rows: usize) -> Result<(), KernelError> {
        self.add_batch_with(x, rows, false)
    }

    fn add_batch_with(&mut self, x: &[f32], rows: usize, device: bool) -> Result<(), KernelError> {
        let dim = self.dim;
        if rows.checked_mul(dim) != Some(x.len()) {
            return Err(KernelError::shape(
                rows,
                dim,
                format!(
                    "{} calibration values are not {rows} rows of {dim}",
                    x.len()
                ),
            ));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite() || v.abs() > MAX_INPUT) {
            return Err(KernelError::Values(format!(
                "calibration input {} at row {}, column {} is not finite or beyond ±2^38",
                x[i],
                i / dim.max(1),
                i % dim.max(1)
            )));
        }
        let count = self.count.checked_add(rows as u64).ok_or_else(too_big)?;
        // Σ over rows of (largest |x| in units of 2^-24)² bounds every
        // entry of the batch's exact XᵀX; the f64 product may exceed it by
        // rows·2^-53 of itself, and rounding by half a unit.
        let scale = (1u64 << INPUT_FRAC_BITS) as f64;
        let mut batch = 0u128;
        if dim > 0 {
            for row in x.chunks_exact(dim) {
                let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                let a = (m as f64 * scale).ceil() as u128;
                batch = batch.checked_add(a * a).ok_or_else(too_big)?;
            }
        }
        let slack = (batch >> 52).saturating_mul(rows as u128 + 1) + 2;
        match batch
            .checked_add(slack)
            .and_then(|b| b.checked_add(self.max_abs))
        {
            Some(b) if b <= i128::MAX as u128 => {}
            _ => return Err(too_big()),
        }
        if dim > 0 && rows > 0 {
            // The device's Gram matrix has the CPU's bits (`crate::gram`).
            match device
                .then(|| crate::gpu::gram_upper(x, rows, dim))
                .flatten()
            {
                Some(upper) => self.add_upper(&upper),
                None => self.add_gram(x, rows),
            }
        }
        self.count = count;
        Ok(())
    }

    /// Adds round(XᵀX) of a batch whose bound has been checked.
    fn add_gram(&mut self, x: &[f32], rows: usize) {
        let dim = self.dim;
        let unit = (SUM_FRAC_BITS as f64).exp2();
        let panels = Panels::pack(x, rows, dim);
        // Columns of H one tile wide, one task each.
        let width = TILE_WIDTH;
        let mut blocks: Vec<(usize, usize, &mut [i128])> = Vec::new();
        let mut rest: &mut [i128] = &mut self.acc;
        for j0 in (0..dim).step_by(width) {
            let j1 = (j0 + width).min(dim);
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(tri(j1) - tri(j0));
            blocks.push((j0, j1, head));
            rest = tail;
        }
        self.max_abs = blocks
            .into_par_iter()
            .map(|(j0, j1, acc)| {
                // Every entry is the fixed-order sum of `gram`, so the
                // bits do not depend on the pool, the processor or how
                // the work is cut.
                let pj = j0 / PANEL;
                for pi in 0..=(j1 - 1) / PANEL {
                    let tile = panels.tile(pi, pj);
                    for (a, row) in tile.iter().enumerate() {
                        let i = pi * PANEL + a;
                        for (b, v) in row.iter().enumerate() {
                            let j = j0 + b;
                            if i > j || j >= j1 {
                                continue;
                            }
                            // Scaling by a power of two is exact; the bound
                            // check keeps the integer within i128.
                            acc[tri(j) - tri(j0) + i] += (*v * unit).round_ties_even() as i128;
                        }
                    }
                }
                acc.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
    }

    /// Adds round(XᵀX) given as its packed upper triangle (the layout of
    /// `acc`), for a batch whose bound has been checked.
    fn add_upper(&mut self, upper: &[f64]) {
        let unit = (SUM_FRAC_BITS as f64).exp2();
        self.max_abs = self
            .acc
            .par_chunks_mut(1 << 14)
            .zip(upper.par_chunks(1 << 14))
            .map(|(acc, g)| {
                let mut m = 0u128;
                for (s, v) in acc.iter_mut().zip(g) {
                    *s += (*v * unit).round_ties_even() as i128;
                    m = m.max(s.unsigned_abs());
                }
                m
            })
            .max()
            .unwrap_or(0);
    }

    /// Adds a batch given as its Gram matrix's packed upper triangle, for
    /// the host check of the device kernel (the bound is not checked).
    #[cfg(test)]
    pub(crate) fn add_upper_for_test(&mut self, upper: &[f64], rows: usize) {
        self.add_upper(upper);
        self.count += rows as u64;
    }

    /// Adds another partial sum over the same `dim`.
    pub fn merge(&mut self, other: &HessianSum) -> Result<(), KernelError> {
        if other.dim != self.dim {
            return Err(KernelError::Values(format!(
                "cannot merge calibration Hessians of dimensions {} and {}",
                self.dim, other.dim
            )));
        }
        let count = self.count.checked_add(other.count).ok_or_else(too_big)?;
        match self.max_abs.checked_add(other.max_abs) {
            Some(b) if b <= i128::MAX as u128 => {}
            _ => return Err(too_big()),
        }
        self.max_abs = self
            .acc
            .par_chunks_mut(1 << 14)
            .zip(other.acc.par_chunks(1 << 14))
            .map(|(a, b)| {
                let mut m = 0u128;
                for (x, y) in a.iter_mut().zip(b) {
                    *x += *y;
                    m = m.max(x.unsigned_abs());
                }
                m
            })
            .max()
            .unwrap_or(0);
        self.count = count;
        Ok(())
    }

    /// An upper bound on the magnitude of every integer the sum holds;
    /// ranks add their bounds before an integer all-reduce to know it
    /// cannot overflow.
    pub fn bound(&self) -> u128 {
        self.max_abs
    }

    /// The sum as integers for an exact all-reduce: the row count, then
    /// the upper triangle column by column (units of 2^-48).
    pub fn to_words(&self) -> Vec<i128> {
        let mut out = Vec::with_capacity(1 + self.acc.len());
        out.push(i128::from(self.count));
        out.extend_from_slice(&self.acc);
        out
    }

    /// Reads what [`to_words`](Self::to_words) gave (or a sum of such
    /// vectors) for rows of `dim` values.
    pub fn from_words(dim: usize, words: &[i128]) -> Result<HessianSum, KernelError> {
        let bad = |why: String| KernelError::corrupt("hessian", why);
        let Some((&count, acc)) = words.split_first() else {
            return Err(bad("no row count".into()));
        };
        if dim
            .checked_add(1)
            .and_then(|e| dim.checked_mul(e))
            .map(|m| m / 2)
            != Some(acc.len())
        {
            return Err(bad(format!(
                "{} values do not hold the {dim} × {dim} upper triangle",
                acc.len()
            )));
        }
        let count = u64::try_from(count).map_err(|_| bad(format!("row count {count}")))?;
        if let Some(j) = (0..dim).find(|&j| acc[tri(j) + j] < 0) {
            return Err(bad(format!("diagonal entry {j} is negative")));
        }
        Ok(HessianSum {
            dim,
            count,
            acc: acc.to_vec(),
            max_abs: acc.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0),
        })
    }

    /// The sum as f64, row-major `dim × dim`, symmetric.
    pub fn to_f64(&self) -> Vec<f64> {
        let dim = self.dim;
        let unit = (-(SUM_FRAC_BITS as f64)).exp2();
        let mut out = vec![0f64; dim * dim];
        for j in 0..dim {
            for (i, v) in self.acc[tri(j)..tri(j + 1)].iter().enumerate() {
                let f = *v as f64 * unit;
                out[i * dim + j] = f;
                out[j * dim + i] = f;
            }
        }
        out
    }

    /// Serialises the sum: the magic `HCXHESS1`, the fraction bits (u32),
    /// `dim` and `count` (u64), then the upper triangle column by column as
    /// i128, all little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.acc.len() * 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&SUM_FRAC_BITS.to_le_bytes());
        out.extend_from_slice(&(self.dim as u64).to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        for v in &self.acc {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Reads what [`to_bytes`](Self::to_bytes) wrote; any other input is an
    /// error.
    pub fn from_bytes(bytes: &[u8]) -> Result<HessianSum, KernelError> {
        let bad = |why: String| KernelError::corrupt("hessian", why);
        if bytes.len() < HEADER {
            return Err(bad(format!(
                "{} bytes, shorter than the {HEADER}-byte header",
                bytes.len()
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("not a calibration Hessian (wrong magic)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
        let frac = u32_at(8);
        if frac != SUM_FRAC_BITS {
            return Err(bad(format!(
                "fixed point with {frac} fraction bits, expected {SUM_FRAC_BITS}"
            )));
        }
        let dim = u64_at(12);
        let count = u64_at(20);
        let n = usize::try_from(dim)
            .ok()
            .and_then(|d| d.checked_add(1).and_then(|e| d.checked_mul(e)))
            .map(|m| m / 2);
        let expect = n
            .and_then(|n| n.checked_mul(16))
            .and_then(|b| b.checked_add(HEADER));
        if expect != Some(bytes.len()) {
            return Err(bad(format!(
                "{} bytes do not hold the {dim} × {dim} upper triangle",
                bytes.len()
            )));
        }
        let acc: Vec<i128> = bytes[HEADER..]
            .chunks_exact(16)
            .map(|c| i128::from_le_bytes(c.try_into().unwrap_or([0; 16])))
            .collect();
        let dim = dim as usize;
        for j in 0..dim {
            if acc[tri(j) + j] < 0 {
                return Err(bad(format!("diagonal entry {j} is negative")));
            }
        }
        let max_abs = acc.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0);
        if max_abs > i128::MAX as u128 {
            return Err(bad("an entry is out of range".into()));
        }
        Ok(HessianSum {
            dim,
            count,
            acc,
            max_abs,
        })
    }
}

/// In-place orthonormal fast Walsh–Hadamard transform of one block, f64.
fn fwht_f64(x: &mut [f64]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for start in (0..n).step_by(2 * h) {
            let (a, b) = x[start..start + 2 * h].split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (p, q) = (*u, *v);
                *u = p + q;
                *v = p - q;
            }
        }
        h *= 2;
    }
    let norm = 1.0 / (n as f64).sqrt();
    for v in x.iter_mut() {
        *v *= norm;
    }
}

/// Rotates a Hessian (row-major `dim × dim`) to the domain of weights that
/// [`hadamard::forward`](crate::hadamard::forward) rotated with `meta`.
///
/// `forward` maps a weight row w to R w with R = F·D (D the random signs, F
/// the block Walsh–Hadamard matrix), so W' = W·Rᵀ, and an input x' = R x gives
/// W' x' = W x. Its Hessian is H' = R·H·Rᵀ, which is what this computes (and
/// symmetrises), so that tr(E' H' E'ᵀ) = tr(E H Eᵀ) for any error E.
pub fn rotate_hessian(h: &mut [f64], dim: usize, meta: &HadamardMeta) -> Result<(), KernelError> {
    if dim.checked_mul(dim) != Some(h.len()) {
        return Err(KernelError::Values(format!(
            "a {dim} × {dim} Hessian has {} values, not {}",
            dim.saturating_mul(dim),
            h.len()
        )));
    }
    let block = choose_block(Some(meta.block), dim, dim)?;
    let s: Vec<f64> = signs(meta.seed, dim).into_iter().map(f64::from).collect();
    let rotate_rows = |h: &mut [f64]| {
        h.par_chunks_mut(dim).for_each(|row| {
            for (v, sg) in row.iter_mut().zip(&s) {
                *v *= sg;
            }
            for b in row.chunks_mut(block) {
                fwht_f64(b);
            }
        })
    };
    // Rows: H·Rᵀ. Transposed: R·Hᵀ = R·H. Rows again: R·H·Rᵀ.
    rotate_rows(h);
    for i in 0..dim {
        for j in i + 1..dim {
            h.swap(i * dim + j, j * dim + i);
        }
    }
    rotate_rows(h);
    for i in 0..dim {
        for j in i + 1..dim {
            let m = 0.5 * (h[i * dim + j] + h[j * dim + i]);
            h[i * dim + j] = m;
            h[j * dim + i] = m;
        }
    }
    Ok(())
}

/// Σ over rows r of x_r·H·x_rᵀ, with row `r` written by `fill`; blocks of 64
/// rows in parallel, summed in a fixed order (the same bits whatever the
/// thread count).
fn trace_rows(rows: usize, dim: usize, h: &[f64], fill: impl Fn(usize, &mut [f64]) + Sync) -> f64 {
    const RB: usize = 64;
    if rows == 0 || dim == 0 {
        return 0.0;
    }
    let hm = MatRef::from_row_major_slice(h, dim, dim);
    let sums: Vec<f64> = (0..rows.div_ceil(RB))
        .into_par_iter()
        .map(|b| {
            let r0 = b * RB;
            let r1 = (r0 + RB).min(rows);
            let mut xt = Mat::<f64>::zeros(dim, r1 - r0);
            for r in r0..r1 {
                fill(r, xt.col_as_slice_mut(r - r0));
            }
            let mut y = Mat::<f64>::zeros(dim, r1 - r0);
            matmul(y.as_mut(), Accum::Replace, hm, xt.as_ref(), 1.0, Par::Seq);
            let mut s = 0.0;
            for c in 0..r1 - r0 {
                s += xt
                    .col_as_slice(c)
                    .iter()
                    .zip(y.col_as_slice(c))
                    .map(|(a, b)| a * b)
                    .sum::<f64>();
            }
            s
        })
        .collect();
    sums.iter().sum()
}

/// tr(X·H·Xᵀ) for `x` row-major `rows × dim` and `h` row-major `dim × dim`
/// (symmetric): the output energy of a weight X on the calibration inputs.
pub fn quadratic_trace(x: &[f32], rows: usize, dim: usize, h: &[f64]) -> f64 {
    trace_rows(rows, dim, h, |r, out| {
        for (o, v) in out.iter_mut().zip(&x[r * dim..(r + 1) * dim]) {
            *o = *v as f64;
        }
    })
}

/// tr(E·H·Eᵀ) with E = A − B (differences taken in f64): the output error of
/// an approximation B of a weight A on the calibration inputs.
pub fn error_trace(a: &[f32], b: &[f32], rows: usize, dim: usize, h: &[f64]) -> f64 {
    trace_rows(rows, dim, h, |r, out| {
        let (ar, br) = (&a[r * dim..(r + 1) * dim], &b[r * dim..(r + 1) * dim]);
        for ((o, x), y) in out.iter_mut().zip(ar).zip(br) {
            *o = *x as f64 - *y as f64;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Signal;
    use crate::hadamard;
    use crate::rng::{SplitMix64, gaussian_vec};
    use proptest::prelude::*;

    /// Rows with a wide spread of magnitudes (so several slices are used).
    fn inputs(seed: u64, rows: usize, dim: usize) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..rows * dim)
            .map(|i| {
                let g = r.gaussian() as f32;
                match i % 7 {
                    0 => g * 3000.0,
                    1 => g * 1e-5,
                    _ => g,
                }
            })
            .collect()
    }

    /// The exact sum in units of 2^-48 for inputs that are multiples of
    /// 2^-24.
    fn naive(x: &[f32], rows: usize, dim: usize) -> Vec<i128> {
        let scale = (1u64 << INPUT_FRAC_BITS) as f64;
        let mut acc = vec![0i128; tri(dim)];
        for r in 0..rows {
            let a: Vec<i128> = x[r * dim..(r + 1) * dim]
                .iter()
                .map(|v| {
                    let s = *v as f64 * scale;
                    assert_eq!(s.fract(), 0.0, "not a multiple of 2^-24");
                    s as i128
                })
                .collect();
            for j in 0..dim {
                for i in 0..=j {
                    acc[tri(j) + i] += a[i] * a[j];
                }
            }
        }
        acc
    }

    #[test]
    fn sums_of_coarse_inputs_are_exact() {
        // Multiples of 2^-8 below 2^12: every partial sum fits f64 exactly.
        let (rows, dim) = (1100, 37);
        let x: Vec<f32> = inputs(1, rows, dim)
            .iter()
            .map(|v| (v.clamp(-4000.0, 4000.0) * 256.0).round() / 256.0)
            .collect();
        let mut h = HessianSum::new(dim);
        h.add_batch(&x, rows).unwrap();
        assert_eq!(h.acc, naive(&x, rows, dim));
        assert_eq!(h.count(), rows as u64);
    }

    #[test]
    fn sum_is_the_exact_sum_within_rounding() {
        let (rows, dim) = (1100, 37);
        let x = inputs(1, rows, dim);
        let mut h = HessianSum::new(dim);
        h.add_batch(&x, rows).unwrap();
        let f = h.to_f64();
        // The reference: each product is exact in f64; compensated
        // (Neumaier) summation leaves an error far below the bound.
        let exact = |i: usize, j: usize| {
            let (mut s, mut c, mut abs) = (0f64, 0f64, 0f64);
            for r in 0..rows {
                let p = x[r * dim + i] as f64 * x[r * dim + j] as f64;
                let t = s + p;
                c += if s.abs() >= p.abs() {
                    (s - t) + p
                } else {
                    (p - t) + s
                };
                s = t;
                abs += p.abs();
            }
            (s + c, abs)
        };
        for i in 0..dim {
            for j in 0..dim {
                let (s, abs) = exact(i, j);
                let bound = rows as f64 * f64::EPSILON * abs + (-48f64).exp2();
                let d = (f[i * dim + j] - s).abs();
                assert!(d <= bound, "{i},{j}: {} vs {s}", f[i * dim + j]);
            }
        }
    }

    #[test]
    fn the_same_batches_in_any_grouping_and_merge_order_give_identical_bits() {
        let (rows, dim) = (1300, 29);
        let x = inputs(2, rows, dim);
        // Fixed batches, as calibration's micro-batches are.
        let mut r = SplitMix64::new(9);
        let mut cuts: Vec<usize> = (0..9).map(|_| r.below(rows + 1)).collect();
        cuts.push(0);
        cuts.push(rows);
        cuts.sort_unstable();
        let batches: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
        let add = |h: &mut HessianSum, (a, b): (usize, usize)| {
            h.add_batch(&x[a * dim..b * dim], b - a).unwrap()
        };
        let mut whole = HessianSum::new(dim);
        for &batch in &batches {
            add(&mut whole, batch);
        }
        let want_bytes = whole.to_bytes();
        for trial in 0..12 {
            // Batches dealt to a random number of ranks in a random order,
            // each rank's partial sums merged in a random order.
            let ranks = 1 + r.below(5);
            let mut order = batches.clone();
            for i in (1..order.len()).rev() {
                order.swap(i, r.below(i + 1));
            }
            let mut pieces: Vec<HessianSum> = (0..ranks).map(|_| HessianSum::new(dim)).collect();
            for (k, &batch) in order.iter().enumerate() {
                add(&mut pieces[k % ranks], batch);
            }
            for i in (1..pieces.len()).rev() {
                pieces.swap(i, r.below(i + 1));
            }
            let mut total = HessianSum::new(dim);
            for p in &pieces {
                total.merge(p).unwrap();
            }
            assert_eq!(total.to_bytes(), want_bytes, "trial {trial}");
            assert_eq!(total, whole);
        }
    }

    #[test]
    fn thread_count_does_not_matter() {
        let (rows, dim) = (700, 300);
        let x = inputs(3, rows, dim);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| {
                let mut h = HessianSum::new(dim);
                h.add_batch(&x, rows).unwrap();
                h
            });
        let mut many = HessianSum::new(dim);
        many.add_batch(&x, rows).unwrap();
        assert_eq!(one, many);
    }

    #[test]
    fn bad_inputs_are_errors_and_change_nothing() {
        let mut h = HessianSum::new(4);
        h.add_batch(&[1.0; 8], 2).unwrap();
        let before = h.clone();
        assert!(h.add_batch(&[1.0; 7], 2).is_err());
        assert!(h.add_batch(&[1.0, f32::NAN, 0.0, 0.0], 1).is_err());
        assert!(h.add_batch(&[1e39f64 as f32, 0.0, 0.0, 0.0], 1).is_err());
        let e = h.add_batch(&[3e11, 0.0, 0.0, 0.0], 1).unwrap_err();
        assert!(e.to_string().contains("beyond"), "{e}");
        assert!(h.merge(&HessianSum::new(5)).is_err());
        assert_eq!(h, before);
        // Near the overflow bound: 2^38 inputs, 2^124 per row in units.
        let mut big = HessianSum::new(1);
        let e = (0..20).try_for_each(|_| big.add_batch(&[MAX_INPUT], 1));
        assert!(e.unwrap_err().to_string().contains("overflow"));
        assert_eq!(big.count(), 7);
        let mut twice = big.clone();
        assert!(twice.merge(&big).is_err());
    }

    #[test]
    fn from_bytes_refuses_truncated_and_garbage() {
        let x = inputs(4, 10, 6);
        let mut h = HessianSum::new(6);
        h.add_batch(&x, 10).unwrap();
        let b = h.to_bytes();
        assert_eq!(HessianSum::from_bytes(&b).unwrap(), h);
        for cut in [0, 5, HEADER - 1, HEADER, b.len() - 1] {
            assert!(HessianSum::from_bytes(&b[..cut]).is_err(), "cut {cut}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(HessianSum::from_bytes(&longer).is_err());
        let mut magic = b.clone();
        magic[0] ^= 1;
        assert!(HessianSum::from_bytes(&magic).is_err());
        let mut frac = b.clone();
        frac[8] = 40;
        assert!(HessianSum::from_bytes(&frac).is_err());
        let mut huge = b.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(HessianSum::from_bytes(&huge).is_err());
        let mut neg = b.clone();
        neg[HEADER + 15] = 0x80; // entry (0, 0), the first diagonal
        assert!(HessianSum::from_bytes(&neg).is_err());
        let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 % 251) as u8).collect();
        assert!(HessianSum::from_bytes(&garbage).is_err());
    }

    #[test]
    fn rotated_hessian_keeps_the_output_error() {
        let (rows, cols, n) = (8, 96, 200);
        // Correlated inputs: a shared component plus noise.
        let z = gaussian_vec(5, n * cols);
        let common = gaussian_vec(6, n);
        let x: Vec<f32> = (0..n * cols)
            .map(|i| z[i] + 2.0 * common[i / cols] * (1.0 + (i % cols) as f32 / cols as f32))
            .collect();
        let mut hs = HessianSum::new(cols);
        hs.add_batch(&x, n).unwrap();
        let h = hs.to_f64();
        let w = gaussian_vec(7, rows * cols);
        let what: Vec<f32> = w.iter().map(|v| (v * 4.0).round() / 4.0).collect();
        let before = error_trace(&w, &what, rows, cols, &h);
        let mut ws = Signal::new(w.clone(), rows, cols);
        let meta = hadamard::forward(&mut ws, Some(32), 11).unwrap();
        let mut wh = Signal::new(what.clone(), rows, cols);
        hadamard::forward(&mut wh, Some(32), 11).unwrap();
        let mut hr = h.clone();
        rotate_hessian(&mut hr, cols, &meta).unwrap();
        let after = error_trace(&ws.data, &wh.data, rows, cols, &hr);
        assert!((after / before - 1.0).abs() < 1e-5, "{before} vs {after}");
        let e0 = quadratic_trace(&w, rows, cols, &h);
        let e1 = quadratic_trace(&ws.data, rows, cols, &hr);
        assert!((e1 / e0 - 1.0).abs() < 1e-5, "{e0} vs {e1}");
        // Inputs rotated by R have the rotated Hessian.
        let mut xr = Signal::new(x, n, cols);
        hadamard::forward(&mut xr, Some(32), 11).unwrap();
        let mut hx = HessianSum::new(cols);
        hx.add_batch(&xr.data, n).unwrap();
        let direct = hx.to_f64();
        let scale = h.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (a, b) in direct.iter().zip(&hr) {
            assert!((a - b).abs() < 1e-5 * scale, "{a} vs {b}");
        }
        assert!(rotate_hessian(&mut hr, cols + 1, &meta).is_err());
    }

    proptest! {
        #[test]
        fn bytes_round_trip(dim in 0usize..20, rows in 0usize..40, seed in any::<u64>()) {
            let x = inputs(seed, rows, dim);
            let mut h = HessianSum::new(dim);
            h.add_batch(&x, rows).unwrap();
            let b = h.to_bytes();
            let back = HessianSum::from_bytes(&b).unwrap();
            prop_assert_eq!(&back, &h);
            prop_assert_eq!(back.to_bytes(), b);
            prop_assert_eq!(back.count(), rows as u64);
            prop_assert_eq!(back.dim(), dim);
        }

        #[test]
        fn summed_words_are_the_merged_sum(dim in 0usize..12, rows in 0usize..30, seed in any::<u64>()) {
            let (x, y) = (inputs(seed, rows, dim), inputs(seed ^ 1, rows, dim));
            let (mut a, mut b) = (HessianSum::new(dim), HessianSum::new(dim));
            a.add_batch(&x, rows).unwrap();
            b.add_batch(&y, rows).unwrap();
            prop_assert_eq!(&HessianSum::from_words(dim, &a.to_words()).unwrap(), &a);
            let words: Vec<i128> = a.to_words().iter().zip(b.to_words()).map(|(p, q)| p + q).collect();
            let summed = HessianSum::from_words(dim, &words).unwrap();
            prop_assert!(summed.bound() <= a.bound() + b.bound());
            a.merge(&b).unwrap();
            prop_assert_eq!(summed, a);
            prop_assert!(HessianSum::from_words(dim + 1, &words).is_err());
            prop_assert!(HessianSum::from_words(dim, &[]).is_err());
        }
    }
}
