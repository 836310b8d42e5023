//! Round-to-nearest integer quantization, 2–8 bits, per row or by group.
//!
//! Symmetric: one f16 scale per group, codes in −q..=q with q = 2^(bits−1) − 1
//! (stored offset by q). Asymmetric: an f16 scale and an f16 minimum per
//! group, codes in 0..2^bits. With `search`, the clipping range of each
//! group is shrunk over 20 candidate ratios (1.0 down to 0.62) and the one
//! with the least squared error kept. Codes are bit-packed tightly. The
//! encoder quantizes with the f16-rounded scale it stores, so the decoder
//! reproduces its reconstruction exactly.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::part::{Coded, parse_meta, round_f16, to_meta};
use crate::{KernelError, Part, Parts, Signal, bits};
use hcx_protocol::stage::RtnSpec;

/// What the decoder needs besides the parts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct RtnMeta {
    /// Bits per code.
    pub bits: u8,
    /// Group length.
    pub group: usize,
    /// Symmetric or asymmetric.
    pub symmetric: bool,
}

/// The group length for a row of `cols` values.
pub fn group_len(group: Option<usize>, rows: usize, cols: usize) -> Result<usize, KernelError> {
    let g = group.unwrap_or(cols);
    if g == 0 || !cols.is_multiple_of(g) {
        return Err(KernelError::shape(
            rows,
            cols,
            format!("row length {cols} not divisible by group {g}"),
        ));
    }
    Ok(g)
}

/// Checks values are finite.
pub fn check_finite(x: &[f32]) -> Result<(), KernelError> {
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(KernelError::Values(format!(
            "value {} at flat index {i} is not finite",
            x[i]
        )));
    }
    Ok(())
}

/// Round half away from zero without a libm call: `as` truncates, and the
/// added ±0.5 makes that rounding (plain `f32::round` is a function call on
/// baseline x86-64, which lacks SSE4.1).
#[inline(always)]
pub(crate) fn round_i32(v: f32) -> i32 {
    (v + 0.5f32.copysign(v)) as i32
}

/// Quantizes one group with a given (already f16-rounded) scale and minimum;
/// returns the squared error when `measure` is set (else 0).
#[inline]
#[allow(clippy::too_many_arguments)]
fn quantize_group(
    g: &[f32],
    codes: &mut [u8],
    scale: f32,
    lo: f32,
    symmetric: bool,
    qmax: i32,
    levels: i32,
    measure: bool,
) -> f64 {
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    if symmetric {
        for (x, c) in g.iter().zip(codes.iter_mut()) {
            *c = (round_i32(x * inv).clamp(-qmax, qmax) + qmax) as u8;
        }
    } else {
        for (x, c) in g.iter().zip(codes.iter_mut()) {
            *c = round_i32((x - lo) * inv).clamp(0, levels - 1) as u8;
        }
    }
    if !measure {
        return 0.0;
    }
    let mut err = 0.0f32;
    for (x, c) in g.iter().zip(codes.iter()) {
        let r = if symmetric {
            (*c as i32 - qmax) as f32 * scale
        } else {
            lo + *c as f32 * scale
        };
        let d = x - r;
        err += d * d;
    }
    err as f64
}

/// What [`fit`] finds for a signal: the group length, the codes of plain
/// rounding, and the f16-rounded scale and minimum of every group.
pub(crate) struct RtnFit {
    /// Group length.
    pub(crate) group: usize,
    /// One code per value (`0..2^bits`), row-major.
    pub(crate) codes: Vec<u8>,
    /// Scale of each group (f16-rounded).
    pub(crate) scales: Vec<f32>,
    /// Minimum of each group (f16-rounded; zeros when symmetric).
    pub(crate) mins: Vec<f32>,
}

/// Chooses every group's scale (and minimum) as [`encode`] does, clipping
/// search included, and rounds each value to its group's grid.
pub(crate) fn fit(spec: &RtnSpec, x: &Signal) -> Result<RtnFit, KernelError> {
    check_finite(&x.data)?;
    let g = group_len(spec.group, x.rows, x.cols)?;
    let bits = spec.bits;
    let levels = 1i32 << bits;
    let qmax = (levels / 2) - 1;
    let mut codes = vec![0u8; x.len()];
    let ratios: Vec<f32> = if spec.search {
        (0..20).map(|i| 1.0 - 0.02 * i as f32).collect()
    } else {
        vec![1.0]
    };
    let symmetric = spec.symmetric;
    let work = |(grp, out): (&[f32], &mut [u8])| -> (f32, f32) {
        let (mn, mx) = grp
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| {
                (a.min(*v), b.max(*v))
            });
        let mut best = (f64::INFINITY, 0.0f32, 0.0f32);
        for &r in &ratios {
            let (scale, lo) = if symmetric {
                (round_f16(mn.abs().max(mx.abs()) * r / qmax as f32), 0.0)
            } else {
                let lo = round_f16(mn * r);
                (round_f16((mx * r - lo).max(0.0) / (levels - 1) as f32), lo)
            };
            let e = quantize_group(
                grp,
                out,
                scale,
                lo,
                symmetric,
                qmax,
                levels,
                ratios.len() > 1,
            );
            if e < best.0 {
                best = (e, scale, lo);
            }
        }
        if ratios.len() > 1 {
            quantize_group(grp, out, best.1, best.2, symmetric, qmax, levels, false);
        }
        (best.1, best.2)
    };
    let results: Vec<(f32, f32)> = x
        .data
        .par_chunks(g)
        .zip(codes.par_chunks_mut(g))
        .map(work)
        .collect();
    let (scales, mins): (Vec<f32>, Vec<f32>) = results.into_iter().unzip();
    Ok(RtnFit {
        group: g,
        codes,
        scales,
        mins,
    })
}

/// The parts and metadata [`encode`] writes for codes, scales and minima.
pub(crate) fn coded(spec: &RtnSpec, fit: &RtnFit) -> Coded {
    let n_groups = fit.scales.len();
    let mut parts = vec![
        Part::bytes("codes", bits::pack(&fit.codes, spec.bits)),
        Part::f16("scales", &fit.scales, vec![n_groups]),
    ];
    if !spec.symmetric {
        parts.push(Part::f16("mins", &fit.mins, vec![n_groups]));
    }
    Coded {
        meta: to_meta(&RtnMeta {
            bits: spec.bits,
            group: fit.group,
            symmetric: spec.symmetric,
        }),
        parts,
    }
}

/// Encodes a signal.
pub fn encode(spec: &RtnSpec, x: &Signal) -> Result<Coded, KernelError> {
    let fit = fit(spec, x)?;
    Ok(coded(spec, &fit))
}

/// Decodes `rows × cols` values.
pub fn decode(
    meta: &serde_json::Value,
    parts: &Parts,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, KernelError> {
    let m: RtnMeta = parse_meta("rtn", meta)?;
    if !(2..=8).contains(&m.bits) || m.group == 0 || !cols.is_multiple_of(m.group) {
        return Err(KernelError::Meta {
            stage: "rtn".into(),
            why: format!(
                "bits {} / group {} do not fit rows of {cols}",
                m.bits, m.group
            ),
        });
    }
    let n = rows * cols;
    let n_groups = n / m.group;
    let packed = parts.byte_values("codes", bits::packed_len(n, m.bits))?;
    let codes = bits::unpack(packed, m.bits, n)
        .ok_or_else(|| KernelError::corrupt("codes", "too short"))?;
    let scales = parts.f16_values("scales", n_groups)?;
    let mins = if m.symmetric {
        Vec::new()
    } else {
        parts.f16_values("mins", n_groups)?
    };
    let qmax = (1i32 << (m.bits - 1)) - 1;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(m.group)
        .zip(codes.par_chunks(m.group))
        .enumerate()
        .for_each(|(gi, (o, c))| {
            let s = scales[gi];
            if m.symmetric {
                for (v, q) in o.iter_mut().zip(c) {
                    *v = (*q as i32 - qmax) as f32 * s;
                }
            } else {
                let lo = mins[gi];
                for (v, q) in o.iter_mut().zip(c) {
                    *v = lo + *q as f32 * s;
                }
            }
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::gaussian_vec;
    use crate::stats::sqnr_db;
    use proptest::prelude::*;

    fn run(spec: &RtnSpec, x: &Signal) -> Vec<f32> {
        let c = encode(spec, x).unwrap();
        decode(&c.meta, &Parts::new(c.parts), x.rows, x.cols).unwrap()
    }

    #[test]
    fn gaussian_error_within_uniform_quantizer_bound() {
        // A b-bit uniform quantizer over a group's range [-m, m] has step
        // 2m/(2^b - 2) and noise ≤ step²/12; with m ≈ 3.2σ for groups of 128
        // Gaussian values the SQNR is at least 6.02 b − 20·log10(3.2·2/√12)
        // − (margin for max over a group), about 6.02 b − 7.3 dB.
        let x = Signal::new(gaussian_vec(1, 256 * 512), 256, 512);
        for bits in [3u8, 4, 8] {
            let spec = RtnSpec {
                bits,
                group: Some(128),
                symmetric: true,
                search: false,
            };
            let s = sqnr_db(&x.data, &run(&spec, &x)).unwrap();
            let bound = 6.02 * bits as f64 - 7.3 - if bits == 8 { 0.5 } else { 0.0 };
            assert!(s > bound, "bits {bits}: {s:.2} dB ≤ {bound:.2}");
        }
    }

    #[test]
    fn search_and_asymmetric_do_not_hurt() {
        let x = Signal::new(gaussian_vec(2, 64 * 256), 64, 256);
        let plain = sqnr_db(
            &x.data,
            &run(
                &RtnSpec {
                    bits: 4,
                    group: Some(64),
                    symmetric: true,
                    search: false,
                },
                &x,
            ),
        )
        .unwrap();
        let searched = sqnr_db(
            &x.data,
            &run(
                &RtnSpec {
                    bits: 4,
                    group: Some(64),
                    symmetric: true,
                    search: true,
                },
                &x,
            ),
        )
        .unwrap();
        let asym = sqnr_db(
            &x.data,
            &run(
                &RtnSpec {
                    bits: 4,
                    group: Some(64),
                    symmetric: false,
                    search: true,
                },
                &x,
            ),
        )
        .unwrap();
        assert!(searched >= plain, "{searched} < {plain}");
        assert!(asym > plain, "{asym} ≤ {plain}");
    }

    #[test]
    fn indivisible_group_is_a_shape_error() {
        let x = Signal::new(vec![0.0; 384], 1, 384);
        let e = encode(
            &RtnSpec {
                bits: 4,
                group: Some(256),
                symmetric: true,
                search: false,
            },
            &x,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not divisible by group 256"), "{e}");
    }

    #[test]
    fn corrupt_parts_are_errors() {
        let x = Signal::new(gaussian_vec(3, 256), 2, 128);
        let c = encode(
            &RtnSpec {
                bits: 4,
                group: None,
                symmetric: true,
                search: false,
            },
            &x,
        )
        .unwrap();
        let mut parts = c.parts.clone();
        parts[0].data.pop();
        assert!(decode(&c.meta, &Parts::new(parts), 2, 128).is_err());
        assert!(
            decode(
                &serde_json::json!({"bits": 9}),
                &Parts::new(c.parts),
                2,
                128
            )
            .is_err()
        );
    }

    proptest! {
        #[test]
        fn round_trip_is_within_half_a_step(bits in 2u8..=8, sym in any::<bool>(), rows in 1usize..4, groups in 1usize..4, seed in any::<u64>()) {
            let cols = 32 * groups;
            let x = Signal::new(gaussian_vec(seed, rows * cols), rows, cols);
            let spec = RtnSpec { bits, group: Some(32), symmetric: sym, search: false };
            let c = encode(&spec, &x).unwrap();
            let scales = Parts::new(c.parts.clone()).f16_values("scales", rows * cols / 32).unwrap();
            let y = decode(&c.meta, &Parts::new(c.parts), rows, cols).unwrap();
            for (i, (a, b)) in x.data.iter().zip(&y).enumerate() {
                let s = scales[i / 32];
                // Half a step, plus what f16 rounding of the range can clip.
                prop_assert!((a - b).abs() <= 0.5 * s + 2e-3 * a.abs() + 1e-6, "{} vs {} step {}", a, b, s);
            }
        }
    }
}
