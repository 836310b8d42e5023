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
            let gamma = round_f16(
                (grp.iter().map(|v| v.abs() as f64).sum::<f64>() / grp.len() as f64) as f32,
            );
            let inv = if gamma > 0.0 { 1.0 / gamma } else { 0.0 };
            for (v, t) in grp.iter().zip(out.iter_mut()) {
                *t = (crate::rtn::round_i32(v * inv).clamp(-1, 1) + 1) as u8;
            }
            gamma
        })
        .collect();
    Ok(Coded {
        meta: to_meta(&TernaryMeta { group: g }),
        parts: vec![
            Part::bytes("trits", bits::pack_trits(&trits)),
            Part::f16("scales", &scales, vec![scales.len()]),
        ],
    })
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
