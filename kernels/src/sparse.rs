//! Magnitude pruning: a mask is stored, the kept values go on down the chain.
//!
//! Unstructured: every row keeps its k = round(density·cols) (at least 1,
//! at most cols) largest-magnitude weights, ties going to the lower index.
//! The mask (part `mask`) is one bit per weight, row-major, packed with
//! [`bits::pack`] at 1 bit; the rest is a rows × k matrix of the kept values
//! in row order.
//!
//! 2:4: every group of four consecutive weights in a row keeps its two
//! largest magnitudes (ties to the lower index); `cols` must be a multiple
//! of 4. The kept pair of each group is stored as its index 0..6 among the
//! six pairs in lexicographic order ((0,1), (0,2), (0,3), (1,2), (1,3),
//! (2,3)), packed 3 bits per group (part `mask`); the rest is rows × cols/2,
//! the two kept values of each group, lower index first. `density` is not
//! read for 2:4 (it is always 0.5).
//!
//! The dropped energy is the sum of squares of the pruned weights,
//! accumulated in f64 in row-major order. The decoder scatters the rest
//! into zeros; it needs the rest (a sparse stage never drops it).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::part::{parse_meta, to_meta};
use crate::{KernelError, Part, Parts, Signal, Split, bits};
use hcx_protocol::stage::{SparsePattern, SparseSpec};

const STAGE: &str = "sparse";

/// What the decoder needs besides the parts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SparseMeta {
    /// Unstructured or 2:4.
    pattern: SparsePattern,
    /// Values kept in each row (k, or cols/2 for 2:4).
    kept_per_row: usize,
}

/// First pair code of each lower index: pair (p, q), p < q, has code
/// `PAIR_BASE[p] + q − p − 1`.
const PAIR_BASE: [u8; 3] = [0, 3, 5];
/// The pairs of a group of four, by code.
const PAIRS: [(usize, usize); 6] = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)];

/// Splits off this stage's parts; the rest of the signal goes on down the chain.
pub fn encode(spec: &SparseSpec, x: &Signal, _seed: u64) -> Result<Split, KernelError> {
    let (rows, cols) = (x.rows, x.cols);
    if cols == 0 || rows.checked_mul(cols) != Some(x.data.len()) {
        return Err(KernelError::shape(
            rows,
            cols,
            format!("{} values do not fill the matrix", x.data.len()),
        ));
    }
    if let Some(i) = x.data.iter().position(|v| !v.is_finite()) {
        return Err(KernelError::Values(format!(
            "value {} at flat index {i} is not finite",
            x.data[i]
        )));
    }
    match spec.pattern {
        SparsePattern::Unstructured => encode_unstructured(spec.density, x),
        SparsePattern::TwoFour => encode_two_four(x),
    }
}

/// Values an unstructured mask keeps in each row of `cols`.
fn kept_per_row(density: f64, cols: usize) -> usize {
    ((density * cols as f64).round() as usize).clamp(1, cols)
}

/// The width of the rest a sparse stage passes on for rows of `cols`
/// values: the values kept in each row.
pub(crate) fn rest_cols(spec: &SparseSpec, cols: usize) -> usize {
    match spec.pattern {
        SparsePattern::Unstructured => kept_per_row(spec.density, cols),
        SparsePattern::TwoFour => cols / 2,
    }
}

fn encode_unstructured(density: f64, x: &Signal) -> Result<Split, KernelError> {
    let (rows, cols) = (x.rows, x.cols);
    if !(density > 0.0 && density <= 1.0) {
        return Err(KernelError::Meta {
            stage: STAGE.to_string(),
            why: format!("density {density} is not in (0, 1]"),
        });
    }
    let k = kept_per_row(density, cols);
    let mut codes = vec![0u8; rows * cols];
    let mut kept = vec![0f32; rows * k];
    codes
        .par_chunks_mut(cols)
        .zip(kept.par_chunks_mut(k))
        .zip(x.data.par_chunks(cols))
        .for_each(|((c, out), w)| {
            let mut idx: Vec<usize> = (0..cols).collect();
            if k < cols {
                // A total order (magnitude down, then index up): the first k
                // are the same set whatever the algorithm.
                idx.select_nth_unstable_by(k - 1, |&a, &b| {
                    w[b].abs().total_cmp(&w[a].abs()).then(a.cmp(&b))
                });
            }
            for &i in &idx[..k] {
                c[i] = 1;
            }
            let picked = c.iter().zip(w).filter(|(c, _)| **c == 1).map(|(_, v)| *v);
            for (o, v) in out.iter_mut().zip(picked) {
                *o = v;
            }
        });
    let dropped_energy = pruned_energy(&x.data, |i| codes[i] == 0);
    let meta = to_meta(&SparseMeta {
        pattern: SparsePattern::Unstructured,
        kept_per_row: k,
    });
    Ok(Split {
        meta,
        parts: vec![Part::bytes("mask", bits::pack(&codes, 1))],
        rest: Some(Signal::new(kept, rows, k)),
        dropped_energy,
    })
}

/// The pair code of the two largest magnitudes of a group of four (ties to
/// the lower index).
fn top_two(g: &[f32]) -> u8 {
    let mut a = 0;
    for i in 1..4 {
        if g[i].abs() > g[a].abs() {
            a = i;
        }
    }
    let mut b = if a == 0 { 1 } else { 0 };
    for i in b + 1..4 {
        if i != a && g[i].abs() > g[b].abs() {
            b = i;
        }
    }
    let (p, q) = (a.min(b), a.max(b));
    PAIR_BASE[p] + (q - p - 1) as u8
}

fn encode_two_four(x: &Signal) -> Result<Split, KernelError> {
    let (rows, cols) = (x.rows, x.cols);
    if !cols.is_multiple_of(4) {
        return Err(KernelError::shape(
            rows,
            cols,
            format!("2:4 sparsity needs a row length divisible by 4, not {cols}"),
        ));
    }
    let groups = rows * cols / 4;
    let mut codes = vec![0u8; groups];
    let mut kept = vec![0f32; groups * 2];
    codes
        .par_iter_mut()
        .zip(kept.par_chunks_mut(2))
        .zip(x.data.par_chunks(4))
        .for_each(|((c, out), g)| {
            *c = top_two(g);
            let (p, q) = PAIRS[*c as usize];
            out[0] = g[p];
            out[1] = g[q];
        });
    let dropped_energy = pruned_energy(&x.data, |i| {
        let (p, q) = PAIRS[codes[i / 4] as usize];
        i % 4 != p && i % 4 != q
    });
    let meta = to_meta(&SparseMeta {
        pattern: SparsePattern::TwoFour,
        kept_per_row: cols / 2,
    });
    Ok(Split {
        meta,
        parts: vec![Part::bytes("mask", bits::pack(&codes, 3))],
        rest: Some(Signal::new(kept, rows, cols / 2)),
        dropped_energy,
    })
}

/// Sum of squares of the values at the indices `pruned` says yes to, in
/// index order (so it equals `stats::squared_error` against the decoded
/// tensor exactly).
fn pruned_energy(x: &[f32], pruned: impl Fn(usize) -> bool) -> f64 {
    let mut e = 0f64;
    for (i, v) in x.iter().enumerate() {
        if pruned(i) {
            e += (*v as f64) * (*v as f64);
        }
    }
    e
}

/// Rebuilds rows*cols values from this stage's parts and the decoded rest of the chain (`rest` is None when the stage dropped it).
pub fn decode(
    meta: &serde_json::Value,
    parts: &Parts,
    rest: Option<Vec<f32>>,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, KernelError> {
    let m: SparseMeta = parse_meta(STAGE, meta)?;
    let bad = |why: String| KernelError::Meta {
        stage: STAGE.to_string(),
        why,
    };
    let k = m.kept_per_row;
    let n = rows
        .checked_mul(cols)
        .ok_or_else(|| bad(format!("shape [{rows}, {cols}] overflows")))?;
    let rest =
        rest.ok_or_else(|| bad("the kept values (the rest of the chain) are missing".to_string()))?;
    match m.pattern {
        SparsePattern::Unstructured => {
            if k == 0 || k > cols {
                return Err(bad(format!("{k} kept per row is not in 1..={cols}")));
            }
        }
        SparsePattern::TwoFour => {
            if !cols.is_multiple_of(4) || k != cols / 2 {
                return Err(bad(format!(
                    "2:4 needs a row length divisible by 4 and cols/2 kept per row, found {cols} and {k}"
                )));
            }
        }
    }
    // k ≤ cols, so rows·k ≤ rows·cols does not overflow.
    if rest.len() != rows * k {
        return Err(bad(format!(
            "the rest has {} values, expected {rows} × {k}",
            rest.len()
        )));
    }
    let mut out = vec![0f32; n];
    if n == 0 {
        parts.byte_values("mask", 0)?;
        return Ok(out);
    }
    match m.pattern {
        SparsePattern::Unstructured => {
            let packed = parts.byte_values("mask", bits::packed_len(n, 1))?;
            let codes = bits::unpack(packed, 1, n)
                .ok_or_else(|| KernelError::corrupt("mask", "too short"))?;
            out.par_chunks_mut(cols)
                .zip(codes.par_chunks(cols))
                .zip(rest.par_chunks(k))
                .enumerate()
                .try_for_each(|(row, ((o, c), kept))| {
                    let ones = c.iter().filter(|b| **b == 1).count();
                    if ones != k {
                        return Err(KernelError::corrupt(
                            "mask",
                            format!("row {row} keeps {ones} values, expected {k}"),
                        ));
                    }
                    let slots = o
                        .iter_mut()
                        .zip(c)
                        .filter(|(_, b)| **b == 1)
                        .map(|(o, _)| o);
                    for (o, v) in slots.zip(kept) {
                        *o = *v;
                    }
                    Ok(())
                })?;
        }
        SparsePattern::TwoFour => {
            let groups = n / 4;
            let packed = parts.byte_values("mask", bits::packed_len(groups, 3))?;
            let codes = bits::unpack(packed, 3, groups)
                .ok_or_else(|| KernelError::corrupt("mask", "too short"))?;
            if let Some(g) = codes.iter().position(|c| *c as usize >= PAIRS.len()) {
                return Err(KernelError::corrupt(
                    "mask",
                    format!("group {g} has pair code {}, not in 0..6", codes[g]),
                ));
            }
            out.par_chunks_mut(4)
                .zip(codes.par_iter())
                .zip(rest.par_chunks(2))
                .for_each(|((o, c), kept)| {
                    let (p, q) = PAIRS[*c as usize];
                    o[p] = kept[0];
                    o[q] = kept[1];
                });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::gaussian_vec;
    use crate::stats;
    use proptest::prelude::*;

    fn unstructured(density: f64) -> SparseSpec {
        SparseSpec {
            pattern: SparsePattern::Unstructured,
            density,
        }
    }

    fn two_four() -> SparseSpec {
        SparseSpec {
            pattern: SparsePattern::TwoFour,
            density: 0.5,
        }
    }

    fn run(spec: &SparseSpec, x: &Signal) -> (Split, Vec<f32>) {
        let s = encode(spec, x, 0).unwrap();
        let rest = s.rest.as_ref().unwrap().data.clone();
        let y = decode(
            &s.meta,
            &Parts::new(s.parts.clone()),
            Some(rest),
            x.rows,
            x.cols,
        )
        .unwrap();
        (s, y)
    }

    #[test]
    fn keeps_round_density_cols_per_row() {
        let (rows, cols) = (7, 50);
        let x = Signal::new(gaussian_vec(1, rows * cols), rows, cols);
        for (d, k) in [
            (0.1, 5),
            (0.25, 13),
            (0.5, 25),
            (0.001, 1),
            (0.99, 50),
            (1.0, 50),
        ] {
            let (s, y) = run(&unstructured(d), &x);
            assert_eq!(s.meta["kept_per_row"], k, "density {d}");
            let rest = s.rest.as_ref().unwrap();
            assert_eq!((rest.rows, rest.cols), (rows, k));
            for (row, yr) in y.chunks(cols).enumerate() {
                let xr = &x.data[row * cols..(row + 1) * cols];
                let kept: Vec<f32> = xr
                    .iter()
                    .zip(yr)
                    .filter(|(a, b)| a == b)
                    .map(|(a, _)| *a)
                    .collect();
                assert_eq!(kept.len(), k);
                assert_eq!(kept, rest.data[row * k..(row + 1) * k]);
                // Every kept magnitude is at least every pruned one.
                let min_kept = kept.iter().map(|v| v.abs()).fold(f32::INFINITY, f32::min);
                let max_pruned = xr
                    .iter()
                    .zip(yr)
                    .filter(|(a, b)| a != b)
                    .map(|(a, _)| a.abs())
                    .fold(0.0, f32::max);
                assert!(min_kept >= max_pruned);
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let x = Signal::new(vec![1.0, -2.0, 2.0, 2.0, -1.0, 0.0], 1, 6);
        let (s, y) = run(&unstructured(0.34), &x); // k = 2
        assert_eq!(y, vec![0.0, -2.0, 2.0, 0.0, 0.0, 0.0]);
        assert_eq!(s.rest.unwrap().data, vec![-2.0, 2.0]);
        let x = Signal::new(vec![3.0, -3.0, 3.0, 3.0, 0.0, 1.0, 1.0, 0.0], 1, 8);
        let (s, y) = run(&two_four(), &x);
        assert_eq!(y, vec![3.0, -3.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]);
        assert_eq!(s.rest.unwrap().data, vec![3.0, -3.0, 1.0, 1.0]);
    }

    #[test]
    fn two_four_keeps_the_two_largest_of_each_group() {
        let (rows, cols) = (9, 32);
        let x = Signal::new(gaussian_vec(2, rows * cols), rows, cols);
        let (s, y) = run(&two_four(), &x);
        assert_eq!(s.meta["kept_per_row"], cols / 2);
        assert_eq!(s.parts[0].data.len(), (rows * cols / 4 * 3).div_ceil(8));
        for (xg, yg) in x.data.chunks(4).zip(y.chunks(4)) {
            let kept: Vec<usize> = (0..4)
                .filter(|i| yg[*i] == xg[*i] && yg[*i] != 0.0)
                .collect();
            assert_eq!(kept.len(), 2, "{xg:?} -> {yg:?}");
            for i in 0..4 {
                if !kept.contains(&i) {
                    assert_eq!(yg[i], 0.0);
                    assert!(kept.iter().all(|k| xg[*k].abs() >= xg[i].abs()));
                }
            }
        }
        let mut bad = x.clone();
        bad.cols = 6;
        bad.rows = bad.data.len() / 6;
        bad.data.truncate(bad.rows * 6);
        assert!(matches!(
            encode(&two_four(), &bad, 0),
            Err(KernelError::Shape { .. })
        ));
    }

    #[test]
    fn dropped_energy_is_exact() {
        let (rows, cols) = (13, 40);
        let x = Signal::new(gaussian_vec(3, rows * cols), rows, cols);
        for spec in [unstructured(0.3), two_four()] {
            let (s, y) = run(&spec, &x);
            assert_eq!(s.dropped_energy, stats::squared_error(&x.data, &y));
            assert!(s.dropped_energy > 0.0);
        }
    }

    #[test]
    fn decode_scatters_into_zeros() {
        // Row 0 keeps columns 1 and 3, row 1 keeps 0 and 2.
        let codes = [0u8, 1, 0, 1, 1, 0, 1, 0];
        let parts = Parts::new(vec![Part::bytes("mask", bits::pack(&codes, 1))]);
        let meta = serde_json::json!({"pattern": "unstructured", "kept_per_row": 2});
        let y = decode(&meta, &parts, Some(vec![1.0, 2.0, 3.0, 4.0]), 2, 4).unwrap();
        assert_eq!(y, vec![0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0]);
        // Pairs (0,1) = 0 and (2,3) = 5, then (1,3) = 4.
        let parts = Parts::new(vec![Part::bytes("mask", bits::pack(&[0, 5, 4], 3))]);
        let meta = serde_json::json!({"pattern": "2:4", "kept_per_row": 4});
        let y = decode(
            &meta,
            &parts,
            Some(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            1,
            12,
        )
        .unwrap_err();
        assert!(matches!(y, KernelError::Meta { .. }));
        let meta = serde_json::json!({"pattern": "2:4", "kept_per_row": 6});
        let y = decode(
            &meta,
            &parts,
            Some(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            1,
            12,
        )
        .unwrap();
        assert_eq!(
            y,
            vec![1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0, 0.0, 5.0, 0.0, 6.0]
        );
    }

    #[test]
    fn bad_input_is_refused() {
        let x = Signal::new(vec![1.0, f32::INFINITY, 0.0, 0.0], 1, 4);
        assert!(matches!(
            encode(&two_four(), &x, 0),
            Err(KernelError::Values(_))
        ));
        let x = Signal::new(vec![1.0, 2.0, 0.0, 0.0], 1, 4);
        assert!(encode(&unstructured(0.0), &x, 0).is_err());
        assert!(encode(&unstructured(f64::NAN), &x, 0).is_err());
        assert!(encode(&unstructured(1.5), &x, 0).is_err());
    }

    #[test]
    fn corrupt_parts_are_refused() {
        let (rows, cols) = (5, 16);
        let x = Signal::new(gaussian_vec(4, rows * cols), rows, cols);
        for spec in [unstructured(0.25), two_four()] {
            let s = encode(&spec, &x, 0).unwrap();
            let rest = s.rest.clone().unwrap().data;
            let good = Parts::new(s.parts.clone());
            assert!(decode(&s.meta, &good, Some(rest.clone()), rows, cols).is_ok());
            // No rest, short rest, wrong shape.
            assert!(matches!(
                decode(&s.meta, &good, None, rows, cols),
                Err(KernelError::Meta { .. })
            ));
            assert!(decode(&s.meta, &good, Some(rest[1..].to_vec()), rows, cols).is_err());
            assert!(decode(&s.meta, &good, Some(rest.clone()), rows + 1, cols).is_err());
            assert!(decode(&s.meta, &good, Some(rest.clone()), usize::MAX, usize::MAX).is_err());
            // Short or missing mask.
            let mut mask = good.get("mask").unwrap().clone();
            mask.data.pop();
            let short = Parts::new(vec![mask.clone()]);
            assert!(matches!(
                decode(&s.meta, &short, Some(rest.clone()), rows, cols),
                Err(KernelError::Corrupt { .. })
            ));
            assert!(matches!(
                decode(&s.meta, &Parts::default(), Some(rest.clone()), rows, cols),
                Err(KernelError::MissingPart(_))
            ));
            // Every bit set: wrong count per row, or pair code 7.
            mask.data = vec![0xff; good.get("mask").unwrap().len()];
            let ones = Parts::new(vec![mask]);
            assert!(matches!(
                decode(&s.meta, &ones, Some(rest.clone()), rows, cols),
                Err(KernelError::Corrupt { .. })
            ));
        }
        for m in [
            serde_json::json!({"pattern": "unstructured", "kept_per_row": 0}),
            serde_json::json!({"pattern": "unstructured", "kept_per_row": 17}),
            serde_json::json!({"pattern": "3:4", "kept_per_row": 2}),
            serde_json::json!({"pattern": "unstructured"}),
            serde_json::json!(null),
        ] {
            let parts = Parts::new(vec![Part::bytes("mask", vec![0; 10])]);
            assert!(
                matches!(
                    decode(&m, &parts, Some(vec![0.0; 20]), rows, cols),
                    Err(KernelError::Meta { .. })
                ),
                "{m}"
            );
        }
    }

    fn matrix() -> impl Strategy<Value = Signal> {
        (1usize..8, 1usize..24).prop_flat_map(|(rows, cols)| {
            proptest::collection::vec(prop_oneof![-4i8..4i8, -100i8..100i8], rows * cols).prop_map(
                move |v| Signal::new(v.iter().map(|c| *c as f32 * 0.25).collect(), rows, cols),
            )
        })
    }

    fn check_round_trip(x: &Signal, s: &Split, y: &[f32]) {
        let rest = &s.rest.as_ref().unwrap().data;
        // Decoded = x with the pruned entries zeroed; the rest is the kept
        // values in order, and the pruned energy is what went missing.
        let mut kept = Vec::new();
        for (a, b) in x.data.iter().zip(y) {
            assert!(*b == *a || *b == 0.0);
            if *b != 0.0 || *a == 0.0 {
                kept.push(*a);
            }
        }
        let nonzero: Vec<f32> = rest.iter().copied().filter(|v| *v != 0.0).collect();
        assert_eq!(
            nonzero,
            kept.iter()
                .copied()
                .filter(|v| *v != 0.0)
                .collect::<Vec<_>>()
        );
        assert_eq!(s.dropped_energy, stats::squared_error(&x.data, y));
    }

    proptest! {
        #[test]
        fn unstructured_round_trips(x in matrix(), density in 0.01f64..1.0) {
            let (s, y) = run(&unstructured(density), &x);
            let k = s.meta["kept_per_row"].as_u64().unwrap() as usize;
            prop_assert_eq!(k, ((density * x.cols as f64).round() as usize).clamp(1, x.cols));
            check_round_trip(&x, &s, &y);
            // Scattering the rest back with the mask gives exactly x with the pruned entries zeroed.
            let codes = bits::unpack(&s.parts[0].data, 1, x.len()).unwrap();
            let expect: Vec<f32> = x.data.iter().zip(&codes).map(|(v, c)| if *c == 1 { *v } else { 0.0 }).collect();
            prop_assert_eq!(y, expect);
        }

        #[test]
        fn two_four_round_trips(x in matrix()) {
            let cols = x.cols.div_ceil(4) * 4;
            let mut data = vec![0f32; x.rows * cols];
            for (r, row) in x.data.chunks(x.cols).enumerate() {
                data[r * cols..r * cols + x.cols].copy_from_slice(row);
            }
            let x = Signal::new(data, x.rows, cols);
            let (s, y) = run(&two_four(), &x);
            check_round_trip(&x, &s, &y);
            let codes = bits::unpack(&s.parts[0].data, 3, x.len() / 4).unwrap();
            let mut expect = vec![0f32; x.len()];
            for (g, c) in codes.iter().enumerate() {
                let (p, q) = PAIRS[*c as usize];
                expect[4 * g + p] = x.data[4 * g + p];
                expect[4 * g + q] = x.data[4 * g + q];
            }
            prop_assert_eq!(y, expect);
        }

        #[test]
        fn decode_never_panics(two in any::<bool>(), k in 0usize..30, mask in proptest::collection::vec(any::<u8>(), 0..40),
                               rows in 0usize..9, cols in 0usize..20,
                               rest in proptest::option::of(proptest::collection::vec(-1f32..1.0, 0..60))) {
            let meta = serde_json::json!({"pattern": if two { "2:4" } else { "unstructured" }, "kept_per_row": k});
            let parts = Parts::new(vec![Part::bytes("mask", mask)]);
            let _ = decode(&meta, &parts, rest, rows, cols);
        }
    }
}
