//! Low-rank decomposition: W (rows × cols) ≈ U·V, the residual goes on.
//!
//! U is rows × r and V is r × cols, both stored as f16 (parts `u`, shape
//! `[rows, r]`, and `v`, shape `[r, cols]`, row-major). The singular values
//! are split evenly: with W ≈ Ũ·diag(σ)·Ṽᵀ, U = Ũ·diag(√σ) and
//! V = diag(√σ)·Ṽᵀ, which keeps both factors in the same range (kind to f16).
//!
//! The rank is fixed (`rank`, clamped to min(rows, cols)), a fraction
//! (`rank_fraction`: ⌈f·min(rows, cols)⌉) or chosen by energy (`energy`: the
//! smallest r whose squared singular values reach that fraction of the
//! total).
//!
//! When min(rows, cols) ≤ 1024 a full thin SVD is taken. Above that a
//! randomised SVD (Halko, Martinsson, Tropp 2011) is used: a Gaussian sketch
//! of width l = r + 10 drawn from [`SplitMix64`] seeded with the stage seed
//! (filled column by column), two power iterations re-orthonormalised by
//! Householder QR, then the SVD of the small l-column matrix. When the
//! sketch would be wider than half of min(rows, cols) the randomised method
//! saves nothing and the full thin SVD is used instead. With `energy` on a
//! large matrix the sketch rank k starts at 64 and doubles (sketch width
//! k + 10) until the first k singular values of the sketch hold the
//! requested fraction of ‖W‖²_F (computed exactly from the input); r is the
//! smallest rank inside the sketch that does. Since U·Vᵀ is then an
//! orthogonal projection of W, the dropped energy (before f16 rounding) is at
//! most (1 − energy)·‖W‖²_F. If the sketch outgrows half of min(rows, cols)
//! the full thin SVD is taken.
//!
//! The residual is W − U·V computed with the f16-rounded factors by
//! [`product`]-style plain f32 loops (shared with the decoder), so the
//! decoder adds back exactly what the encoder subtracted, on any machine.
//!
//! Determinism: every faer call runs with `Par::Seq`. faer's parallel SVD is
//! not bit-reproducible across thread counts (checked with faer 0.24.4:
//! `Par::rayon(2)`, `(3)`, `(4)`, `(8)` each give singular values and vectors
//! that differ in the last bits from `Par::Seq` and `Par::rayon(1)`). The large products of the
//! randomised path are parallelised here instead, over fixed blocks of 256
//! rows, each block a sequential faer product, so the result does not depend
//! on the rayon pool size.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::householder::{
    apply_block_householder_sequence_on_the_left_in_place_scratch,
    apply_block_householder_sequence_on_the_left_in_place_with_conj,
};
use faer::linalg::matmul::matmul;
use faer::linalg::qr::no_pivoting::factor::{
    qr_in_place, qr_in_place_scratch, recommended_block_size,
};
use faer::linalg::svd::{ComputeSvdVectors, svd, svd_scratch};
use faer::{Accum, Conj, Mat, MatRef, Par};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::part::{parse_meta, round_f16, to_meta};
use crate::rng::SplitMix64;
use crate::{KernelError, Part, Parts, Signal, Split, stats};
use hcx_protocol::stage::LowrankSpec;

const STAGE: &str = "lowrank";
/// Largest min(rows, cols) that gets a full thin SVD.
const FULL_SVD_MAX: usize = 1024;
/// Extra sketch columns of the randomised SVD.
const OVERSAMPLE: usize = 10;
/// Power iterations of the randomised SVD.
const POWER_ITERS: usize = 2;
/// First sketch rank when choosing the rank by energy on a large matrix.
const ENERGY_START_RANK: usize = 64;
/// Rows per block of the parallel products (fixed: results do not depend on
/// the thread count).
const BLOCK: usize = 256;

/// What the decoder needs besides the parts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LowrankMeta {
    /// The rank r.
    rank: usize,
    /// How the factors were found: `svd` or `randomized` (informative).
    #[serde(default)]
    method: String,
}

/// Splits off this stage's parts; the rest of the signal goes on down the chain.
pub fn encode(spec: &LowrankSpec, x: &Signal, seed: u64) -> Result<Split, KernelError> {
    let (rows, cols) = (x.rows, x.cols);
    if rows.checked_mul(cols) != Some(x.data.len()) {
        return Err(KernelError::shape(
            rows,
            cols,
            format!("{} values do not fill the matrix", x.data.len()),
        ));
    }
    if rows <= 1 {
        return Err(KernelError::shape(
            rows,
            cols,
            "low-rank needs a matrix (a tensor with at least two rows)",
        ));
    }
    if cols == 0 {
        return Err(KernelError::shape(
            rows,
            cols,
            "low-rank needs a non-empty matrix",
        ));
    }
    if let Some(i) = x.data.iter().position(|v| !v.is_finite()) {
        return Err(KernelError::Values(format!(
            "value {} at flat index {i} is not finite",
            x.data[i]
        )));
    }
    let mn = rows.min(cols);
    let target = target_of(spec, mn)?;
    let a = MatRef::from_row_major_slice(&x.data, rows, cols);
    let f = factorize(a, target, seed, &x.data)?;
    let r = f.rank;

    // Split √σ into both factors, row-major, rounded through f16.
    let mut u = vec![0f32; rows * r];
    let mut v = vec![0f32; r * cols];
    for t in 0..r {
        let w = f.s[t].max(0.0).sqrt();
        for i in 0..rows {
            u[i * r + t] = round_f16(f.u[(i, t)] * w);
        }
        for j in 0..cols {
            v[t * cols + j] = round_f16(f.v[(j, t)] * w);
        }
    }
    if u.iter().chain(&v).any(|c| !c.is_finite()) {
        return Err(KernelError::Values(
            "low-rank factors exceed the f16 range".to_string(),
        ));
    }

    let mut residual = product(&u, &v, rows, r, cols);
    residual
        .par_iter_mut()
        .zip(x.data.par_iter())
        .for_each(|(d, w)| *d = w - *d);

    let meta = to_meta(&LowrankMeta {
        rank: r,
        method: f.method.to_string(),
    });
    let parts = vec![
        Part::f16("u", &u, vec![rows, r]),
        Part::f16("v", &v, vec![r, cols]),
    ];
    let (rest, dropped_energy) = if spec.keep_residual {
        (Some(Signal::new(residual, rows, cols)), 0.0)
    } else {
        (None, stats::energy(&residual))
    };
    Ok(Split {
        meta,
        parts,
        rest,
        dropped_energy,
    })
}

/// Rebuilds rows*cols values from this stage's parts and the decoded rest of the chain (`rest` is None when the stage dropped it).
pub fn decode(
    meta: &serde_json::Value,
    parts: &Parts,
    rest: Option<Vec<f32>>,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, KernelError> {
    let m: LowrankMeta = parse_meta(STAGE, meta)?;
    let bad = |why: String| KernelError::Meta {
        stage: STAGE.to_string(),
        why,
    };
    let r = m.rank;
    if r == 0 || r > rows.min(cols) {
        return Err(bad(format!("rank {r} is not in 1..=min({rows}, {cols})")));
    }
    let n = rows
        .checked_mul(cols)
        .ok_or_else(|| bad(format!("shape [{rows}, {cols}] overflows")))?;
    // r ≤ min(rows, cols), so these cannot overflow once rows·cols does not.
    let u = parts.f16_values("u", rows * r)?;
    let v = parts.f16_values("v", r * cols)?;
    if let Some(rest) = &rest
        && rest.len() != n
    {
        return Err(bad(format!(
            "the rest has {} values, expected {n}",
            rest.len()
        )));
    }
    let mut out = product(&u, &v, rows, r, cols);
    if let Some(rest) = rest {
        out.par_iter_mut()
            .zip(rest.par_iter())
            .for_each(|(o, e)| *o += e);
    }
    Ok(out)
}

/// U·V in f32: U is rows × r, V is r × cols, both row-major. Each output is
/// accumulated over t = 0..r in order, one row per task, so the result is
/// the same whatever the thread count and on every machine (no FMA
/// contraction in Rust).
fn product(u: &[f32], v: &[f32], rows: usize, r: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    if r == 0 || cols == 0 {
        return out;
    }
    out.par_chunks_mut(cols)
        .zip(u.par_chunks(r))
        .for_each(|(o, ur)| {
            for (t, a) in ur.iter().enumerate() {
                let vr = &v[t * cols..(t + 1) * cols];
                for (o, b) in o.iter_mut().zip(vr) {
                    *o += a * b;
                }
            }
        });
    out
}

/// How the rank is chosen.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// A fixed rank in 1..=min(rows, cols).
    Rank(usize),
    /// The smallest rank keeping this fraction of the energy.
    Energy(f64),
}

fn target_of(spec: &LowrankSpec, mn: usize) -> Result<Target, KernelError> {
    let bad = |why: &str| KernelError::Meta {
        stage: STAGE.to_string(),
        why: why.to_string(),
    };
    match (spec.rank, spec.rank_fraction, spec.energy) {
        (Some(r), None, None) => {
            if r == 0 {
                return Err(bad("`rank` must be at least 1"));
            }
            Ok(Target::Rank(r.min(mn)))
        }
        (None, Some(f), None) => {
            if !(f > 0.0 && f <= 1.0) {
                return Err(bad("`rank_fraction` must be in (0, 1]"));
            }
            // The small slack keeps e.g. 0.25·1024 from becoming 257.
            let r = (f * mn as f64 - 1e-9).ceil().max(1.0) as usize;
            Ok(Target::Rank(r.min(mn)))
        }
        (None, None, Some(e)) => {
            if !(e > 0.0 && e <= 1.0) {
                return Err(bad("`energy` must be in (0, 1]"));
            }
            Ok(Target::Energy(e))
        }
        _ => Err(bad("give exactly one of `rank`, `rank_fraction`, `energy`")),
    }
}

/// Singular triplets (U, σ, V) with A ≈ U·diag(σ)·Vᵀ.
type Triplets = (Mat<f32>, Vec<f32>, Mat<f32>);

/// A truncated SVD: `u` (rows × rank), `s`, `v` (cols × rank), W ≈ u·diag(s)·vᵀ.
struct Factors {
    u: Mat<f32>,
    s: Vec<f32>,
    v: Mat<f32>,
    rank: usize,
    method: &'static str,
}

/// Finds the rank and the leading singular triplets of `a`.
fn factorize(
    a: MatRef<'_, f32>,
    target: Target,
    seed: u64,
    data: &[f32],
) -> Result<Factors, KernelError> {
    let mn = a.nrows().min(a.ncols());
    let full = |target: Target| -> Result<Factors, KernelError> {
        let (u, s, v) = thin_svd(a)?;
        let rank = match target {
            Target::Rank(r) => r,
            Target::Energy(e) => {
                let total: f64 = s.iter().map(|x| (*x as f64) * (*x as f64)).sum();
                rank_for_energy(&s, e * total).unwrap_or(mn)
            }
        };
        Ok(Factors {
            u,
            s,
            v,
            rank,
            method: "svd",
        })
    };
    if mn <= FULL_SVD_MAX {
        return full(target);
    }
    let fits = |k: usize| 2 * (k + OVERSAMPLE) <= mn;
    match target {
        Target::Rank(r) => {
            if !fits(r) {
                return full(target);
            }
            let (u, s, v) = randomized_svd(a, r + OVERSAMPLE, seed)?;
            Ok(Factors {
                u,
                s,
                v,
                rank: r,
                method: "randomized",
            })
        }
        Target::Energy(e) => {
            let goal = e * stats::energy(data);
            let mut k = ENERGY_START_RANK;
            while fits(k) {
                let (u, s, v) = randomized_svd(a, k + OVERSAMPLE, seed)?;
                if let Some(rank) = rank_for_energy(&s[..k], goal) {
                    return Ok(Factors {
                        u,
                        s,
                        v,
                        rank,
                        method: "randomized",
                    });
                }
                k *= 2;
            }
            full(target)
        }
    }
}

/// The smallest r whose first r squared values reach `goal`.
fn rank_for_energy(s: &[f32], goal: f64) -> Option<usize> {
    let mut cum = 0f64;
    for (i, x) in s.iter().enumerate() {
        cum += (*x as f64) * (*x as f64);
        if cum >= goal {
            return Some(i + 1);
        }
    }
    None
}

/// Thin SVD with faer, sequential: (U, σ, V) with A = U·diag(σ)·Vᵀ, σ sorted
/// in nonincreasing order.
fn thin_svd(a: MatRef<'_, f32>) -> Result<Triplets, KernelError> {
    let (m, n) = (a.nrows(), a.ncols());
    let size = m.min(n);
    let mut u = Mat::<f32>::zeros(m, size);
    let mut v = Mat::<f32>::zeros(n, size);
    let mut s = faer::diag::Diag::<f32>::zeros(size);
    let req = svd_scratch::<f32>(
        m,
        n,
        ComputeSvdVectors::Thin,
        ComputeSvdVectors::Thin,
        Par::Seq,
        Default::default(),
    );
    let mut buf = MemBuffer::new(req);
    svd(
        a,
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        Par::Seq,
        MemStack::new(&mut buf),
        Default::default(),
    )
    .map_err(|e| KernelError::Values(format!("the SVD did not converge: {e:?}")))?;
    let s = s.column_vector().iter().copied().collect();
    Ok((u, s, v))
}

/// An orthonormal basis of the columns of `y` (m × l, m ≥ l): the thin Q of
/// its Householder QR, sequential.
fn orthonormalize(y: Mat<f32>) -> Mat<f32> {
    let (m, l) = (y.nrows(), y.ncols());
    let bs = recommended_block_size::<f32>(m, l);
    let mut qr = y;
    let mut coeff = Mat::<f32>::zeros(bs, l);
    let mut buf = MemBuffer::new(qr_in_place_scratch::<f32>(
        m,
        l,
        bs,
        Par::Seq,
        Default::default(),
    ));
    qr_in_place(
        qr.as_mut(),
        coeff.as_mut(),
        Par::Seq,
        MemStack::new(&mut buf),
        Default::default(),
    );
    // The Householder basis: unit lower trapezoid (as faer's `Qr` stores it).
    for j in 0..l {
        for i in 0..j.min(m) {
            qr[(i, j)] = 0.0;
        }
        if j < m {
            qr[(j, j)] = 1.0;
        }
    }
    let mut q = Mat::<f32>::identity(m, l);
    let mut buf = MemBuffer::new(
        apply_block_householder_sequence_on_the_left_in_place_scratch::<f32>(m, bs, l),
    );
    apply_block_householder_sequence_on_the_left_in_place_with_conj(
        qr.as_ref(),
        coeff.as_ref(),
        Conj::No,
        q.as_mut(),
        Par::Seq,
        MemStack::new(&mut buf),
    );
    q
}

/// lhs·rhs, parallel over fixed blocks of [`BLOCK`] rows of lhs, each a
/// sequential faer product (bit-identical whatever the thread count).
fn mul_blocked(lhs: MatRef<'_, f32>, rhs: MatRef<'_, f32>) -> Mat<f32> {
    let (m, l) = (lhs.nrows(), rhs.ncols());
    let starts: Vec<usize> = (0..m).step_by(BLOCK).collect();
    let blocks: Vec<Mat<f32>> = starts
        .par_iter()
        .map(|&r0| {
            let r1 = (r0 + BLOCK).min(m);
            let mut out = Mat::<f32>::zeros(r1 - r0, l);
            matmul(
                out.as_mut(),
                Accum::Replace,
                lhs.get(r0..r1, ..),
                rhs,
                1.0,
                Par::Seq,
            );
            out
        })
        .collect();
    let mut y = Mat::<f32>::zeros(m, l);
    for (&r0, b) in starts.iter().zip(&blocks) {
        y.as_mut().get_mut(r0..r0 + b.nrows(), ..).copy_from(b);
    }
    y
}

/// Randomised SVD with a sketch of `l` columns: (U, σ, V), l triplets.
fn randomized_svd(a: MatRef<'_, f32>, l: usize, seed: u64) -> Result<Triplets, KernelError> {
    let n = a.ncols();
    let mut rng = SplitMix64::new(seed);
    let mut omega = Mat::<f32>::zeros(n, l);
    for j in 0..l {
        for i in 0..n {
            omega[(i, j)] = rng.gaussian() as f32;
        }
    }
    let at = a.transpose();
    let mut q = orthonormalize(mul_blocked(a, omega.as_ref()));
    for _ in 0..POWER_ITERS {
        let z = orthonormalize(mul_blocked(at, q.as_ref()));
        q = orthonormalize(mul_blocked(a, z.as_ref()));
    }
    // C = Aᵀ·Q = (Qᵀ·A)ᵀ; with C = Uc·diag(σ)·Vcᵀ, A ≈ Q·Qᵀ·A = (Q·Vc)·diag(σ)·Ucᵀ.
    let c = mul_blocked(at, q.as_ref());
    let (uc, s, vc) = thin_svd(c.as_ref())?;
    let u = mul_blocked(q.as_ref(), vc.as_ref());
    Ok((u, s, uc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::gaussian_vec;
    use proptest::prelude::*;

    fn spec(
        rank: Option<usize>,
        fraction: Option<f64>,
        energy: Option<f64>,
        keep: bool,
    ) -> LowrankSpec {
        LowrankSpec {
            rank,
            rank_fraction: fraction,
            energy,
            keep_residual: keep,
        }
    }

    /// rows × cols of exact rank `r` (+ `noise`·N(0,1)).
    fn low_rank(rows: usize, cols: usize, r: usize, noise: f32, seed: u64) -> Vec<f32> {
        let l = gaussian_vec(seed, rows * r);
        let rt = gaussian_vec(seed + 1, r * cols);
        let e = gaussian_vec(seed + 2, rows * cols);
        let mut w = product(&l, &rt, rows, r, cols);
        for (w, e) in w.iter_mut().zip(&e) {
            *w += noise * e;
        }
        w
    }

    fn parts_of(s: &Split) -> Parts {
        Parts::new(s.parts.clone())
    }

    fn check_round_trip(x: &Signal, s: &Split) {
        let parts = parts_of(s);
        let ab = decode(&s.meta, &parts, None, x.rows, x.cols).unwrap();
        let rest = s.rest.as_ref().unwrap();
        let y = decode(&s.meta, &parts, Some(rest.data.clone()), x.rows, x.cols).unwrap();
        for i in 0..x.data.len() {
            let (w, a, d) = (x.data[i], ab[i], rest.data[i]);
            // The residual itself is exactly w − a rounded once.
            assert_eq!(d, w - a);
            let tol = 1.2e-7 * (w.abs() + a.abs() + d.abs()) + f32::MIN_POSITIVE;
            assert!((y[i] - w).abs() <= tol, "{i}: {} vs {w}", y[i]);
        }
    }

    #[test]
    fn rank5_plus_noise_is_recovered() {
        let (rows, cols) = (60, 90);
        let w = low_rank(rows, cols, 5, 1e-5, 11);
        let x = Signal::new(w.clone(), rows, cols);
        let s = encode(&spec(Some(5), None, None, true), &x, 1).unwrap();
        assert_eq!(s.meta["rank"], 5);
        assert_eq!(s.parts[0].shape, vec![rows, 5]);
        assert_eq!(s.parts[1].shape, vec![5, cols]);
        let ab = decode(&s.meta, &parts_of(&s), None, rows, cols).unwrap();
        let q = stats::sqnr_db(&w, &ab).unwrap();
        assert!(q > 60.0, "SQNR {q} dB");
        assert_eq!(s.dropped_energy, 0.0);
        check_round_trip(&x, &s);
    }

    #[test]
    fn rank_is_clamped_and_fraction_rounds_up() {
        let x = Signal::new(gaussian_vec(3, 6 * 10), 6, 10);
        let s = encode(&spec(Some(50), None, None, true), &x, 0).unwrap();
        assert_eq!(s.meta["rank"], 6);
        let s = encode(&spec(None, Some(0.34), None, true), &x, 0).unwrap();
        assert_eq!(s.meta["rank"], 3); // ceil(0.34·6) = ceil(2.04)
        let s = encode(&spec(None, Some(0.5), None, true), &x, 0).unwrap();
        assert_eq!(s.meta["rank"], 3);
        check_round_trip(&x, &s);
    }

    /// A matrix with singular values `sv` and random orthonormal vectors.
    fn with_spectrum(rows: usize, cols: usize, sv: &[f32], seed: u64) -> Vec<f32> {
        let k = sv.len();
        let (ru, rv) = (
            gaussian_vec(seed, rows * k),
            gaussian_vec(seed + 1, cols * k),
        );
        let gu = Mat::<f32>::from_fn(rows, k, |i, j| ru[i * k + j]);
        let gv = Mat::<f32>::from_fn(cols, k, |i, j| rv[i * k + j]);
        let (qu, qv) = (orthonormalize(gu), orthonormalize(gv));
        let mut u = vec![0f32; rows * k];
        let mut v = vec![0f32; k * cols];
        for t in 0..k {
            for i in 0..rows {
                u[i * k + t] = qu[(i, t)] * sv[t];
            }
            for j in 0..cols {
                v[t * cols + j] = qv[(j, t)];
            }
        }
        product(&u, &v, rows, k, cols)
    }

    #[test]
    fn energy_picks_the_smallest_sufficient_rank() {
        let sv = [10.0f32, 6.0, 3.0, 1.0, 0.5, 0.1];
        let (rows, cols) = (40, 30);
        let w = with_spectrum(rows, cols, &sv, 5);
        let x = Signal::new(w, rows, cols);
        let total: f64 = sv.iter().map(|s| (*s as f64).powi(2)).sum();
        let mut cum = 0.0;
        for (i, s) in sv.iter().enumerate() {
            let before = cum;
            cum += (*s as f64).powi(2);
            // Just above the previous cumulative fraction needs rank i + 1.
            let e = (before / total + cum / total) / 2.0;
            let sp = encode(&spec(None, None, Some(e), true), &x, 0).unwrap();
            assert_eq!(sp.meta["rank"], i + 1, "energy {e}");
        }
        let sp = encode(&spec(None, None, Some(0.9), true), &x, 0).unwrap();
        assert_eq!(sp.meta["rank"], 2); // (100 + 36) / 146.26 = 0.93
    }

    #[test]
    fn dropping_the_residual_reports_its_energy() {
        let (rows, cols) = (20, 16);
        let w = low_rank(rows, cols, 3, 0.1, 21);
        let x = Signal::new(w.clone(), rows, cols);
        let s = encode(&spec(Some(3), None, None, false), &x, 0).unwrap();
        assert!(s.rest.is_none());
        let ab = decode(&s.meta, &parts_of(&s), None, rows, cols).unwrap();
        let err = stats::squared_error(&w, &ab);
        assert!(
            (s.dropped_energy - err).abs() <= 1e-9 * err.max(1e-30),
            "{} vs {err}",
            s.dropped_energy
        );
        assert!(s.dropped_energy > 0.0);
    }

    #[test]
    fn randomized_path_recovers_a_large_low_rank_matrix() {
        let (rows, cols) = (1100, 1200);
        let w = low_rank(rows, cols, 8, 1e-4, 31);
        let x = Signal::new(w.clone(), rows, cols);
        let s = encode(&spec(Some(8), None, None, true), &x, 9).unwrap();
        assert_eq!(s.meta["method"], "randomized");
        assert_eq!(s.meta["rank"], 8);
        let ab = decode(&s.meta, &parts_of(&s), None, rows, cols).unwrap();
        let q = stats::sqnr_db(&w, &ab).unwrap();
        assert!(q > 55.0, "SQNR {q} dB");
        check_round_trip(&x, &s);

        // Energy on a large matrix: rank 8 holds (nearly) everything.
        let s = encode(&spec(None, None, Some(0.999), true), &x, 9).unwrap();
        assert_eq!(s.meta["method"], "randomized");
        assert!(s.meta["rank"].as_u64().unwrap() <= 8, "{}", s.meta);

        // Same bytes whatever the number of threads.
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let sp = spec(Some(8), None, None, true);
        let a = one.install(|| encode(&sp, &x, 9).unwrap());
        let b = three.install(|| encode(&sp, &x, 9).unwrap());
        assert_eq!(a.parts, b.parts);
        assert_eq!(a.rest, b.rest);
    }

    #[test]
    fn full_svd_is_thread_count_independent() {
        let (rows, cols) = (300, 200);
        let x = Signal::new(gaussian_vec(8, rows * cols), rows, cols);
        let sp = spec(None, Some(0.1), None, true);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let four = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let a = one.install(|| encode(&sp, &x, 2).unwrap());
        let b = four.install(|| encode(&sp, &x, 2).unwrap());
        assert_eq!(a.parts, b.parts);
        assert_eq!(a.rest, b.rest);
    }

    #[test]
    fn bad_shapes_and_specs_are_refused() {
        let x = Signal::new(vec![1.0; 8], 1, 8);
        let e = encode(&spec(Some(1), None, None, true), &x, 0).unwrap_err();
        assert!(matches!(e, KernelError::Shape { .. }));
        assert!(e.to_string().contains("low-rank needs a matrix"), "{e}");
        let x = Signal::new(vec![1.0; 8], 2, 4);
        assert!(encode(&spec(Some(1), Some(0.5), None, true), &x, 0).is_err());
        assert!(encode(&spec(None, None, None, true), &x, 0).is_err());
        assert!(encode(&spec(Some(0), None, None, true), &x, 0).is_err());
        assert!(encode(&spec(None, None, Some(1.5), true), &x, 0).is_err());
        let x = Signal::new(vec![1.0, f32::NAN, 0.0, 0.0], 2, 2);
        assert!(matches!(
            encode(&spec(Some(1), None, None, true), &x, 0),
            Err(KernelError::Values(_))
        ));
    }

    #[test]
    fn corrupt_parts_and_meta_are_refused() {
        let (rows, cols) = (6, 5);
        let x = Signal::new(gaussian_vec(4, rows * cols), rows, cols);
        let s = encode(&spec(Some(2), None, None, true), &x, 0).unwrap();
        let rest = s.rest.clone().unwrap().data;
        let good = parts_of(&s);
        assert!(decode(&s.meta, &good, Some(rest.clone()), rows, cols).is_ok());
        // Short factor.
        let mut p = good.clone();
        let mut u = p.get("u").unwrap().clone();
        u.data.pop();
        p.put(u);
        assert!(matches!(
            decode(&s.meta, &p, None, rows, cols),
            Err(KernelError::Corrupt { .. })
        ));
        // Wrong dtype.
        let mut p = good.clone();
        let mut v = p.get("v").unwrap().clone();
        v.dtype = crate::PartDtype::U16;
        p.put(v);
        assert!(decode(&s.meta, &p, None, rows, cols).is_err());
        // Missing part.
        let only_u = Parts::new(vec![good.get("u").unwrap().clone()]);
        assert!(matches!(
            decode(&s.meta, &only_u, None, rows, cols),
            Err(KernelError::MissingPart(_))
        ));
        // Bad metadata.
        for m in [
            serde_json::json!({"rank": 0}),
            serde_json::json!({"rank": 6}),
            serde_json::json!({"rank": "two"}),
            serde_json::json!({}),
            serde_json::json!({"rank": usize::MAX}),
        ] {
            assert!(
                matches!(
                    decode(&m, &good, None, rows, cols),
                    Err(KernelError::Meta { .. })
                ),
                "{m}"
            );
        }
        // Rest of the wrong length; parts of another shape.
        assert!(decode(&s.meta, &good, Some(rest[1..].to_vec()), rows, cols).is_err());
        assert!(decode(&s.meta, &good, None, rows + 1, cols).is_err());
        assert!(decode(&s.meta, &good, None, usize::MAX, usize::MAX).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn round_trips(rows in 2usize..12, cols in 1usize..12, rank in 1usize..5, seed in any::<u64>(),
                       scale in prop_oneof![Just(1e-3f32), Just(1.0f32), Just(30.0f32)]) {
            let w: Vec<f32> = gaussian_vec(seed, rows * cols).iter().map(|v| v * scale).collect();
            let x = Signal::new(w, rows, cols);
            let s = encode(&spec(Some(rank), None, None, true), &x, seed).unwrap();
            prop_assert_eq!(s.meta["rank"].as_u64().unwrap() as usize, rank.min(rows.min(cols)));
            check_round_trip(&x, &s);
            let again = encode(&spec(Some(rank), None, None, true), &x, seed).unwrap();
            prop_assert_eq!(again.parts, s.parts);
        }

        #[test]
        fn decode_never_panics(rank in 0usize..9, ulen in 0usize..80, vlen in 0usize..80, rows in 0usize..8, cols in 0usize..8,
                               rest in proptest::option::of(proptest::collection::vec(-1f32..1.0, 0..40))) {
            let f16 = |name: &str, len: usize| Part { name: name.into(), dtype: crate::PartDtype::F16, shape: vec![len / 2], data: vec![0x3c; len] };
            let parts = Parts::new(vec![f16("u", ulen), f16("v", vlen)]);
            let _ = decode(&serde_json::json!({"rank": rank}), &parts, rest, rows, cols);
        }
    }

    /// Timings (run with `--ignored --nocapture`).
    #[test]
    #[ignore]
    fn timings() {
        let (rows, cols) = (384, 1536);
        let x = Signal::new(gaussian_vec(1, rows * cols), rows, cols);
        let t = std::time::Instant::now();
        let (_, s, _) = thin_svd(MatRef::from_row_major_slice(&x.data, rows, cols)).unwrap();
        eprintln!(
            "full thin SVD {rows}x{cols}: {:?} ({} values)",
            t.elapsed(),
            s.len()
        );
        let t = std::time::Instant::now();
        let sp = encode(&spec(Some(64), None, None, true), &x, 0).unwrap();
        eprintln!(
            "encode {rows}x{cols} rank 64 (svd): {:?} {}",
            t.elapsed(),
            sp.meta
        );

        let (rows, cols) = (4096, 4096);
        let x = Signal::new(gaussian_vec(2, rows * cols), rows, cols);
        let a = MatRef::from_row_major_slice(&x.data, rows, cols);
        let t = std::time::Instant::now();
        let (_, s, _) = randomized_svd(a, 64 + OVERSAMPLE, 0).unwrap();
        eprintln!(
            "randomized SVD {rows}x{cols} rank 64: {:?} (σ1 {})",
            t.elapsed(),
            s[0]
        );
        let t = std::time::Instant::now();
        let sp = encode(&spec(Some(64), None, None, true), &x, 0).unwrap();
        eprintln!(
            "encode {rows}x{cols} rank 64: {:?} {}",
            t.elapsed(),
            sp.meta
        );
    }
}
