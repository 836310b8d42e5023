//! Seed tables: for every seed, what the search needs to fit a block with
//! that seed's basis. They depend only on the basis, the block length C and
//! the number of coefficients P, so they are built once per process for each
//! such shape and shared by every tensor (and thread) that encodes with it.
//!
//! The exact table holds, for each seed, the pseudo-inverse `(UᵀU)⁻¹Uᵀ` and
//! the Gram matrix `UᵀU` in f32, eight seeds side by side (see
//! [`build_lane`]); the search's arithmetic on it decides the artifact. For
//! the bit basis with short blocks there is also a bound table (see
//! [`BoundTable`]) from which a cheap upper bound on each seed's
//! least-squares fit is computed, so that most seeds are ruled out without
//! touching the exact table.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use hcx_protocol::stage::SeedlmBasis;
use rayon::prelude::*;

use super::{LANES, MAX_COEFS, PIVOT_MIN, SEEDS, basis_columns, lfsr_entries};

/// Largest exact table kept for reuse; larger shapes build their table a
/// chunk at a time for each tensor.
const SHARED_MAX_BYTES: usize = 32 << 20;
/// Most shapes kept at once (the cache starts over beyond this).
const SHARED_MAX_SHAPES: usize = 4;
/// Longest block with a bound table: the search keeps `2^C` partial sums per
/// block.
pub(super) const BOUND_MAX_BLOCK: usize = 12;
/// Seeds whose Cholesky factor has a pivot (squared) below this get no
/// bound: their pseudo-inverse is large enough that the exact f32 fit could
/// stray from the bound by more than the search's margin.
const LOOSE_PIVOT: f64 = 1.0 / 16.0;

/// Floats per group of `LANES` seeds in an exact table for blocks of `c`
/// weights and `p` coefficients: the pseudo-inverse (`p·c`) and the Gram
/// matrix's upper triangle, each entry for `LANES` seeds.
pub(super) fn group_stride(c: usize, p: usize) -> usize {
    (p * c + p * (p + 1) / 2) * LANES
}

/// What a seed table depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Shape {
    /// How seeds become bases.
    pub basis: SeedlmBasis,
    /// Block length C.
    pub c: usize,
    /// Coefficients per block P.
    pub p: usize,
}

impl Shape {
    /// Upper-triangle entries of a `P × P` matrix.
    pub(super) fn tri(self) -> usize {
        self.p * (self.p + 1) / 2
    }

    /// Floats per group of `LANES` seeds in the exact table.
    pub(super) fn group_stride(self) -> usize {
        group_stride(self.c, self.p)
    }

    /// Bytes of the exact table for every seed.
    fn exact_bytes(self) -> usize {
        SEEDS.div_ceil(LANES) * self.group_stride() * 4
    }
}

/// The tables of one shape for seeds `1..=65535`.
pub(super) struct SeedTable {
    /// Groups of `LANES` seeds in [`build_lane`]'s layout; seed `s` is lane
    /// `(s − 1) % LANES` of group `(s − 1) / LANES`.
    pub exact: Vec<f32>,
    /// Present for the bit basis with blocks of at most
    /// [`BOUND_MAX_BLOCK`] weights.
    pub bound: Option<BoundTable>,
}

/// Per seed, the data of a cheap bound on the least-squares fit.
///
/// For the bit basis, `b = Uᵀw` is a vector of sums of `±w_i/√C` whose sign
/// patterns are the columns' bits, so a block's `2^C` pattern sums give `b`
/// for any seed by lookup. With `UᵀU = LLᵀ` (Cholesky, restricted to the
/// independent columns), the fit is `tᵀUᵀUt = ‖L⁻¹b‖²`.
pub(super) struct BoundTable {
    /// The columns' sign patterns, `P` per seed (bit `i` set: `+1/√C`).
    pub patterns: Vec<u16>,
    /// `L⁻¹`, lower triangle row by row (`j·(j+1)/2 + k`), `tri` per seed;
    /// rows and columns of dependent columns are zero.
    pub inverse: Vec<f32>,
    /// Indices (seed − 1), ascending, of the seeds with a nearly dependent
    /// basis: always evaluated exactly.
    pub loose: Vec<usize>,
}

/// The shared tables of a shape, built on first use; `None` when the exact
/// table is too large to keep.
pub(super) fn shared(shape: Shape) -> Option<Arc<SeedTable>> {
    if shape.exact_bytes() > SHARED_MAX_BYTES {
        return None;
    }
    static CACHE: OnceLock<Mutex<HashMap<Shape, Arc<SeedTable>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    // The lock is not held while building: the build runs on rayon, whose
    // threads may pick up another search that asks for a table.
    if let Some(t) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&shape) {
        return Some(t.clone());
    }
    let mut exact = vec![0f32; SEEDS.div_ceil(LANES) * shape.group_stride()];
    build_groups(&mut exact, 1, SEEDS, shape);
    let built = Arc::new(SeedTable {
        exact,
        bound: build_bound(shape),
    });
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= SHARED_MAX_SHAPES {
        map.clear();
    }
    Some(map.entry(shape).or_insert(built).clone())
}

/// The Gram matrix `UᵀU` of a seed's basis, in f64.
fn gram(shape: Shape, seed: u16, entries: &mut [i32]) -> [[f64; MAX_COEFS]; MAX_COEFS] {
    let (c, p) = (shape.c, shape.p);
    let mut g = [[0f64; MAX_COEFS]; MAX_COEFS];
    match shape.basis {
        SeedlmBasis::Bits => {
            let cols = basis_columns(seed, c, p);
            for j in 0..p {
                for k in 0..p {
                    let differ = (cols[j] ^ cols[k]).count_ones() as f64;
                    g[j][k] = (c as f64 - 2.0 * differ) / c as f64;
                }
            }
        }
        SeedlmBasis::Lfsr => {
            lfsr_entries(seed, entries);
            for j in 0..p {
                for k in 0..p {
                    let dot: i64 = (0..c)
                        .map(|i| entries[j * c + i] as i64 * entries[k * c + i] as i64)
                        .sum();
                    // Exact: |dot| < 2^36 and the divisor is a power of two.
                    g[j][k] = dot as f64 / (1u64 << 30) as f64;
                }
            }
        }
    }
    g
}

/// Pivots at or below this share of their column's squared norm drop the
/// column. Bit basis: columns are exactly dependent or clearly not, and the
/// tolerance only absorbs rounding. LFSR basis: successive states can repeat
/// a byte pattern eight steps later, so two columns can be nearly equal;
/// keeping such a pair would make the f32 pseudo-inverse large enough to
/// spoil the search's error estimates, and dropping one costs little (the
/// direction it adds is short).
fn pivot_min(basis: SeedlmBasis) -> f64 {
    match basis {
        SeedlmBasis::Bits => PIVOT_MIN,
        SeedlmBasis::Lfsr => 1e-2,
    }
}

/// Cholesky factor of a Gram matrix restricted to its independent columns
/// (a pivot at or below `rel` times the column's squared norm drops the
/// column), the columns kept, and the smallest kept pivot before its
/// square root.
fn cholesky(
    gram: &[[f64; MAX_COEFS]; MAX_COEFS],
    p: usize,
    rel: f64,
) -> ([[f64; MAX_COEFS]; MAX_COEFS], [bool; MAX_COEFS], f64) {
    let mut l = [[0f64; MAX_COEFS]; MAX_COEFS];
    let mut kept = [false; MAX_COEFS];
    let mut smallest = f64::INFINITY;
    for j in 0..p {
        let d = gram[j][j] - (0..j).map(|m| l[j][m] * l[j][m]).sum::<f64>();
        // Bit basis: the squared norm is exactly 1.
        if d <= rel * gram[j][j] {
            continue;
        }
        kept[j] = true;
        smallest = smallest.min(d);
        let r = d.sqrt();
        l[j][j] = r;
        for i in j + 1..p {
            l[i][j] = (gram[i][j] - (0..j).map(|m| l[i][m] * l[j][m]).sum::<f64>()) / r;
        }
    }
    (l, kept, smallest)
}

/// Fills one seed's lane of a table group: the pseudo-inverse `(UᵀU)⁻¹Uᵀ`
/// (row `j`, column `i` at `[(i·P + j)·LANES + lane]`) followed by the upper
/// triangle of `UᵀU` with off-diagonal entries doubled, so that
/// `Σ_{j≤k} g_jk v_j v_k = vᵀ(UᵀU)v`.
pub(super) fn build_lane(shape: Shape, seed: u16, lane: usize, out: &mut [f32]) {
    let (c, p) = (shape.c, shape.p);
    let mut entries = [0i32; super::MAX_BLOCK * MAX_COEFS];
    let gram = gram(shape, seed, &mut entries[..c * p]);
    let (l, kept, _) = cholesky(&gram, p, pivot_min(shape.basis));
    let cols = basis_columns(seed, c, p);
    let scale = 1.0 / (c as f64).sqrt();
    let entry = |i: usize, j: usize| match shape.basis {
        SeedlmBasis::Bits => {
            if (cols[j] >> i) & 1 == 1 {
                scale
            } else {
                -scale
            }
        }
        SeedlmBasis::Lfsr => entries[j * c + i] as f64 / 32768.0,
    };
    for i in 0..c {
        // Solve (LLᵀ) x = Uᵀ e_i on the kept columns.
        let mut y = [0f64; MAX_COEFS];
        for j in 0..p {
            if kept[j] {
                let b = entry(i, j);
                y[j] = (b - (0..j).map(|m| l[j][m] * y[m]).sum::<f64>()) / l[j][j];
            }
        }
        let mut x = [0f64; MAX_COEFS];
        for j in (0..p).rev() {
            if kept[j] {
                x[j] = (y[j] - (j + 1..p).map(|m| l[m][j] * x[m]).sum::<f64>()) / l[j][j];
            }
        }
        for j in 0..p {
            out[(i * p + j) * LANES + lane] = x[j] as f32;
        }
    }
    let mut at = p * c;
    for (j, row) in gram.iter().enumerate().take(p) {
        for (k, g) in row.iter().enumerate().take(p).skip(j) {
            let v = if j == k { *g } else { 2.0 * g };
            out[at * LANES + lane] = v as f32;
            at += 1;
        }
    }
}

/// Fills groups of `LANES` seeds starting at seed `first`; lanes past
/// `max_seed` are left zero (and skipped by the search).
pub(super) fn build_groups(table: &mut [f32], first: usize, max_seed: usize, shape: Shape) {
    table
        .par_chunks_mut(shape.group_stride())
        .enumerate()
        .for_each(|(gi, group)| {
            group.fill(0.0);
            for lane in 0..LANES {
                let seed = first + gi * LANES + lane;
                if seed <= max_seed {
                    build_lane(shape, seed as u16, lane, group);
                }
            }
        });
}

/// The bound table of a shape, where the shape has one.
fn build_bound(shape: Shape) -> Option<BoundTable> {
    if shape.basis != SeedlmBasis::Bits || shape.c > BOUND_MAX_BLOCK {
        return None;
    }
    let (c, p, tri) = (shape.c, shape.p, shape.tri());
    let mut patterns = vec![0u16; SEEDS * p];
    let mut inverse = vec![0f32; SEEDS * tri];
    let mut loose = vec![false; SEEDS];
    patterns
        .par_chunks_mut(p)
        .zip(inverse.par_chunks_mut(tri))
        .zip(loose.par_iter_mut())
        .enumerate()
        .for_each(|(i, ((pat, inv), lo))| {
            let seed = (i + 1) as u16;
            let cols = basis_columns(seed, c, p);
            for (pt, col) in pat.iter_mut().zip(cols) {
                *pt = col as u16;
            }
            let gram = gram(shape, seed, &mut []);
            let (l, kept, smallest) = cholesky(&gram, p, pivot_min(shape.basis));
            *lo = smallest < LOOSE_PIVOT;
            // Column k of L⁻¹ solves L y = e_k (kept rows only).
            let mut m = [[0f64; MAX_COEFS]; MAX_COEFS];
            for k in (0..p).filter(|k| kept[*k]) {
                for j in (k..p).filter(|j| kept[*j]) {
                    let rhs = if j == k { 1.0 } else { 0.0 };
                    let s: f64 = (k..j).map(|n| l[j][n] * m[n][k]).sum();
                    m[j][k] = (rhs - s) / l[j][j];
                }
            }
            // The bounded search relies on this: the first column has unit
            // norm and is always kept.
            assert_eq!(
                m[0][0], 1.0,
                "seed {seed}: the first column's pivot is not 1"
            );
            for j in 0..p {
                for k in 0..=j {
                    inv[j * (j + 1) / 2 + k] = m[j][k] as f32;
                }
            }
        });
    let loose = loose
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.then_some(i))
        .collect();
    Some(BoundTable {
        patterns,
        inverse,
        loose,
    })
}
