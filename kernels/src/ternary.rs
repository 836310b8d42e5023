//! BitNet b1.58 ternary quantization (absmean).
//!
//! Per tensor or per group: γ = mean |w| (stored f16), codes
//! q = clamp(round(w/γ), −1, 1), reconstruction q·γ. Trits are packed five
//! to a byte: 1.6 bits per weight plus the scales.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::part::{Coded, parse_meta, round_f16, to_meta};
use crate::rtn::{check_finite, group_len};
use crate::{KernelError, Part, Parts, Signal, bits};
use hcx_protocol::stage::TernarySpec;

/// What the decoder needs besides the parts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TernaryMeta {
    /// Group length (the whole tensor when no group was given).
    pub group: usize,
}

/// Encodes a signal.
pub fn encode(spec: &TernarySpec, x: &Signal) -> Result<Coded, KernelError> {
    check_finite(&x.data)?;
    let g = match spec.group {
        Some(_) => group_len(spec.group, x.rows, x.cols)?,
        None => x.len().max(1),
    };
    let mut trits = vec![1u8; x.len()];
    let scales: Vec<f32> = x
        .data
        .par_chunks(g)
        .zip(trits.par_chunks_mut(g))
        .map(|(grp, out)| {
            let gamma = scale_of(abs_sum(0.0, grp), grp.len());
            code_with(grp, gamma, out);
            gamma
        })
        .collect();
    Ok(coded(g, trits, &scales))
}

/// `acc` plus Σ |v| over `values`, added one value after another in order,
/// so that a tensor's sum carried from one piece of rows to the next is
/// the whole tensor's sum bit for bit.
pub(crate) fn abs_sum(acc: f64, values: &[f32]) -> f64 {
    values.iter().fold(acc, |a, v| a + v.abs() as f64)
}

/// γ of a group of `len` values whose magnitudes sum to `sum`: their mean,
/// on the f16 grid it is stored on.
pub(crate) fn scale_of(sum: f64, len: usize) -> f32 {
    round_f16((sum / len as f64) as f32)
}

/// Codes `values` as trits (0, 1, 2 for −1, 0, +1) at scale `gamma`.
fn code_with(values: &[f32], gamma: f32, out: &mut [u8]) {
    let inv = if gamma > 0.0 { 1.0 / gamma } else { 0.0 };
    for (v, t) in values.iter().zip(out.iter_mut()) {
        *t = (crate::rtn::round_i32(v * inv).clamp(-1, 1) + 1) as u8;
    }
}

fn coded(group: usize, trits: Vec<u8>, scales: &[f32]) -> Coded {
    Coded {
        meta: to_meta(&TernaryMeta { group }),
        parts: vec![
            Part::bytes("trits", bits::pack_trits(&trits)),
            Part::f16("scales", scales, vec![scales.len()]),
        ],
    }
}

/// Encodes a piece of rows of a tensor coded with one scale `gamma` fitted
/// on all of it (see [`crate::row_pieces`]): the piece's trits and the
/// tensor's scale, as one group of the piece's length.
pub(crate) fn encode_fitted(gamma: f32, x: &Signal) -> Result<Coded, KernelError> {
    check_finite(&x.data)?;
    let mut trits = vec![1u8; x.len()];
    x.data
        .par_chunks(1 << 16)
        .zip(trits.par_chunks_mut(1 << 16))
        .for_each(|(v, out)| code_with(v, gamma, out));
    Ok(coded(x.len().max(1), trits, &[gamma]))
}

/// Decodes `rows × cols` values.
pub fn decode(
    meta: &serde_json::Value,
    parts: &Parts,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, KernelError> {
    let m: TernaryMeta = parse_meta("ternary", meta)?;
    let n = rows * cols;
    if m.group == 0 || !n.is_multiple_of(m.group) {
        return Err(KernelError::Meta {
            stage: "ternary".into(),
            why: format!("group {} does not divide {n} values", m.group),
        });
    }
    let trits = bits::unpack_trits(parts.byte_values("trits", bits::trit_packed_len(n))?, n)
        .ok_or_else(|| KernelError::corrupt("trits", "byte above 242"))?;
    let scales = parts.f16_values("scales", n / m.group)?;
    Ok(trits
        .iter()
        .enumerate()
        .map(|(i, t)| (*t as f32 - 1.0) * scales[i / m.group])
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::gaussian_vec;
    use crate::stats::sqnr_db;
    use proptest::prelude::*;

    #[test]
    fn gaussian_sqnr_matches_analysis() {
        // Absmean ternary on N(0,1): γ = √(2/π) ≈ 0.798, threshold γ/2.
        // Expected MSE = E[(x − q·γ)²] ≈ 0.2636 (Monte Carlo, 4e5 samples), i.e. 5.79 dB.
        let x = Signal::new(gaussian_vec(5, 512 * 512), 512, 512);
        let c = encode(&TernarySpec { group: None }, &x).unwrap();
        let y = decode(&c.meta, &Parts::new(c.parts.clone()), 512, 512).unwrap();
        let s = sqnr_db(&x.data, &y).unwrap();
        assert!((s - 5.79).abs() < 0.1, "{s}");
        let bytes: usize = c.parts.iter().map(|p| p.len()).sum();
        assert!((bytes as f64 * 8.0 / x.len() as f64 - 1.6).abs() < 0.01);
    }

    proptest! {
        #[test]
        fn round_trip_is_ternary(seed in any::<u64>(), grouped in any::<bool>()) {
            let x = Signal::new(gaussian_vec(seed, 320), 2, 160);
            let spec = TernarySpec { group: if grouped { Some(32) } else { None } };
            let c = encode(&spec, &x).unwrap();
            let scales = Parts::new(c.parts.clone()).f16_values("scales", if grouped { 10 } else { 1 }).unwrap();
            let y = decode(&c.meta, &Parts::new(c.parts), 2, 160).unwrap();
            for (i, v) in y.iter().enumerate() {
                let s = scales[if grouped { i / 32 } else { 0 }];
                prop_assert!(*v == 0.0 || *v == s || *v == -s);
            }
        }
    }
}
