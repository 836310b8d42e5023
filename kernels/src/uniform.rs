//! Entropy-constrained uniform scalar quantization.
//!
//! One step Δ for the whole tensor, codes q = round(x/Δ) (optionally with a
//! dead zone), one code per byte (a second byte plane only when |q| > 127).
//! Δ is found by bisection so that the empirical entropy of the codes meets
//! the spec's `bits`; the bytes themselves are left to the entropy stage
//! after it (zstd's Huffman literals come within a few hundredths of a bit
//! of that entropy). With a single step every weight gets the same noise
//! Δ²/12, which is what minimises squared error for a given rate (reverse
//! water-filling); on Gaussian data this sits about 1.5 dB from the Shannon
//! bound at high rate, closer at low rate.
//!
//! Reconstruction points: q·Δ shifted toward the centroid of the values
//! that chose them, for |q| = 1..=8 (eight f32 offsets in the metadata),
//! which recovers a few tenths of a dB at low rates.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::part::{Coded, parse_meta, to_meta};
use crate::rtn::check_finite;
use crate::{KernelError, Part, Parts, Signal};
use hcx_protocol::stage::UniformSpec;

/// Number of magnitudes with their own reconstruction offset.
pub const OFFSETS: usize = 8;

/// What the decoder needs besides the parts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UniformMeta {
    /// Step.
    pub step: f32,
    /// Reconstruction offsets (in steps) for |q| = 1..=8.
    pub offsets: Vec<f32>,
    /// Whether the `codes_hi` plane exists (codes beyond ±127).
    pub wide: bool,
    /// Empirical entropy of the codes, bits per weight.
    pub entropy_bits: f64,
}

/// The code of one value for step `1/inv` and dead zone `dz`.
#[inline]
pub(crate) fn quantize(x: f32, inv: f32, dz: f32) -> i32 {
    // floor(|x|/Δ + 1/2 − dz) clamped at 0; for non-negative values `as`
    // truncation is that floor, without a libm call.
    // (`max` maps NaN to 0, as the comparison did; a ≥ 0, so its negation
    // cannot wrap.)
    let a = (x.abs() * inv + 0.5 - dz).max(0.0) as i32;
    if x < 0.0 { a.wrapping_neg() } else { a }
}

/// Counts the code of `v` at step `1/inv` in `hist` (or `far`).
#[inline(always)]
fn count(
    v: f32,
    inv: f32,
    dz: f32,
    hist: &mut [u32; (2 * HIST_R + 1) as usize],
    far: &mut std::collections::BTreeMap<i32, u64>,
) {
    let q = quantize(v, inv, dz);
    if q.unsigned_abs() <= HIST_R as u32 {
        let c = &mut hist[q.wrapping_add(HIST_R) as usize];
        *c = c.wrapping_add(1);
    } else {
        *far.entry(q).or_default() += 1;
    }
}

/// Zero-order entropy (bits per value) of the codes for step `1/inv`.
fn entropy_at(x: &[f32], inv: f32, dz: f32) -> f64 {
    // Codes beyond ±R are rare; they are counted in an ordered map so that the
    // sum below runs in the same order every time (a HashMap's order changes
    // between runs, and with it the float sum and the bisection's step).
    use std::collections::BTreeMap;
    const R: i32 = HIST_R;
    let hist = x
        .par_chunks(PASS_CHUNK)
        .map(|c| {
            // Four histograms, one per value of each group of four, so that
            // neighbouring values with the same code do not wait on each
            // other's increments; u32 counts, as a chunk holds fewer values.
            let mut h4 = [[0u32; (2 * R + 1) as usize]; 4];
            let mut far: BTreeMap<i32, u64> = BTreeMap::new();
            let [h0, h1, h2, h3] = &mut h4;
            let mut groups = c.chunks_exact(4);
            for g in &mut groups {
                count(g[0], inv, dz, h0, &mut far);
                count(g[1], inv, dz, h1, &mut far);
                count(g[2], inv, dz, h2, &mut far);
                count(g[3], inv, dz, h3, &mut far);
            }
            for v in groups.remainder() {
                count(*v, inv, dz, h0, &mut far);
            }
            let h: Vec<u64> = (0..(2 * R + 1) as usize)
                .map(|i| h4.iter().map(|l| u64::from(l[i])).sum())
                .collect();
            (h, far)
        })
        .reduce(
            || (vec![0u64; (2 * R + 1) as usize], BTreeMap::new()),
            |(mut a, mut fa), (b, fb)| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                for (k, v) in fb {
                    *fa.entry(k).or_default() += v;
                }
                (a, fa)
            },
        );
    entropy_of(&hist.0, &hist.1, x.len())
}

/// The step for a target entropy of `bits` (bisection on log2 of the step,
/// as [`encode`] does) and the codes' entropy at that step; `(1, 0)` for an
/// all-zero signal.
pub(crate) fn find_step(x: &[f32], bits: f64, dz: f32) -> (f32, f64) {
    let n = x.len();
    let rms = (crate::stats::energy(x) / n.max(1) as f64).sqrt();
    if rms == 0.0 {
        (1.0f32, 0.0)
    } else {
        // Bisection on log2(step): entropy falls as the step grows.
        let mut lo = (rms * 1e-4).log2();
        let mut hi = (rms * 64.0).log2();
        for _ in 0..30 {
            let mid = 0.5 * (lo + hi);
            let inv = (1.0 / mid.exp2()) as f32;
            if entropy_at(x, inv, dz) > bits {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let step = hi.exp2() as f32;
        (step, entropy_at(x, 1.0 / step, dz))
    }
}

/// The value the decoder reconstructs for code `q`.
#[inline]
pub(crate) fn reconstruct(q: i32, step: f32, offsets: &[f32]) -> f32 {
    let a = q.unsigned_abs() as usize;
    let mag = if (1..=OFFSETS).contains(&a) {
        a as f32 + offsets[a - 1]
    } else {
        a as f32
    };
    if q < 0 { -mag * step } else { mag * step }
}

/// The centroid offsets (in steps) of the values coded with |q| = 1..=8.
pub(crate) fn offsets_for(x: &[f32], codes: &[i32], inv: f32) -> Vec<f32> {
    let mut sums = [0i64; OFFSETS];
    let mut counts = [0u64; OFFSETS];
    for (v, q) in x.iter().zip(codes) {
        let m = q.unsigned_abs() as usize;
        if (1..=OFFSETS).contains(&m) {
            sums[m - 1] += i64::from(scaled(v.abs() * inv));
            counts[m - 1] += 1;
        }
    }
    offsets_from(&sums, &counts)
}

/// Scale of the offsets' exact sums: a value coded with |q| ≥ 1 is at least
/// half a step from zero (the dead zone only moves that up), and an f32 of
/// at least 1/2 is a whole multiple of 2^-24, so |x|/Δ · 2^24 is an
/// integer. Summed as integers, the offsets do not depend on the order the
/// values are added in: not on chunks, threads or pieces of rows.
const OFFSET_SCALE: f32 = (1u32 << 24) as f32;

/// |x|/Δ as an integer multiple of 2^-24 (exact for the magnitudes 1 to
/// [`OFFSETS`]; the cast saturates for the others, whose sums are unused).
#[inline(always)]
fn scaled(a: f32) -> i32 {
    (a * OFFSET_SCALE) as i32
}

/// The offsets (in steps) from the exact sums of |x|/Δ · 2^24 and the
/// counts of the values coded with each magnitude 1 to [`OFFSETS`].
fn offsets_from(sums: &[i64; OFFSETS], counts: &[u64; OFFSETS]) -> Vec<f32> {
    (0..OFFSETS)
        .map(|i| {
            if counts[i] > 0 {
                // Σ(|x|/Δ − m) · 2^24, exact in i128, then one rounding.
                let m = (i + 1) as i128;
                let excess = i128::from(sums[i]) - m * i128::from(counts[i]) * (1 << 24);
                (excess as f64 / OFFSET_SCALE as f64 / counts[i] as f64) as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// Codes of every value at step `1/inv`.
pub(crate) fn codes_at(x: &[f32], inv: f32, dz: f32) -> Vec<i32> {
    x.par_iter().map(|v| quantize(*v, inv, dz)).collect()
}

/// Zero-order entropy (bits per value) of codes.
pub(crate) fn codes_entropy(codes: &[i32]) -> f64 {
    use std::collections::BTreeMap;
    const R: i32 = HIST_R;
    let mut h = vec![0u64; (2 * R + 1) as usize];
    let mut far: BTreeMap<i32, u64> = BTreeMap::new();
    for &q in codes {
        if q.abs() <= R {
            h[(q + R) as usize] += 1;
        } else {
            *far.entry(q).or_default() += 1;
        }
    }
    entropy_of(&h, &far, codes.len())
}

/// The error for codes beyond what two bytes hold.
fn too_wide() -> KernelError {
    KernelError::Values(
        "uniform codes exceed 16 bits: the tensor has outliers far beyond the step; lower `bits`"
            .into(),
    )
}

/// The parts and metadata [`encode`] writes for codes at a step.
pub(crate) fn coded(
    codes: &[i32],
    step: f32,
    offsets: Vec<f32>,
    entropy_bits: f64,
) -> Result<Coded, KernelError> {
    let wide = codes.iter().any(|q| !(-127..=127).contains(q));
    if codes.iter().any(|q| !(-32767..=32767).contains(q)) {
        return Err(too_wide());
    }
    let mut parts = vec![Part::bytes(
        "codes",
        codes.iter().map(|q| (*q as i16).to_le_bytes()[0]).collect(),
    )];
    if wide {
        parts.push(Part::bytes(
            "codes_hi",
            codes.iter().map(|q| (*q as i16).to_le_bytes()[1]).collect(),
        ));
    }
    Ok(Coded {
        meta: to_meta(&UniformMeta {
            step,
            offsets,
            wide,
            entropy_bits,
        }),
        parts,
    })
}

/// Largest number of values the step search looks at: a tensor with more
/// is searched on a strided sample of about this many (see [`sample`]).
pub const SAMPLE: usize = 1 << 18;

/// The work [`encode`] does on `n` values, in units of one value visited by
/// one pass of the step search: 31 passes over the search's sample (at
/// most [`SAMPLE`] values, so this part stops growing), each with a fixed
/// cost of about 45,000 such visits, and the quantizing pass, about two
/// visits a value. Measured on one thread of the 2-core AMD EPYC (1.3 ns a
/// visit): 4.7, 12.2 and 92 ms for 64,512, 589,824 and 16.8 M values,
/// which this model puts at 4.7, 14.2 and 57 ms (the largest leaves the
/// caches). For estimates that scale the time of a sample to the whole
/// tensor.
pub fn relative_work(n: usize) -> f64 {
    const SEARCH_PASSES: f64 = 31.0;
    const PASS_FIXED: f64 = 45_000.0;
    const PASS_WEIGHT: f64 = 2.0;
    SEARCH_PASSES * (n.min(SAMPLE) as f64 + PASS_FIXED) + PASS_WEIGHT * n as f64
}

/// Every `stride`-th value of `x`, the stride the smallest at or above
/// `x.len() / SAMPLE` that shares no factor with the row length `cols`, so
/// that the sample walks through every column (weights' columns can have
/// very different scales) rather than a fixed subset of them. A tensor of
/// at most [`SAMPLE`] values is its own sample.
pub fn sample(x: &[f32], cols: usize) -> std::borrow::Cow<'_, [f32]> {
    let n = x.len();
    if n <= SAMPLE {
        return std::borrow::Cow::Borrowed(x);
    }
    std::borrow::Cow::Owned(x.iter().step_by(sample_stride(n, cols)).copied().collect())
}

/// The stride [`sample`] takes through `n` values in rows of `cols`: 1 for
/// at most [`SAMPLE`] values.
pub(crate) fn sample_stride(n: usize, cols: usize) -> usize {
    if n <= SAMPLE {
        return 1;
    }
    fn gcd(mut a: usize, mut b: usize) -> usize {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    }
    let mut stride = n.div_ceil(SAMPLE);
    while gcd(stride, cols.max(1)) != 1 {
        stride += 1;
    }
    stride
}

/// What one pass over a chunk of values gathers: its codes' histogram, the
/// sums for the reconstruction offsets, and whether any code needs the
/// high byte.
#[derive(Debug, PartialEq)]
pub(crate) struct ChunkTally {
    hist: Vec<u64>,
    far: std::collections::BTreeMap<i32, u64>,
    /// Σ |x|/Δ · 2^24 by magnitude 1 to [`OFFSETS`] (see [`scaled`]).
    sums: [i64; OFFSETS],
    counts: [u64; OFFSETS],
    wide: bool,
    too_wide: bool,
}

impl ChunkTally {
    /// A tally of no values.
    pub(crate) fn empty() -> ChunkTally {
        ChunkTally {
            hist: vec![0u64; (2 * HIST_R + 1) as usize],
            far: std::collections::BTreeMap::new(),
            sums: [0; OFFSETS],
            counts: [0; OFFSETS],
            wide: false,
            too_wide: false,
        }
    }

    /// The tally of a pass the device ran ([`crate::gpu::uniform_tally`]).
    pub(crate) fn from_device(d: crate::gpu::UniformTally) -> ChunkTally {
        let mut far = std::collections::BTreeMap::new();
        for q in d.far {
            *far.entry(q).or_default() += 1;
        }
        let r = HIST_R as usize;
        ChunkTally {
            counts: std::array::from_fn(|i| d.hist[r + i + 1] + d.hist[r - i - 1]),
            hist: d.hist,
            far,
            sums: d.sums,
            wide: d.max_magnitude > 127,
            too_wide: d.max_magnitude > 32767,
        }
    }

    /// Adds `t`'s counts and sums to this tally's (exact: the result does
    /// not depend on the order tallies are added in).
    pub(crate) fn add(&mut self, t: ChunkTally) {
        for (a, b) in self.hist.iter_mut().zip(&t.hist) {
            *a += b;
        }
        for (k, v) in t.far {
            *self.far.entry(k).or_default() += v;
        }
        for i in 0..OFFSETS {
            self.sums[i] += t.sums[i];
            self.counts[i] += t.counts[i];
        }
        self.wide |= t.wide;
        self.too_wide |= t.too_wide;
    }

    /// The parameters [`encode`] records for `n` values tallied at `step`:
    /// the offsets, whether codes need a high byte, the codes' entropy; an
    /// error where a code needs more than two bytes.
    pub(crate) fn fit(&self, step: f32, n: usize) -> Result<UniformMeta, KernelError> {
        if self.too_wide {
            return Err(too_wide());
        }
        Ok(UniformMeta {
            step,
            offsets: offsets_from(&self.sums, &self.counts),
            wide: self.wide,
            entropy_bits: entropy_of(&self.hist, &self.far, n),
        })
    }
}

/// Half the width of the histogram of codes kept in an array (codes beyond
/// ±`HIST_R` go to an ordered map).
const HIST_R: i32 = 512;

/// One value of the quantizing pass: its code's low byte, with the code
/// counted in `hist` (or `far`), its offset from the code added to `sums`
/// by magnitude, and the largest magnitude kept in `m_max`.
#[inline(always)]
fn tally(
    v: f32,
    inv: f32,
    dz: f32,
    sums: &mut [i64; OFFSETS + 2],
    hist: &mut [u32; (2 * HIST_R + 1) as usize],
    far: &mut std::collections::BTreeMap<i32, u64>,
    m_max: &mut u32,
) -> u8 {
    let q = quantize(v, inv, dz);
    let m = q.unsigned_abs();
    let slot = (m as usize).min(OFFSETS + 1);
    // Slots 0 and OFFSETS + 1 are never read; their sums may wrap.
    sums[slot] = sums[slot].wrapping_add(i64::from(scaled(v.abs() * inv)));
    if m <= HIST_R as u32 {
        let h = &mut hist[q.wrapping_add(HIST_R) as usize];
        *h = h.wrapping_add(1);
    } else {
        *far.entry(q).or_default() += 1;
    }
    *m_max = (*m_max).max(m);
    (q as i16).to_le_bytes()[0]
}

/// Values per chunk of the quantizing pass and the entropy search.
const PASS_CHUNK: usize = 1 << 16;

/// Codes `x` at step `1/inv` into `lo` (each code's low byte) in one pass,
/// gathering the histogram and the offset sums on the way.
pub(crate) fn quantize_pass(x: &[f32], inv: f32, dz: f32, lo: &mut [u8]) -> ChunkTally {
    // The device's pass has the CPU's bits (`crate::gpu`).
    match crate::gpu::uniform_tally(x, inv, dz, lo) {
        Some(t) => ChunkTally::from_device(t),
        None => quantize_pass_on_cpu(x, inv, dz, lo),
    }
}

/// [`quantize_pass`] on the CPU.
pub(crate) fn quantize_pass_on_cpu(x: &[f32], inv: f32, dz: f32, lo: &mut [u8]) -> ChunkTally {
    const R: i32 = HIST_R;
    let tallies: Vec<ChunkTally> = x
        .par_chunks(PASS_CHUNK)
        .zip(lo.par_chunks_mut(PASS_CHUNK))
        .map(|(c, out)| {
            let mut t = ChunkTally::empty();
            // Offset sums by magnitude, slot 0 and the last slot taking the
            // codes that have no offset, so the loop has no branch on it;
            // four sets of sums and counts, one per value of each group of
            // four, so that neighbouring values with the same code do not
            // wait on each other's additions.
            let mut sums = [[0i64; OFFSETS + 2]; 4];
            let mut hist = [[0u32; (2 * R + 1) as usize]; 4];
            let mut m_max = 0u32;
            let mut vs = c.chunks_exact(4);
            let mut os = out.chunks_exact_mut(4);
            let [s0, s1, s2, s3] = &mut sums;
            let [h0, h1, h2, h3] = &mut hist;
            for (v, o) in (&mut vs).zip(&mut os) {
                o[0] = tally(v[0], inv, dz, s0, h0, &mut t.far, &mut m_max);
                o[1] = tally(v[1], inv, dz, s1, h1, &mut t.far, &mut m_max);
                o[2] = tally(v[2], inv, dz, s2, h2, &mut t.far, &mut m_max);
                o[3] = tally(v[3], inv, dz, s3, h3, &mut t.far, &mut m_max);
            }
            for (v, o) in vs.remainder().iter().zip(os.into_remainder()) {
                *o = tally(*v, inv, dz, s0, h0, &mut t.far, &mut m_max);
            }
            for (i, h) in t.hist.iter_mut().enumerate() {
                *h = hist.iter().map(|l| u64::from(l[i])).sum();
            }
            t.wide = m_max > 127;
            t.too_wide = m_max > 32767;
            for (i, (sum, count)) in t.sums.iter_mut().zip(&mut t.counts).enumerate() {
                // Magnitude i + 1: the four sets' sums in a fixed order.
                let m = i + 1;
                *sum = sums[0][m] + sums[1][m] + sums[2][m] + sums[3][m];
                *count = t.hist[(R + m as i32) as usize] + t.hist[(R - m as i32) as usize];
            }
            t
        })
        .collect();
    let mut all = ChunkTally::empty();
    for t in tallies {
        all.add(t);
    }
    all
}

/// Zero-order entropy (bits per value) of `n` codes from their histogram.
fn entropy_of(hist: &[u64], far: &std::collections::BTreeMap<i32, u64>, n: usize) -> f64 {
    let n = n as f64;
    hist.iter()
        .copied()
        .chain(far.values().copied())
        .filter(|c| *c > 0)
        .map(|c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// Encodes a signal: the step is searched on a strided sample of the
/// tensor ([`sample`]), then one pass codes every value and gathers the
/// codes' entropy and the reconstruction offsets.
pub fn encode(spec: &UniformSpec, x: &Signal) -> Result<Coded, KernelError> {
    check_finite(&x.data)?;
    let dz = spec.deadzone as f32;
    let (step, _) = find_step(&sample(&x.data, x.cols), spec.bits, dz);
    let mut lo = vec![0u8; x.data.len()];
    let t = quantize_pass(&x.data, 1.0 / step, dz, &mut lo);
    let fit = t.fit(step, x.data.len())?;
    Ok(coded_with(fit, dz, &x.data, lo))
}

/// Encodes a signal with parameters fitted beforehand on a tensor it is a
/// piece of ([`ChunkTally::fit`] over every piece's tally at the step the
/// whole tensor's sample gave): the pieces' parts laid end to end are the
/// parts [`encode`] gives the whole tensor.
pub(crate) fn encode_fitted(
    fit: &UniformMeta,
    spec: &UniformSpec,
    x: &Signal,
) -> Result<Coded, KernelError> {
    check_finite(&x.data)?;
    let dz = spec.deadzone as f32;
    let mut lo = vec![0u8; x.data.len()];
    let t = quantize_pass(&x.data, 1.0 / fit.step, dz, &mut lo);
    if t.too_wide {
        return Err(too_wide());
    }
    if t.wide && !fit.wide {
        return Err(KernelError::Meta {
            stage: "uniform".into(),
            why: "a piece has codes beyond ±127 that the fit over the whole tensor did not see"
                .into(),
        });
    }
    Ok(coded_with(fit.clone(), dz, &x.data, lo))
}

/// The parts and metadata of `x` coded with `fit`, its codes' low bytes
/// already in `lo`.
fn coded_with(fit: UniformMeta, dz: f32, x: &[f32], lo: Vec<u8>) -> Coded {
    let inv = 1.0 / fit.step;
    let mut parts = vec![Part::bytes("codes", lo)];
    if fit.wide {
        parts.push(Part::bytes(
            "codes_hi",
            x.par_iter()
                .map(|v| (quantize(*v, inv, dz) as i16).to_le_bytes()[1])
                .collect(),
        ));
    }
    Coded {
        meta: to_meta(&fit),
        parts,
    }
}

/// Decodes `rows × cols` values.
pub fn decode(
    meta: &serde_json::Value,
    parts: &Parts,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, KernelError> {
    let m: UniformMeta = parse_meta("uniform", meta)?;
    if m.offsets.len() != OFFSETS || !m.step.is_finite() {
        return Err(KernelError::Meta {
            stage: "uniform".into(),
            why: "step or offsets malformed".into(),
        });
    }
    let n = rows * cols;
    let lo = parts.byte_values("codes", n)?;
    let hi = if m.wide {
        Some(parts.byte_values("codes_hi", n)?)
    } else {
        None
    };
    let mut out = vec![0f32; n];
    const CHUNK: usize = 1 << 14;
    match hi {
        Some(h) => out.par_iter_mut().enumerate().for_each(|(i, o)| {
            let q = i16::from_le_bytes([lo[i], h[i]]) as i32;
            *o = reconstruct(q, m.step, &m.offsets);
        }),
        None => {
            // One byte per code: every value the decoder can produce, looked
            // up by the code's byte (the same `reconstruct`, so the same bits).
            let mut table = [0f32; 256];
            for (b, v) in table.iter_mut().enumerate() {
                *v = reconstruct(b as u8 as i8 as i32, m.step, &m.offsets);
            }
            out.par_chunks_mut(CHUNK)
                .zip(lo.par_chunks(CHUNK))
                .for_each(|(o, c)| {
                    for (v, b) in o.iter_mut().zip(c) {
                        *v = table[*b as usize];
                    }
                });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::gaussian_vec;
    use crate::stats::sqnr_db;
    use proptest::prelude::*;

    fn run(bits: f64, x: &Signal) -> (Vec<f32>, f64) {
        let c = encode(
            &UniformSpec {
                bits,
                deadzone: 0.0,
            },
            x,
        )
        .unwrap();
        let m: UniformMeta = parse_meta("uniform", &c.meta).unwrap();
        (
            decode(&c.meta, &Parts::new(c.parts), x.rows, x.cols).unwrap(),
            m.entropy_bits,
        )
    }

    #[test]
    fn far_codes_sum_in_the_same_order_every_time() {
        // Only codes beyond ±512, 2,000 of them with 37 different counts:
        // the entropy is a sum over the far histogram alone, and its bits
        // must not depend on the order a container hands the counts out.
        let x: Vec<f32> = (0..2000)
            .flat_map(|k| std::iter::repeat_n(1000.0 + k as f32, k % 37 + 1))
            .collect();
        let first = entropy_at(&x, 1.0, 0.0);
        for _ in 0..50 {
            assert_eq!(entropy_at(&x, 1.0, 0.0).to_bits(), first.to_bits());
        }
    }

    #[test]
    fn heavy_tails_encode_identically_every_time() {
        // A Gaussian body with one value in 32 far out: a few hundred
        // distinct codes beyond ±512, where the histogram is a map, with
        // counts from 1 to tens. Every run must give the
        // same step, entropy figure and bytes.
        let mut r = crate::rng::SplitMix64::new(5);
        let data: Vec<f32> = (0..256 * 256)
            .map(|i| {
                if i % 32 == 0 {
                    // Whole magnitudes with geometric frequencies: the far
                    // codes have many different counts.
                    let k = (-(r.next_f64().max(1e-12)).ln() * 40.0).floor();
                    let m = 20.0 + k;
                    (if r.next_u64() & 1 == 1 { -m } else { m }) as f32
                } else {
                    r.gaussian() as f32
                }
            })
            .collect();
        let x = Signal::new(data, 256, 256);
        let spec = UniformSpec {
            bits: 7.0,
            deadzone: 0.0,
        };
        let first = encode(&spec, &x).unwrap();
        let m: UniformMeta = parse_meta("uniform", &first.meta).unwrap();
        let inv = 1.0 / m.step;
        let far = x
            .data
            .iter()
            .filter(|v| quantize(**v, inv, 0.0).abs() > 512)
            .count();
        assert!(far > 1000, "only {far} codes beyond ±512");
        for _ in 0..24 {
            let again = encode(&spec, &x).unwrap();
            assert_eq!(again.meta.to_string(), first.meta.to_string());
            assert_eq!(again.parts, first.parts);
        }
    }

    #[test]
    fn gaussian_within_entropy_coded_bound() {
        // Entropy-coded uniform quantization of a Gaussian: SQNR ≥ 6.02·H − 1.53 dB
        // at high rate (the πe/6 gap); at lower rate the gap only shrinks.
        let x = Signal::new(gaussian_vec(9, 512 * 512), 512, 512);
        for bits in [2.0, 3.0, 4.0, 5.0] {
            let (y, h) = run(bits, &x);
            assert!((h - bits).abs() < 0.01, "entropy {h} for target {bits}");
            let s = sqnr_db(&x.data, &y).unwrap();
            let bound = 6.02 * h - 1.53 - 0.1;
            assert!(s > bound, "{bits} bits: {s:.2} dB ≤ {bound:.2}");
            assert!(
                s < 6.02 * h + 0.1,
                "{s:.2} dB beats the Shannon bound at {h} bits"
            );
        }
    }

    #[test]
    fn wide_codes_round_trip() {
        let mut v = gaussian_vec(4, 4096);
        v[7] = 500.0;
        let x = Signal::new(v, 4, 1024);
        let c = encode(
            &UniformSpec {
                bits: 6.0,
                deadzone: 0.0,
            },
            &x,
        )
        .unwrap();
        assert!(c.parts.iter().any(|p| p.name == "codes_hi"));
        let y = decode(&c.meta, &Parts::new(c.parts), 4, 1024).unwrap();
        assert!((y[7] - 500.0).abs() < 0.5);
    }

    #[test]
    fn corrupt_is_an_error() {
        let x = Signal::new(gaussian_vec(4, 256), 1, 256);
        let c = encode(
            &UniformSpec {
                bits: 3.0,
                deadzone: 0.0,
            },
            &x,
        )
        .unwrap();
        assert!(decode(&c.meta, &Parts::new(vec![]), 1, 256).is_err());
        assert!(decode(&serde_json::json!({}), &Parts::new(c.parts), 1, 256).is_err());
    }

    #[test]
    fn the_sample_walks_every_column() {
        // 1,024 rows of 1,536: the plain stride (6) would share factors with
        // the row length and see a sixth of the columns.
        let (rows, cols) = (1024, 1536);
        let x: Vec<f32> = (0..rows * cols).map(|i| (i % cols) as f32).collect();
        let s = sample(&x, cols);
        assert!(s.len() <= SAMPLE && s.len() > SAMPLE / 2, "{}", s.len());
        let mut seen = vec![false; cols];
        for v in s.iter() {
            seen[*v as usize] = true;
        }
        assert!(seen.iter().all(|s| *s), "some columns never sampled");
        let small = &x[..SAMPLE];
        assert!(matches!(sample(small, cols), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn a_large_tensor_meets_its_entropy_from_the_sample() {
        // 2^21 values whose columns have scales from 0.25 to 4: the step is
        // searched on an eighth of them, and the whole tensor's codes still
        // land within 0.01 bits of the target.
        let (rows, cols) = (1024, 2048);
        let mut x = gaussian_vec(3, rows * cols);
        for (i, v) in x.iter_mut().enumerate() {
            *v *= 0.25 + 3.75 * ((i % cols) as f32 / cols as f32);
        }
        let x = Signal::new(x, rows, cols);
        for bits in [2.5, 4.4] {
            let (y, h) = run(bits, &x);
            assert!((h - bits).abs() < 0.01, "entropy {h} for target {bits}");
            let m = encode(
                &UniformSpec {
                    bits,
                    deadzone: 0.0,
                },
                &x,
            )
            .unwrap();
            let meta: UniformMeta = parse_meta("uniform", &m.meta).unwrap();
            // The one pass gives the same codes, offsets and entropy as the
            // separate functions the calibrated quantizer uses.
            let inv = 1.0 / meta.step;
            let codes = codes_at(&x.data, inv, 0.0);
            assert_eq!(
                m.parts[0].data.as_slice(),
                codes
                    .iter()
                    .map(|q| *q as i8 as u8)
                    .collect::<Vec<_>>()
                    .as_slice()
            );
            assert_eq!(meta.entropy_bits.to_bits(), codes_entropy(&codes).to_bits());
            // Exact sums: the same offsets, bit for bit.
            assert_eq!(meta.offsets, offsets_for(&x.data, &codes, inv));
            assert!(sqnr_db(&x.data, &y).unwrap() > 6.02 * h - 1.53 - 0.1);
        }
    }

    proptest! {
        #[test]
        fn round_trip_error_at_most_a_step(seed in any::<u64>(), bits in 1.0f64..6.0, dz in 0.0f64..0.3) {
            let x = Signal::new(gaussian_vec(seed, 300), 3, 100);
            let c = encode(&UniformSpec { bits, deadzone: dz }, &x).unwrap();
            let m: UniformMeta = parse_meta("uniform", &c.meta).unwrap();
            let y = decode(&c.meta, &Parts::new(c.parts), 3, 100).unwrap();
            for (a, b) in x.data.iter().zip(&y) {
                prop_assert!((a - b).abs() <= m.step * (1.0 + dz as f32) + 1e-6);
            }
        }
    }
}
