//! Random-sign Walsh–Hadamard rotation (incoherence processing).
//!
//! Each row is multiplied element-wise by a random ±1 vector (one sign per
//! column, drawn from the tensor's seed), then every block of `block`
//! consecutive values is transformed by the orthonormal Walsh–Hadamard
//! matrix H/√block. Row lengths that are not powers of two are handled by
//! blocks: the default block is the largest power of two dividing the row
//! length (384 = 3 × 128 → 128, 1536 → 512), capped at 4096. The rotation is
//! orthonormal, so it keeps energy and squared error: an error added after
//! it is the same error in the original domain. Nothing is stored but the
//! seed and the block length.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;
use crate::{KernelError, Signal};

/// What the decoder needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HadamardMeta {
    /// Block length (a power of two dividing the row length).
    pub block: usize,
    /// Seed of the sign vector.
    pub seed: u64,
}

/// The block length used for rows of `cols` values.
pub fn choose_block(
    requested: Option<usize>,
    rows: usize,
    cols: usize,
) -> Result<usize, KernelError> {
    let block = match requested {
        Some(b) => b,
        None => (1usize << cols.trailing_zeros().min(12)).min(cols.max(1)),
    };
    if block < 2 {
        return Err(KernelError::shape(
            rows,
            cols,
            format!(
                "row length {cols} has no power-of-two factor of at least 2 for a Hadamard block"
            ),
        ));
    }
    if !block.is_power_of_two() || !cols.is_multiple_of(block) {
        return Err(KernelError::shape(
            rows,
            cols,
            format!("row length {cols} is not divisible by Hadamard block {block}"),
        ));
    }
    Ok(block)
}

/// The ±1 sign of every column for a seed.
pub(crate) fn signs(seed: u64, cols: usize) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(cols);
    while out.len() < cols {
        let bits = r.next_u64();
        for i in 0..64 {
            if out.len() == cols {
                break;
            }
            out.push(if (bits >> i) & 1 == 1 { -1.0 } else { 1.0 });
        }
    }
    out
}

/// In-place orthonormal fast Walsh–Hadamard transform of one block.
pub fn fwht(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    if n >= 8 {
        // The first three stages within each run of eight values, in
        // registers: the same additions in the same order per value as
        // three passes of the loop below, so the same bits.
        for c in x.chunks_exact_mut(8) {
            let a = [
                c[0] + c[1],
                c[0] - c[1],
                c[2] + c[3],
                c[2] - c[3],
                c[4] + c[5],
                c[4] - c[5],
                c[6] + c[7],
                c[6] - c[7],
            ];
            let b = [
                a[0] + a[2],
                a[1] + a[3],
                a[0] - a[2],
                a[1] - a[3],
                a[4] + a[6],
                a[5] + a[7],
                a[4] - a[6],
                a[5] - a[7],
            ];
            c.copy_from_slice(&[
                b[0] + b[4],
                b[1] + b[5],
                b[2] + b[6],
                b[3] + b[7],
                b[0] - b[4],
                b[1] - b[5],
                b[2] - b[6],
                b[3] - b[7],
            ]);
        }
        h = 8;
    }
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
    let norm = 1.0 / (n as f32).sqrt();
    for v in x.iter_mut() {
        *v *= norm;
    }
}

/// Rotates every row in place; returns the metadata to undo it.
pub fn forward(
    x: &mut Signal,
    requested: Option<usize>,
    seed: u64,
) -> Result<HadamardMeta, KernelError> {
    let block = choose_block(requested, x.rows, x.cols)?;
    let s = signs(seed, x.cols);
    // The device's rotation has the CPU's bits (`crate::gpu`).
    if !crate::gpu::hadamard_rows(&mut x.data, &s, x.cols, block, true) {
        forward_rows(&mut x.data, x.cols, block, &s);
    }
    Ok(HadamardMeta { block, seed })
}

/// [`forward`] without the GPU, for comparisons.
#[cfg(test)]
pub(crate) fn forward_on_cpu(
    x: &mut Signal,
    requested: Option<usize>,
    seed: u64,
) -> Result<HadamardMeta, KernelError> {
    let block = choose_block(requested, x.rows, x.cols)?;
    forward_rows(&mut x.data, x.cols, block, &signs(seed, x.cols));
    Ok(HadamardMeta { block, seed })
}

fn forward_rows(data: &mut [f32], cols: usize, block: usize, s: &[f32]) {
    data.par_chunks_mut(cols).for_each(|row| {
        for (v, sg) in row.iter_mut().zip(s) {
            *v *= sg;
        }
        for b in row.chunks_mut(block) {
            fwht(b);
        }
    });
}

/// Undoes [`forward`] in place on `rows × cols` values.
pub fn inverse(
    data: &mut [f32],
    rows: usize,
    cols: usize,
    meta: &HadamardMeta,
) -> Result<(), KernelError> {
    if data.len() != rows * cols {
        return Err(KernelError::Meta {
            stage: "hadamard".into(),
            why: format!("expected {} values, found {}", rows * cols, data.len()),
        });
    }
    let block = choose_block(Some(meta.block), rows, cols).map_err(|e| KernelError::Meta {
        stage: "hadamard".into(),
        why: e.to_string(),
    })?;
    let s = signs(meta.seed, cols);
    if !crate::gpu::hadamard_rows(data, &s, cols, block, false) {
        inverse_rows(data, cols, block, &s);
    }
    Ok(())
}

/// [`inverse`] without the GPU, for comparisons.
#[cfg(test)]
pub(crate) fn inverse_on_cpu(
    data: &mut [f32],
    rows: usize,
    cols: usize,
    meta: &HadamardMeta,
) -> Result<(), KernelError> {
    debug_assert_eq!(data.len(), rows * cols);
    let block = choose_block(Some(meta.block), rows, cols)?;
    inverse_rows(data, cols, block, &signs(meta.seed, cols));
    Ok(())
}

fn inverse_rows(data: &mut [f32], cols: usize, block: usize, s: &[f32]) {
    data.par_chunks_mut(cols).for_each(|row| {
        for b in row.chunks_mut(block) {
            fwht(b);
        }
        for (v, sg) in row.iter_mut().zip(s) {
            *v *= sg;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::gaussian_vec;
    use crate::stats::{energy, sqnr_db};
    use proptest::prelude::*;

    /// The transform stage by stage, as written before the first three
    /// stages were done in registers.
    fn fwht_by_stages(x: &mut [f32]) {
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
        let norm = 1.0 / (n as f32).sqrt();
        for v in x.iter_mut() {
            *v *= norm;
        }
    }

    #[test]
    fn the_transform_gives_the_stage_by_stage_bits() {
        for k in 0..=12 {
            let n = 1usize << k;
            let x = crate::rng::gaussian_vec(k as u64, n);
            let (mut a, mut b) = (x.clone(), x);
            fwht(&mut a);
            fwht_by_stages(&mut b);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "block of {n}");
        }
    }

    #[test]
    fn default_blocks() {
        assert_eq!(choose_block(None, 1, 384).unwrap(), 128);
        assert_eq!(choose_block(None, 1, 1536).unwrap(), 512);
        assert_eq!(choose_block(None, 1, 8192).unwrap(), 4096);
        assert!(choose_block(None, 1, 7).is_err());
        assert!(
            choose_block(Some(256), 1, 384)
                .unwrap_err()
                .to_string()
                .contains("not divisible")
        );
    }

    #[test]
    fn rotation_keeps_energy_and_inverts() {
        let orig = gaussian_vec(5, 6 * 384);
        let mut s = Signal::new(orig.clone(), 6, 384);
        let m = forward(&mut s, None, 77).unwrap();
        assert!((energy(&s.data) / energy(&orig) - 1.0).abs() < 1e-5);
        inverse(&mut s.data, 6, 384, &m).unwrap();
        assert!(sqnr_db(&orig, &s.data).is_none_or(|d| d > 120.0));
    }

    #[test]
    fn rotation_spreads_an_outlier() {
        let mut v = vec![0.0f32; 128];
        v[3] = 1.0;
        let mut s = Signal::new(v, 1, 128);
        forward(&mut s, None, 1).unwrap();
        let max = s.data.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!((max - 1.0 / 128f32.sqrt()).abs() < 1e-6);
    }

    proptest! {
        #[test]
        fn round_trip(rows in 1usize..4, k in 0u32..5, mult in 1usize..4, seed in any::<u64>()) {
            let cols = (1usize << (k + 1)) * mult;
            let orig = gaussian_vec(seed, rows * cols);
            let mut s = Signal::new(orig.clone(), rows, cols);
            let m = forward(&mut s, None, seed).unwrap();
            inverse(&mut s.data, rows, cols, &m).unwrap();
            for (a, b) in orig.iter().zip(&s.data) {
                prop_assert!((a - b).abs() < 1e-4);
            }
        }
    }
}
