//! GPTQ (Frantar et al., 2022): scalar quantization with error feedback
//! through the inverse Hessian of the layer's calibration inputs.
//!
//! A weight W (rows = output features, cols = input features) multiplies
//! inputs x; with H = Σ x xᵀ over calibration inputs, the output error of an
//! approximation Ŵ is tr(E H Eᵀ), E = W − Ŵ. GPTQ quantizes W column by
//! column; after column i it spreads the column's error over the columns
//! not yet quantized so as to cancel its effect on the output, using the
//! upper Cholesky factor U of H⁻¹ (H damped by `damp`·mean(diag H)):
//! e = (w_i − q_i)/U_ii, w_j −= e·U_ij for j > i. Updates are applied column
//! by column inside lazy blocks of `block` columns and to the rest of the
//! row once per block. With act-order the columns are visited by
//! decreasing H_ii. Inputs that never fire (H_jj = 0) get H_jj = 1 and
//! weight 0, as the reference implementation does.
//!
//! The grid's parameters (rtn and nonuniform group scales, the uniform step
//! and offsets) are fixed from W before the sweep ("static groups"), so the
//! codes are stored exactly as the plain codec stores them and decode with
//! its decoder; the column order needs no storing. For the uniform grid the
//! step is then corrected so that the codes' entropy meets `bits`: if a pass
//! misses it by more than 0.01 bit, the step is scaled by 2^(entropy −
//! target) and the sweep redone (three passes at most).
//!
//! Rows are independent given U: they run in parallel, each with the same
//! sequence of f32 operations whatever the thread count, so the codes are
//! deterministic.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::{Mat, Par};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::hessian::{error_trace, quadratic_trace};
use crate::part::{Coded, parse_meta};
use crate::rtn::{check_finite, round_i32};
use crate::{KernelError, Parts, Signal, nonuniform, rtn, uniform};
use hcx_protocol::stage::{GptqGrid, GptqSpec};

/// Rows per parallel task of the sweep.
const ROW_CHUNK: usize = 16;

/// Columns per tile of the lazy block update.
const COL_TILE: usize = 256;

/// Entropy passes of the uniform grid.
const UNIFORM_PASSES: usize = 3;

/// What [`encode`] returns.
#[derive(Debug, Clone)]
pub struct GptqOutput {
    /// Metadata `{"grid": <kind>, "codec": <the grid codec's metadata>}` and
    /// the grid codec's parts.
    pub coded: Coded,
    /// The decoded weight (what [`decode`] returns for `coded`).
    pub reconstruction: Vec<f32>,
    /// tr(E H Eᵀ), E = W − Ŵ: the output error on the calibration inputs.
    pub output_error: f64,
    /// tr(W H Wᵀ): the output energy on the calibration inputs.
    pub reference: f64,
}

/// The metadata [`encode`] writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GptqMeta {
    grid: String,
    codec: serde_json::Value,
}

/// One scalar grid with its parameters fixed.
trait Grid: Sync {
    /// The code of value `v` at (`row`, `col`) and the value the decoder
    /// reconstructs from it.
    fn quantize(&self, row: usize, col: usize, v: f32) -> (i32, f32);
}

/// rtn's grid, with per-group scales (and minima).
struct RtnGrid<'a> {
    group: usize,
    groups_per_row: usize,
    scales: &'a [f32],
    mins: &'a [f32],
    invs: Vec<f32>,
    symmetric: bool,
    qmax: i32,
    levels: i32,
}

impl Grid for RtnGrid<'_> {
    #[inline]
    fn quantize(&self, row: usize, col: usize, v: f32) -> (i32, f32) {
        let gi = row * self.groups_per_row + col / self.group;
        let (s, inv) = (self.scales[gi], self.invs[gi]);
        // The same arithmetic as rtn's encoder and decoder.
        if self.symmetric {
            let c = round_i32(v * inv).clamp(-self.qmax, self.qmax) + self.qmax;
            (c, (c - self.qmax) as f32 * s)
        } else {
            let lo = self.mins[gi];
            let c = round_i32((v - lo) * inv).clamp(0, self.levels - 1);
            (c, lo + c as f32 * s)
        }
    }
}

/// uniform's grid: one step, centroid offsets.
struct UniformGrid {
    inv: f32,
    dz: f32,
    step: f32,
    offsets: Vec<f32>,
}

impl Grid for UniformGrid {
    #[inline]
    fn quantize(&self, _row: usize, _col: usize, v: f32) -> (i32, f32) {
        let q = uniform::quantize(v, self.inv, self.dz);
        (q, uniform::reconstruct(q, self.step, &self.offsets))
    }
}

/// nonuniform's grid: levels, per-group scales.
struct NonuniformGrid<'a> {
    group: usize,
    groups_per_row: usize,
    scales: &'a [f32],
    invs: Vec<f32>,
    levels: &'a [f32],
    thresholds: &'a [f32],
}

impl Grid for NonuniformGrid<'_> {
    #[inline]
    fn quantize(&self, row: usize, col: usize, v: f32) -> (i32, f32) {
        let gi = row * self.groups_per_row + col / self.group;
        let i = nonuniform::nearest(self.thresholds, v * self.invs[gi]);
        (i as i32, self.levels[i] * self.scales[gi])
    }
}

fn inverses(scales: &[f32]) -> Vec<f32> {
    scales
        .iter()
        .map(|s| if *s > 0.0 { 1.0 / s } else { 0.0 })
        .collect()
}

/// The upper Cholesky factor U of the inverse of the damped Hessian in the
/// column order `perm` (Uᵀ U = P⁻¹ with P = H[perm][:, perm] + λ I, dead
/// inputs' rows and columns replaced by the identity's), row-major f32.
///
/// With J the order reversal and J P J = M Mᵀ (M lower), P⁻¹ = (J M⁻¹ J)ᵀ
/// (J M⁻¹ J) and J M⁻¹ J is upper triangular with a positive diagonal: one
/// Cholesky factorisation and one triangular inverse, sequential.
pub(crate) fn inverse_cholesky_upper(
    h: &[f64],
    n: usize,
    dead: &[bool],
    damp: f64,
    perm: &[usize],
) -> Result<Vec<f32>, KernelError> {
    let mut p = Mat::<f64>::zeros(n, n);
    for b in 0..n {
        let jb = perm[n - 1 - b];
        for a in b..n {
            let ia = perm[n - 1 - a];
            p[(a, b)] = if ia == jb {
                if dead[ia] {
                    1.0 + damp
                } else {
                    h[ia * n + ia] + damp
                }
            } else if dead[ia] || dead[jb] {
                0.0
            } else {
                h[ia * n + jb]
            };
        }
    }
    let mut buf = MemBuffer::new(cholesky_in_place_scratch::<f64>(
        n,
        Par::Seq,
        Default::default(),
    ));
    cholesky_in_place(
        p.as_mut(),
        Default::default(),
        Par::Seq,
        MemStack::new(&mut buf),
        Default::default(),
    )
    .map_err(|e| {
        KernelError::Values(format!(
            "the damped calibration Hessian is not positive definite ({e}); raise `damp`"
        ))
    })?;
    let mut minv = Mat::<f64>::zeros(n, n);
    invert_lower_triangular(minv.as_mut(), p.as_ref(), Par::Seq);
    let mut u = vec![0f32; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = minv[(n - 1 - i, n - 1 - j)] as f32;
        }
    }
    if u.iter().any(|v| !v.is_finite()) {
        return Err(KernelError::Values(
            "the inverse of the damped calibration Hessian is not finite; raise `damp`".into(),
        ));
    }
    Ok(u)
}

/// `w[j] -= e·u[j]` over a slice.
#[inline]
fn sub_scaled(w: &mut [f32], e: f32, u: &[f32]) {
    for (a, b) in w.iter_mut().zip(u) {
        *a -= e * b;
    }
}

/// The GPTQ sweep over `w` (`rows × n`, row-major): returns every value's
/// code and reconstruction, in the original column order.
fn sweep<G: Grid>(
    grid: &G,
    w: &[f32],
    rows: usize,
    n: usize,
    u: &[f32],
    perm: &[usize],
    block: usize,
) -> (Vec<i32>, Vec<f32>) {
    let mut codes = vec![0i32; rows * n];
    let mut recon = vec![0f32; rows * n];
    if rows == 0 || n == 0 {
        return (codes, recon);
    }
    codes
        .par_chunks_mut(ROW_CHUNK * n)
        .zip(recon.par_chunks_mut(ROW_CHUNK * n))
        .enumerate()
        .for_each(|(ci, (codes, recon))| {
            let r0 = ci * ROW_CHUNK;
            let rc = codes.len() / n;
            // The chunk's rows in the sweep's column order.
            let mut wp = vec![0f32; rc * n];
            for r in 0..rc {
                let src = &w[(r0 + r) * n..(r0 + r + 1) * n];
                for (d, p) in wp[r * n..(r + 1) * n].iter_mut().zip(perm) {
                    *d = src[*p];
                }
            }
            let mut err = vec![0f32; rc * block];
            for i1 in (0..n).step_by(block) {
                let i2 = (i1 + block).min(n);
                for i in i1..i2 {
                    let urow = &u[i * n..(i + 1) * n];
                    let d = urow[i];
                    let c = perm[i];
                    for r in 0..rc {
                        let wr = &mut wp[r * n..(r + 1) * n];
                        let v = wr[i];
                        let (q, rec) = grid.quantize(r0 + r, c, v);
                        codes[r * n + c] = q;
                        recon[r * n + c] = rec;
                        let e = (v - rec) / d;
                        err[r * block + i - i1] = e;
                        sub_scaled(&mut wr[i + 1..i2], e, &urow[i + 1..i2]);
                    }
                }
                // The lazy update of the columns after the block, by tiles
                // (each value still gets the block's terms in column order).
                for j0 in (i2..n).step_by(COL_TILE) {
                    let j1 = (j0 + COL_TILE).min(n);
                    for r in 0..rc {
                        let wr = &mut wp[r * n + j0..r * n + j1];
                        for t in 0..i2 - i1 {
                            let e = err[r * block + t];
                            sub_scaled(wr, e, &u[(i1 + t) * n + j0..(i1 + t) * n + j1]);
                        }
                    }
                }
            }
        });
    (codes, recon)
}

/// Quantizes `w` with GPTQ given the Hessian `h` of its inputs (row-major
/// `cols × cols`, f64).
pub fn encode(spec: &GptqSpec, w: &Signal, h: &[f64]) -> Result<GptqOutput, KernelError> {
    check_finite(&w.data)?;
    let (rows, n) = (w.rows, w.cols);
    if n.checked_mul(n) != Some(h.len()) {
        return Err(KernelError::shape(
            rows,
            n,
            format!(
                "the calibration Hessian has {} values, not {n} × {n} for rows of {n}",
                h.len()
            ),
        ));
    }
    if let Some(i) = h.iter().position(|v| !v.is_finite()) {
        return Err(KernelError::Values(format!(
            "calibration Hessian entry ({}, {}) is not finite",
            i / n,
            i % n
        )));
    }
    let diag: Vec<f64> = (0..n).map(|j| h[j * n + j]).collect();
    if let Some(j) = diag.iter().position(|d| *d < 0.0) {
        return Err(KernelError::Values(format!(
            "calibration Hessian diagonal entry {j} is negative"
        )));
    }
    let dead: Vec<bool> = diag.iter().map(|d| *d == 0.0).collect();
    let live_diag: Vec<f64> = diag
        .iter()
        .map(|d| if *d == 0.0 { 1.0 } else { *d })
        .collect();
    let mut wz = w.data.clone();
    if dead.iter().any(|d| *d) {
        for row in wz.chunks_mut(n.max(1)) {
            for (v, d) in row.iter_mut().zip(&dead) {
                if *d {
                    *v = 0.0;
                }
            }
        }
    }
    let wz = Signal::new(wz, rows, n);
    let lambda = spec.damp * live_diag.iter().sum::<f64>() / n.max(1) as f64;
    let mut perm: Vec<usize> = (0..n).collect();
    if spec.act_order {
        perm.sort_by(|a, b| live_diag[*b].total_cmp(&live_diag[*a]).then(a.cmp(b)));
    }
    let u = inverse_cholesky_upper(h, n, &dead, lambda, &perm)?;
    let block = spec.block.clamp(1, n.max(1));
    let (inner, recon) = match &spec.grid {
        GptqGrid::Rtn(s) => {
            let mut fit = rtn::fit(s, &wz)?;
            let levels = 1i32 << s.bits;
            let grid = RtnGrid {
                group: fit.group,
                groups_per_row: n / fit.group,
                scales: &fit.scales,
                mins: &fit.mins,
                invs: inverses(&fit.scales),
                symmetric: s.symmetric,
                qmax: levels / 2 - 1,
                levels,
            };
            let (codes, recon) = sweep(&grid, &wz.data, rows, n, &u, &perm, block);
            fit.codes = codes.into_iter().map(|c| c as u8).collect();
            (rtn::coded(s, &fit), recon)
        }
        GptqGrid::Nonuniform(s) => {
            let mut fit = nonuniform::fit(s, &wz)?;
            let grid = NonuniformGrid {
                group: fit.group,
                groups_per_row: n / fit.group,
                scales: &fit.scales,
                invs: inverses(&fit.scales),
                levels: &fit.levels,
                thresholds: &fit.thresholds,
            };
            let (codes, recon) = sweep(&grid, &wz.data, rows, n, &u, &perm, block);
            fit.codes = codes.into_iter().map(|c| c as u8).collect();
            (nonuniform::coded(s, &fit), recon)
        }
        GptqGrid::Uniform(s) => {
            let dz = s.deadzone as f32;
            let (mut step, _) = uniform::find_step(&wz.data, s.bits, dz);
            let all_zero = wz.data.iter().all(|v| *v == 0.0);
            let mut pass = 1;
            loop {
                let inv = 1.0 / step;
                let offsets =
                    uniform::offsets_for(&wz.data, &uniform::codes_at(&wz.data, inv, dz), inv);
                let grid = UniformGrid {
                    inv,
                    dz,
                    step,
                    offsets,
                };
                let (codes, recon) = sweep(&grid, &wz.data, rows, n, &u, &perm, block);
                let entropy = uniform::codes_entropy(&codes);
                let miss = entropy - s.bits;
                if pass == UNIFORM_PASSES || all_zero || miss.abs() <= 0.01 {
                    break (uniform::coded(&codes, step, grid.offsets, entropy)?, recon);
                }
                step = (step as f64 * miss.exp2()) as f32;
                pass += 1;
            }
        }
    };
    let reference = quadratic_trace(&w.data, rows, n, h);
    let output_error = error_trace(&w.data, &recon, rows, n, h);
    Ok(GptqOutput {
        coded: Coded {
            meta: json!({ "grid": spec.grid.kind(), "codec": inner.meta }),
            parts: inner.parts,
        },
        reconstruction: recon,
        output_error,
        reference,
    })
}

/// Decodes `rows × cols` values with the grid's decoder.
pub fn decode(
    meta: &serde_json::Value,
    parts: &Parts,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, KernelError> {
    let m: GptqMeta = parse_meta("gptq", meta)?;
    match m.grid.as_str() {
        "rtn" => rtn::decode(&m.codec, parts, rows, cols),
        "uniform" => uniform::decode(&m.codec, parts, rows, cols),
        "nonuniform" => nonuniform::decode(&m.codec, parts, rows, cols),
        other => Err(KernelError::Meta {
            stage: "gptq".into(),
            why: format!("unknown grid `{other}`"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hessian::HessianSum;
    use crate::rng::{SplitMix64, gaussian_vec};
    use faer::linalg::matmul::matmul;
    use faer::{Accum, MatRef};
    use hcx_protocol::stage::{LevelSource, NonuniformSpec, RtnSpec, UniformSpec};
    use proptest::prelude::*;

    fn rtn4(group: usize) -> RtnSpec {
        RtnSpec {
            bits: 4,
            group: Some(group),
            symmetric: true,
            search: false,
        }
    }

    fn gptq(grid: GptqGrid, act_order: bool) -> GptqSpec {
        GptqSpec {
            grid,
            damp: 0.01,
            block: 128,
            act_order,
        }
    }

    /// Inputs x = A z with a seeded random mixing A whose columns fade
    /// (A = G·diag(0.98^k): strongly correlated inputs, a decaying
    /// spectrum), `n` rows; returns H = XᵀX.
    fn correlated_hessian(seed: u64, cols: usize, n: usize) -> Vec<f64> {
        let mut a = gaussian_vec(seed, cols * cols);
        for (i, v) in a.iter_mut().enumerate() {
            *v *= 0.98f32.powi((i % cols) as i32);
        }
        let z = gaussian_vec(seed + 1, n * cols);
        let am = MatRef::from_row_major_slice(&a, cols, cols);
        let zm = MatRef::from_row_major_slice(&z, n, cols);
        let mut x = Mat::<f32>::zeros(n, cols);
        matmul(
            x.as_mut(),
            Accum::Replace,
            zm,
            am.transpose(),
            1.0 / (cols as f32).sqrt(),
            Par::Seq,
        );
        let rowmajor: Vec<f32> = (0..n)
            .flat_map(|r| (0..cols).map(move |c| (r, c)))
            .map(|(r, c)| x[(r, c)])
            .collect();
        let mut hs = HessianSum::new(cols);
        hs.add_batch(&rowmajor, n).unwrap();
        hs.to_f64()
    }

    fn perm_for(h: &[f64], n: usize, act_order: bool) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..n).collect();
        if act_order {
            perm.sort_by(|a, b| h[*b * n + *b].total_cmp(&h[*a * n + *a]).then(a.cmp(b)));
        }
        perm
    }

    #[test]
    fn inverse_cholesky_factor_inverts_the_damped_hessian() {
        let n = 48;
        let h = correlated_hessian(3, n, 100);
        let dead = vec![false; n];
        for act in [false, true] {
            let perm = perm_for(&h, n, act);
            let u = inverse_cholesky_upper(&h, n, &dead, 0.5, &perm).unwrap();
            // (UᵀU)·P = I.
            for i in 0..n {
                for j in 0..n {
                    let mut s = 0f64;
                    for k in 0..n {
                        let mut ut_u = 0f64;
                        for t in 0..n {
                            ut_u += u[t * n + i] as f64 * u[t * n + k] as f64;
                        }
                        let p = h[perm[k] * n + perm[j]] + if k == j { 0.5 } else { 0.0 };
                        s += ut_u * p;
                    }
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((s - want).abs() < 1e-3, "{act} {i},{j}: {s}");
                }
            }
        }
    }

    #[test]
    fn gptq_beats_rtn_as_the_theory_predicts() {
        let (rows, cols, n, group) = (64, 256, 4096, 64);
        let w = Signal::new(gaussian_vec(1, rows * cols), rows, cols);
        let h = correlated_hessian(2, cols, n);
        let spec = rtn4(group);
        let fit = rtn::fit(&spec, &w).unwrap();
        let c = rtn::encode(&spec, &w).unwrap();
        let rtn_y = rtn::decode(&c.meta, &Parts::new(c.parts), rows, cols).unwrap();
        let rtn_err = error_trace(&w.data, &rtn_y, rows, cols, &h);
        // σ² = Δ²/12 per value, Δ its group's scale.
        let var = |r: usize, c: usize| {
            let s = fit.scales[r * (cols / group) + c / group] as f64;
            s * s / 12.0
        };
        let mut rtn_pred = 0.0;
        for r in 0..rows {
            for c in 0..cols {
                rtn_pred += var(r, c) * h[c * cols + c];
            }
        }
        let dead = vec![false; cols];
        let lambda = 0.01 * (0..cols).map(|j| h[j * cols + j]).sum::<f64>() / cols as f64;
        let rtn_db = 10.0 * (rtn_err / rtn_pred).log10();
        println!(
            "RTN:   measured {rtn_err:.4e}, predicted Σσ²H_jj {rtn_pred:.4e} ({rtn_db:+.2} dB off)"
        );
        for act in [false, true] {
            let out = encode(&gptq(GptqGrid::Rtn(spec.clone()), act), &w, &h).unwrap();
            let perm = perm_for(&h, cols, act);
            let u = inverse_cholesky_upper(&h, cols, &dead, lambda, &perm).unwrap();
            let mut pred = 0.0;
            for r in 0..rows {
                for (i, &c) in perm.iter().enumerate() {
                    let d = u[i * cols + i] as f64;
                    pred += var(r, c) / (d * d);
                }
            }
            let gain = 10.0 * (rtn_err / out.output_error).log10();
            let predicted = 10.0 * (rtn_pred / pred).log10();
            println!(
                "GPTQ (act_order {act}): measured {:.4e}, predicted Σσ²/U_jj² {pred:.4e}; \
                 gain over RTN {gain:.2} dB, predicted {predicted:.2} dB; output SQNR {:.2} dB vs RTN {:.2} dB",
                out.output_error,
                10.0 * (out.reference / out.output_error).log10(),
                10.0 * (out.reference / rtn_err).log10(),
            );
            assert!(
                predicted > 3.0,
                "the test layer should favour GPTQ: {predicted}"
            );
            assert!(
                gain >= 0.5 * predicted,
                "{gain:.2} dB < half of {predicted:.2} dB"
            );
            assert!(
                (out.reference - quadratic_trace(&w.data, rows, cols, &h)).abs()
                    < 1e-9 * out.reference
            );
        }
    }

    #[test]
    fn white_inputs_give_rtn_codes() {
        let (rows, cols) = (12, 128);
        let w = Signal::new(gaussian_vec(4, rows * cols), rows, cols);
        let mut h = vec![0f64; cols * cols];
        for j in 0..cols {
            h[j * cols + j] = 1.0;
        }
        for (symmetric, search) in [(true, false), (false, false), (true, true), (false, true)] {
            let spec = RtnSpec {
                bits: 3,
                group: Some(32),
                symmetric,
                search,
            };
            let plain = rtn::encode(&spec, &w).unwrap();
            for act in [false, true] {
                let out = encode(&gptq(GptqGrid::Rtn(spec.clone()), act), &w, &h).unwrap();
                assert_eq!(out.coded.parts, plain.parts, "{symmetric} {search} {act}");
                assert_eq!(out.coded.meta["codec"], plain.meta);
                assert_eq!(out.coded.meta["grid"], "rtn");
            }
        }
    }

    fn grids() -> Vec<GptqGrid> {
        vec![
            GptqGrid::Rtn(RtnSpec {
                bits: 4,
                group: Some(64),
                symmetric: false,
                search: true,
            }),
            GptqGrid::Uniform(UniformSpec {
                bits: 3.0,
                deadzone: 0.1,
            }),
            GptqGrid::Nonuniform(NonuniformSpec {
                bits: 3,
                group: 64,
                levels: LevelSource::Learned,
            }),
        ]
    }

    #[test]
    fn same_codes_whatever_the_thread_count() {
        let (rows, cols) = (40, 256);
        let w = Signal::new(gaussian_vec(5, rows * cols), rows, cols);
        let h = correlated_hessian(6, cols, 600);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for grid in grids() {
            let spec = GptqSpec {
                grid,
                damp: 0.01,
                block: 48,
                act_order: true,
            };
            let a = one.install(|| encode(&spec, &w, &h).unwrap());
            let b = encode(&spec, &w, &h).unwrap();
            assert_eq!(a.coded.parts, b.coded.parts);
            assert_eq!(a.coded.meta, b.coded.meta);
            assert_eq!(a.output_error.to_bits(), b.output_error.to_bits());
        }
    }

    #[test]
    fn uniform_grid_meets_its_entropy_and_gains() {
        let (rows, cols) = (64, 256);
        let w = Signal::new(gaussian_vec(7, rows * cols), rows, cols);
        let h = correlated_hessian(8, cols, 2048);
        let grid = UniformSpec {
            bits: 3.0,
            deadzone: 0.0,
        };
        let out = encode(&gptq(GptqGrid::Uniform(grid.clone()), true), &w, &h).unwrap();
        let m: uniform::UniformMeta = parse_meta("uniform", &out.coded.meta["codec"]).unwrap();
        assert!((m.entropy_bits - 3.0).abs() < 0.05, "{}", m.entropy_bits);
        let plain = uniform::encode(&grid, &w).unwrap();
        let y = uniform::decode(&plain.meta, &Parts::new(plain.parts), rows, cols).unwrap();
        let plain_err = error_trace(&w.data, &y, rows, cols, &h);
        println!(
            "uniform 3 bits: plain {plain_err:.4e}, GPTQ {:.4e} at {:.3} bits",
            out.output_error, m.entropy_bits
        );
        assert!(out.output_error < 0.5 * plain_err);
    }

    #[test]
    fn dead_inputs_get_zero_weights() {
        let (rows, cols) = (4, 64);
        let w = Signal::new(gaussian_vec(9, rows * cols), rows, cols);
        let mut h = correlated_hessian(10, cols, 300);
        for k in 0..cols {
            h[5 * cols + k] = 0.0;
            h[k * cols + 5] = 0.0;
        }
        let spec = gptq(
            GptqGrid::Nonuniform(NonuniformSpec {
                bits: 4,
                group: 32,
                levels: LevelSource::LloydMax,
            }),
            true,
        );
        let out = encode(&spec, &w, &h).unwrap();
        for r in 0..rows {
            // Level 0 is not among the Lloyd–Max levels: the nearest one.
            assert!(out.reconstruction[r * cols + 5].abs() < 0.3, "{r}");
        }
        let mut bad = h.clone();
        bad[0] = -1.0;
        assert!(encode(&spec, &w, &bad).is_err());
        assert!(encode(&spec, &w, &h[1..]).is_err());
    }

    #[test]
    fn unknown_grid_is_an_error() {
        let e = decode(
            &json!({"grid": "vq", "codec": {}}),
            &Parts::new(vec![]),
            1,
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown grid"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn decode_gives_the_reconstruction_fed_back(
            seed in any::<u64>(),
            rows in 1usize..20,
            wide in any::<bool>(),
            which in 0usize..3,
            act_order in any::<bool>(),
            block in 1usize..80,
            dead_col in proptest::option::of(0usize..64),
            samples in 2usize..100,
        ) {
            let cols = if wide { 128 } else { 64 };
            let w = Signal::new(gaussian_vec(seed, rows * cols), rows, cols);
            let mut r = SplitMix64::new(seed ^ 1);
            let mut x: Vec<f32> = (0..samples * cols).map(|_| r.gaussian() as f32).collect();
            if let Some(d) = dead_col {
                for row in x.chunks_mut(cols) {
                    row[d] = 0.0;
                }
            }
            let mut hs = HessianSum::new(cols);
            hs.add_batch(&x, samples).unwrap();
            let h = hs.to_f64();
            let spec = GptqSpec { grid: grids()[which].clone(), damp: 0.01, block, act_order };
            let out = encode(&spec, &w, &h).unwrap();
            let y = decode(&out.coded.meta, &Parts::new(out.coded.parts.clone()), rows, cols).unwrap();
            prop_assert!(y.iter().zip(&out.reconstruction).all(|(a, b)| a.to_bits() == b.to_bits()));
            let e = error_trace(&w.data, &y, rows, cols, &h);
            prop_assert!((e - out.output_error).abs() <= 1e-9 * e.abs());
            prop_assert!(out.output_error >= 0.0 && out.reference >= 0.0);
        }
    }
}
