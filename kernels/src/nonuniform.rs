//! Non-uniform scalar quantization by group, 2–4 bits.
//!
//! Each group of `group` values is divided by its scale (the group's RMS
//! times a multiplier searched over 0.70..=1.30 for the least squared
//! error, stored f16) and each value is coded as the index of the nearest
//! level. Levels are either the Lloyd–Max levels of a unit Gaussian (Max,
//! 1960; fixed tables below) or learned for the tensor by Lloyd iterations
//! over its normalised values (stored as the f16 part `levels`).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::part::{Coded, parse_meta, round_f16, to_meta};
use crate::rtn::{check_finite, group_len};
use crate::{KernelError, Part, Parts, Signal, bits};
use hcx_protocol::stage::{LevelSource, NonuniformSpec};

/// Positive Lloyd–Max levels of a unit Gaussian for 2, 3 and 4 bits (the
/// negative levels mirror them).
pub fn lloyd_max_levels(bits: u8) -> Vec<f32> {
    let half: &[f32] = match bits {
        2 => &[0.4528, 1.5104],
        3 => &[0.2451, 0.7560, 1.3439, 2.1519],
        _ => &[
            0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326,
        ],
    };
    half.iter()
        .rev()
        .map(|v| -v)
        .chain(half.iter().copied())
        .collect()
}

/// What the decoder needs besides the parts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NonuniformMeta {
    /// Bits per code.
    pub bits: u8,
    /// Group length.
    pub group: usize,
    /// Level source.
    pub levels: LevelSource,
}

/// The index of the level nearest to `v` (the number of thresholds below it).
#[inline]
pub(crate) fn nearest(thresholds: &[f32], v: f32) -> usize {
    thresholds.iter().take_while(|t| v > **t).count()
}

fn thresholds(levels: &[f32]) -> Vec<f32> {
    levels.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect()
}

/// Quantizes one group at a given scale; returns the squared error.
fn code_group(g: &[f32], out: &mut [u8], scale: f32, levels: &[f32], th: &[f32]) -> f64 {
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut err = 0.0f64;
    for (x, c) in g.iter().zip(out.iter_mut()) {
        let i = nearest(th, x * inv);
        *c = i as u8;
        let d = (x - levels[i] * scale) as f64;
        err += d * d;
    }
    err
}

fn group_rms(g: &[f32]) -> f32 {
    (g.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / g.len() as f64).sqrt() as f32
}

/// Lloyd iterations over values already divided by their group's RMS.
fn learn_levels(x: &[f32], group: usize, start: &[f32]) -> Vec<f32> {
    // Normalised sample (deterministic stride, at most ~1M values).
    let mut sample = Vec::new();
    extend_sample(&mut sample, x, group, 0, sample_stride(x.len()));
    levels_from_sample(&sample, start)
}

/// Every how many values of a tensor of `n` the learned levels' sample
/// takes one (at most about 2^20 values).
pub(crate) fn sample_stride(n: usize) -> usize {
    (n / (1 << 20)).max(1)
}

/// Appends to `sample` the values of `x` (whole groups of `group`, the
/// tensor's values from flat index `start` on) divided by their group's
/// RMS, at the flat indices of the whole tensor that are multiples of
/// `stride`.
pub(crate) fn extend_sample(
    sample: &mut Vec<f32>,
    x: &[f32],
    group: usize,
    start: usize,
    stride: usize,
) {
    let first = start.div_ceil(stride) * stride - start;
    sample.extend(
        x.chunks(group)
            .flat_map(|g| {
                let r = group_rms(g);
                let inv = if r > 0.0 { 1.0 / r } else { 0.0 };
                g.iter().map(move |v| v * inv)
            })
            .skip(first)
            .step_by(stride),
    );
}

/// Levels fitted by Lloyd iterations to a sample of normalised values,
/// starting from `start`, rounded to f16.
pub(crate) fn levels_from_sample(sample: &[f32], start: &[f32]) -> Vec<f32> {
    let mut levels = start.to_vec();
    for _ in 0..30 {
        let th = thresholds(&levels);
        let mut sum = vec![0f64; levels.len()];
        let mut cnt = vec![0u64; levels.len()];
        for v in sample {
            let i = nearest(&th, *v);
            sum[i] += *v as f64;
            cnt[i] += 1;
        }
        for i in 0..levels.len() {
            if cnt[i] > 0 {
                levels[i] = (sum[i] / cnt[i] as f64) as f32;
            }
        }
        levels.sort_by(f32::total_cmp);
    }
    levels.iter().map(|v| round_f16(*v)).collect()
}

/// What [`fit`] finds for a signal: the group length, the levels, the
/// codes of nearest-level rounding and the f16-rounded scale of every group.
pub(crate) struct NonuniformFit {
    /// Group length.
    pub(crate) group: usize,
    /// The levels (of a unit-scale group), ascending.
    pub(crate) levels: Vec<f32>,
    /// Decision thresholds between consecutive levels.
    pub(crate) thresholds: Vec<f32>,
    /// One code per value, row-major.
    pub(crate) codes: Vec<u8>,
    /// Scale of each group (f16-rounded).
    pub(crate) scales: Vec<f32>,
}

/// Chooses the levels and every group's scale as [`encode`] does and codes
/// each value as its nearest level.
pub(crate) fn fit(spec: &NonuniformSpec, x: &Signal) -> Result<NonuniformFit, KernelError> {
    fit_with(spec, x, None)
}

/// [`fit`], with `levels` learned beforehand on the whole tensor this is a
/// piece of rows of (see [`crate::row_pieces`]) where given.
pub(crate) fn fit_with(
    spec: &NonuniformSpec,
    x: &Signal,
    learned: Option<&[f32]>,
) -> Result<NonuniformFit, KernelError> {
    check_finite(&x.data)?;
    let g = group_len(Some(spec.group), x.rows, x.cols)?;
    let mut levels = lloyd_max_levels(spec.bits);
    if spec.levels == LevelSource::Learned {
        levels = match learned {
            Some(l) => l.to_vec(),
            None => learn_levels(&x.data, g, &levels),
        };
    }
    let th = thresholds(&levels);
    let mults: Vec<f32> = (0..13).map(|i| 0.70 + 0.05 * i as f32).collect();
    let mut codes = vec![0u8; x.len()];
    let scales: Vec<f32> = x
        .data
        .par_chunks(g)
        .zip(codes.par_chunks_mut(g))
        .map(|(grp, out)| {
            let r = group_rms(grp);
            let mut best = (f64::INFINITY, 0.0f32);
            for m in &mults {
                let s = round_f16(r * m);
                let e = code_group(grp, out, s, &levels, &th);
                if e < best.0 {
                    best = (e, s);
                }
            }
            code_group(grp, out, best.1, &levels, &th);
            best.1
        })
        .collect();
    Ok(NonuniformFit {
        group: g,
        levels,
        thresholds: th,
        codes,
        scales,
    })
}

/// The parts and metadata [`encode`] writes for a fit's codes and scales.
pub(crate) fn coded(spec: &NonuniformSpec, fit: &NonuniformFit) -> Coded {
    let mut parts = vec![
        Part::bytes("codes", bits::pack(&fit.codes, spec.bits)),
        Part::f16("scales", &fit.scales, vec![fit.scales.len()]),
    ];
    if spec.levels == LevelSource::Learned {
        parts.push(Part::f16("levels", &fit.levels, vec![fit.levels.len()]));
    }
    Coded {
        meta: to_meta(&NonuniformMeta {
            bits: spec.bits,
            group: fit.group,
            levels: spec.levels,
        }),
        parts,
    }
}

/// Encodes a signal.
pub fn encode(spec: &NonuniformSpec, x: &Signal) -> Result<Coded, KernelError> {
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
    let m: NonuniformMeta = parse_meta("nonuniform", meta)?;
    if !(2..=4).contains(&m.bits) || m.group == 0 || !cols.is_multiple_of(m.group) {
        return Err(KernelError::Meta {
            stage: "nonuniform".into(),
            why: format!(
                "bits {} / group {} do not fit rows of {cols}",
                m.bits, m.group
            ),
        });
    }
    let n = rows * cols;
    let levels = match m.levels {
        LevelSource::LloydMax => lloyd_max_levels(m.bits),
        LevelSource::Learned => parts.f16_values("levels", 1 << m.bits)?,
    };
    let codes = bits::unpack(
        parts.byte_values("codes", bits::packed_len(n, m.bits))?,
        m.bits,
        n,
    )
    .ok_or_else(|| KernelError::corrupt("codes", "too short"))?;
    let scales = parts.f16_values("scales", n / m.group)?;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(m.group)
        .zip(codes.par_chunks(m.group))
        .zip(scales.par_iter())
        .for_each(|((o, c), s)| {
            for (v, q) in o.iter_mut().zip(c) {
                *v = levels[*q as usize] * s;
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

    fn run(spec: &NonuniformSpec, x: &Signal) -> Vec<f32> {
        let c = encode(spec, x).unwrap();
        decode(&c.meta, &Parts::new(c.parts), x.rows, x.cols).unwrap()
    }

    #[test]
    fn lloyd_max_is_a_fixed_point_on_gaussian() {
        let x = gaussian_vec(11, 400_000);
        for bits in [2u8, 3, 4] {
            let start = lloyd_max_levels(bits);
            let learned = learn_levels(&x, x.len(), &start);
            for (a, b) in start.iter().zip(&learned) {
                assert!((a - b).abs() < 0.03, "{bits} bits: {a} vs {b}");
            }
        }
    }

    #[test]
    fn gaussian_sqnr_near_lloyd_max() {
        // Lloyd–Max on a unit Gaussian: 9.30, 14.62, 20.22 dB at 2, 3, 4 bits.
        // Groups of 128 estimate the scale from the data (slightly better or
        // worse than the true σ); allow 0.6 dB.
        let x = Signal::new(gaussian_vec(12, 256 * 512), 256, 512);
        for (bits, lm) in [(2u8, 9.30), (3, 14.62), (4, 20.22)] {
            for levels in [LevelSource::LloydMax, LevelSource::Learned] {
                let s = sqnr_db(
                    &x.data,
                    &run(
                        &NonuniformSpec {
                            bits,
                            group: 128,
                            levels,
                        },
                        &x,
                    ),
                )
                .unwrap();
                assert!(s > lm - 0.6, "{bits} bits {levels:?}: {s:.2} dB");
            }
        }
    }

    #[test]
    fn corrupt_is_an_error() {
        let x = Signal::new(gaussian_vec(4, 256), 1, 256);
        let c = encode(
            &NonuniformSpec {
                bits: 3,
                group: 64,
                levels: LevelSource::Learned,
            },
            &x,
        )
        .unwrap();
        let mut p = c.parts.clone();
        p.retain(|p| p.name != "levels");
        assert!(decode(&c.meta, &Parts::new(p), 1, 256).is_err());
    }

    proptest! {
        #[test]
        fn round_trip_codes_are_levels(seed in any::<u64>(), bits in 2u8..=4, learned in any::<bool>()) {
            let x = Signal::new(gaussian_vec(seed, 256), 2, 128);
            let spec = NonuniformSpec { bits, group: 64, levels: if learned { LevelSource::Learned } else { LevelSource::LloydMax } };
            let c = encode(&spec, &x).unwrap();
            let again = encode(&spec, &x).unwrap();
            prop_assert_eq!(&c.parts, &again.parts);
            let y = decode(&c.meta, &Parts::new(c.parts), 2, 128).unwrap();
            prop_assert!(y.iter().all(|v| v.is_finite()));
            let s = sqnr_db(&x.data, &y).unwrap_or(f64::INFINITY);
            prop_assert!(s > 3.0 * bits as f64);
        }
    }
}
