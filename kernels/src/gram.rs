//! The Gram matrix XᵀX of a batch of f32 rows in f64, summed in one fixed
//! order that any processor can follow.
//!
//! Entry (i, j) is the left-to-right sum over the rows, starting from zero:
//! g = 0, then g = fl(g + x[r][i]·x[r][j]) for r = 0, 1, …, rows − 1. The
//! product of two f32 values is exact in f64 (24 + 24 significant bits), so
//! a fused multiply-add gives the same bits as a multiply and an add, and
//! the result depends on nothing but the inputs: not on the SIMD width, the
//! thread count or the device. A GPU thread that owns one entry and runs the
//! same loop (the `cuda` feature's kernel) reproduces it bit for bit, which
//! a blocked matrix product (whose order follows its tiling) cannot.
//!
//! The CPU path packs X's columns into panels of [`PANEL`] and runs a
//! register-blocked tile of [`PANEL`] × [`TILE_WIDTH`] entries down all the
//! rows, with AVX-512 or AVX2 and FMA where the processor has them.

use rayon::prelude::*;

/// Columns of X packed side by side.
pub const PANEL: usize = 8;

/// X's columns in panels of [`PANEL`] f64 values a row, zero-padded past
/// the last column: panel p holds columns p·PANEL.. for every row, row after
/// row.
pub struct Panels {
    rows: usize,
    dim: usize,
    values: Vec<f64>,
    /// One panel of zeros, standing for the panels past the last column
    /// so that every tile runs the vector path (a zero product leaves a
    /// sum as it is, and those columns are thrown away).
    zeros: Vec<f64>,
}

impl Panels {
    /// Packs `rows × dim` row-major f32 values.
    pub fn pack(x: &[f32], rows: usize, dim: usize) -> Panels {
        debug_assert_eq!(x.len(), rows * dim);
        let count = dim.div_ceil(PANEL);
        let mut values = vec![0f64; count * rows * PANEL];
        if rows > 0 {
            values
                .par_chunks_mut(rows * PANEL)
                .enumerate()
                .for_each(|(p, panel)| {
                    let c0 = p * PANEL;
                    let w = PANEL.min(dim - c0);
                    for (r, out) in panel.chunks_exact_mut(PANEL).enumerate() {
                        let src = &x[r * dim + c0..r * dim + c0 + w];
                        for (o, v) in out.iter_mut().zip(src) {
                            *o = f64::from(*v);
                        }
                    }
                });
        }
        Panels {
            rows,
            dim,
            values,
            zeros: vec![0f64; rows * PANEL],
        }
    }

    /// Number of panels.
    pub fn count(&self) -> usize {
        self.dim.div_ceil(PANEL)
    }

    fn panel(&self, p: usize) -> &[f64] {
        &self.values[p * self.rows * PANEL..(p + 1) * self.rows * PANEL]
    }

    /// The sums of entries (i, j) for i in panel `pi` and j in the
    /// [`TILE_PANELS`] panels from `pj` (zeros past the last panel):
    /// `out[a][b]` is entry (pi·PANEL + a, pj·PANEL + b).
    pub fn tile(&self, pi: usize, pj: usize) -> Tile {
        let b: [&[f64]; TILE_PANELS] = std::array::from_fn(|k| {
            if pj + k < self.count() {
                self.panel(pj + k)
            } else {
                &self.zeros
            }
        });
        tile(self.panel(pi), b, self.rows)
    }
}

/// Panels of j in one tile.
pub const TILE_PANELS: usize = 3;

/// Columns of H in one tile.
pub const TILE_WIDTH: usize = TILE_PANELS * PANEL;

/// One tile's sums: [`PANEL`] rows of H by [`TILE_WIDTH`] columns.
pub type Tile = [[f64; TILE_WIDTH]; PANEL];

/// Entry (i, j) of XᵀX by the definition, one row after another (`dim` > 0):
/// the reference every other path must equal.
pub fn entry(x: &[f32], dim: usize, i: usize, j: usize) -> f64 {
    let mut g = 0f64;
    for row in x.chunks_exact(dim) {
        g += f64::from(row[i]) * f64::from(row[j]);
    }
    g
}

fn tile(a: &[f64], b: [&[f64]; TILE_PANELS], rows: usize) -> Tile {
    let full = b.iter().all(|p| !p.is_empty());
    #[cfg(target_arch = "x86_64")]
    if full {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected on this processor.
            return unsafe { tile_avx512(a, b, rows) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { tile_avx2(a, b, rows) };
        }
    }
    let _ = full;
    tile_plain(a, b, rows)
}

/// The tile by the definition, one entry's sum at a time in row order; an
/// empty panel in `b` stands for zeros and is skipped.
fn tile_plain(a: &[f64], b: [&[f64]; TILE_PANELS], rows: usize) -> Tile {
    let mut acc = [[0f64; TILE_WIDTH]; PANEL];
    for (k, bk) in b.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
        for (ar, br) in a[..rows * PANEL]
            .chunks_exact(PANEL)
            .zip(bk.chunks_exact(PANEL))
        {
            for (row, &s) in acc.iter_mut().zip(ar) {
                for (g, &v) in row[k * PANEL..(k + 1) * PANEL].iter_mut().zip(br) {
                    *g += s * v;
                }
            }
        }
    }
    acc
}

/// The tile with AVX-512: 24 accumulators of 8 lanes, one fused
/// multiply-add per row and accumulator.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(a: &[f64], b: [&[f64]; TILE_PANELS], rows: usize) -> Tile {
    use std::arch::x86_64::*;
    assert!(a.len() >= rows * PANEL && b.iter().all(|p| p.len() >= rows * PANEL));
    let mut acc = [[_mm512_setzero_pd(); TILE_PANELS]; PANEL];
    let (pa, pb) = (a.as_ptr(), b.map(|p| p.as_ptr()));
    for r in 0..rows {
        let o = r * PANEL;
        // SAFETY: o + PANEL ≤ rows·PANEL ≤ every slice's length (asserted).
        let v = pb.map(|p| unsafe { _mm512_loadu_pd(p.add(o)) });
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let s = _mm512_set1_pd(unsafe { *pa.add(o + i) });
            for (g, &v) in row.iter_mut().zip(&v) {
                *g = _mm512_fmadd_pd(s, v, *g);
            }
        }
    }
    let mut out = [[0f64; TILE_WIDTH]; PANEL];
    for (o, row) in out.iter_mut().zip(&acc) {
        for (k, g) in row.iter().enumerate() {
            // SAFETY: each store writes 8 values inside the row.
            unsafe { _mm512_storeu_pd(o[k * PANEL..].as_mut_ptr(), *g) };
        }
    }
    out
}

/// The tile with AVX2: a quarter at a time (4 rows of H by 12 columns, 12
/// accumulators of 4 lanes), each entry still summed in row order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(a: &[f64], b: [&[f64]; TILE_PANELS], rows: usize) -> Tile {
    use std::arch::x86_64::*;
    assert!(a.len() >= rows * PANEL && b.iter().all(|p| p.len() >= rows * PANEL));
    const HALF: usize = TILE_WIDTH / 2;
    let mut out = [[0f64; TILE_WIDTH]; PANEL];
    let (pa, pb) = (a.as_ptr(), b.map(|p| p.as_ptr()));
    for i0 in [0, PANEL / 2] {
        for c0 in [0, HALF] {
            let mut acc = [[_mm256_setzero_pd(); 3]; PANEL / 2];
            for r in 0..rows {
                let o = r * PANEL;
                // Columns c0 + 4t of the tile: panel (c0 + 4t) / 8 at
                // offset (c0 + 4t) % 8.
                // SAFETY: o + PANEL ≤ rows·PANEL ≤ every slice's length.
                let v: [__m256d; 3] = std::array::from_fn(|t| {
                    let c = c0 + 4 * t;
                    unsafe { _mm256_loadu_pd(pb[c / PANEL].add(o + c % PANEL)) }
                });
                for (i, row) in acc.iter_mut().enumerate() {
                    // SAFETY: as above.
                    let s = _mm256_set1_pd(unsafe { *pa.add(o + i0 + i) });
                    for (g, &v) in row.iter_mut().zip(&v) {
                        *g = _mm256_fmadd_pd(s, v, *g);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                for (t, g) in row.iter().enumerate() {
                    // SAFETY: each store writes 4 values inside the row.
                    unsafe { _mm256_storeu_pd(out[i0 + i][c0 + 4 * t..].as_mut_ptr(), *g) };
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn inputs(seed: u64, rows: usize, dim: usize) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..rows * dim)
            .map(|i| {
                let g = r.gaussian() as f32;
                match i % 5 {
                    0 => g * 3000.0,
                    1 => g * 1e-6,
                    _ => g,
                }
            })
            .collect()
    }

    #[test]
    fn every_path_gives_the_definitions_bits() {
        for (rows, dim) in [(0, 5), (1, 1), (3, 8), (37, 17), (130, 24), (257, 41)] {
            let x = inputs(rows as u64 * 7 + dim as u64, rows, dim);
            let p = Panels::pack(&x, rows, dim);
            for pi in 0..p.count() {
                for pj in 0..p.count() {
                    let fast = p.tile(pi, pj);
                    let zero: &[f64] = &[];
                    let b: [&[f64]; TILE_PANELS] = std::array::from_fn(|k| {
                        if pj + k < p.count() {
                            p.panel(pj + k)
                        } else {
                            zero
                        }
                    });
                    let plain = tile_plain(p.panel(pi), b, rows);
                    let full = b.iter().all(|p| !p.is_empty());
                    #[cfg(target_arch = "x86_64")]
                    if full && std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: detected.
                        let t = unsafe { tile_avx512(p.panel(pi), b, rows) };
                        assert_eq!(
                            t.map(|r| r.map(f64::to_bits)),
                            plain.map(|r| r.map(f64::to_bits))
                        );
                    }
                    #[cfg(target_arch = "x86_64")]
                    if full
                        && std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: detected.
                        let t = unsafe { tile_avx2(p.panel(pi), b, rows) };
                        assert_eq!(
                            t.map(|r| r.map(f64::to_bits)),
                            plain.map(|r| r.map(f64::to_bits))
                        );
                    }
                    let _ = full;
                    for a in 0..PANEL {
                        for b in 0..TILE_WIDTH {
                            let (i, j) = (pi * PANEL + a, pj * PANEL + b);
                            assert_eq!(fast[a][b].to_bits(), plain[a][b].to_bits());
                            if i < dim && j < dim {
                                let want = entry(&x, dim, i, j);
                                assert_eq!(fast[a][b].to_bits(), want.to_bits(), "{i},{j}");
                            }
                        }
                    }
                }
            }
        }
    }
}
