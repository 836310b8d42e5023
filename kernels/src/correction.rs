//! Corrections of a decoded weight that block-wise distillation learns:
//! a gain per output row, a gain per input column and a low-rank term,
//! applied after the tensor's whole chain is decoded:
//!
//! W = diag(r)·Ŵ·diag(c) + A·B
//!
//! with Ŵ the chain's decoded `[rows, cols]` matrix, r (`rows` values),
//! c (`cols` values), A (`[rows, rank]`) and B (`[rank, cols]`), each
//! stored as an f16 part. The arithmetic is f32 in a fixed order (row gain,
//! then column gain, then the rank terms in order), so every machine
//! decodes the same bits.

use hcx_protocol::stage::CorrectionSpec;
use rayon::prelude::*;

use crate::part::round_f16;
use crate::{KernelError, Part, Parts};

/// A low-rank term A·B.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    /// Its rank.
    pub rank: usize,
    /// A, `[rows, rank]` row-major.
    pub a: Vec<f32>,
    /// B, `[rank, cols]` row-major.
    pub b: Vec<f32>,
}

/// The values of one tensor's correction.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Correction {
    /// A gain per output row.
    pub rows: Option<Vec<f32>>,
    /// A gain per input column.
    pub cols: Option<Vec<f32>>,
    /// An additive low-rank term.
    pub low_rank: Option<LowRank>,
}

fn bad(why: String) -> KernelError {
    KernelError::Meta {
        stage: "correction".into(),
        why,
    }
}

impl Correction {
    /// What the manifest records of it.
    pub fn spec(&self) -> CorrectionSpec {
        CorrectionSpec {
            rows: self.rows.is_some(),
            cols: self.cols.is_some(),
            rank: self.low_rank.as_ref().map_or(0, |l| l.rank),
        }
    }

    /// Checks every length against a `[rows, cols]` weight.
    pub fn check(&self, rows: usize, cols: usize) -> Result<(), KernelError> {
        let want = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(bad(format!(
                    "{what} has {got} values, a [{rows}, {cols}] weight needs {want}"
                )))
            }
        };
        if let Some(r) = &self.rows {
            want("the row gain", r.len(), rows)?;
        }
        if let Some(c) = &self.cols {
            want("the column gain", c.len(), cols)?;
        }
        if let Some(l) = &self.low_rank {
            want("A", l.a.len(), rows.saturating_mul(l.rank))?;
            want("B", l.b.len(), cols.saturating_mul(l.rank))?;
        }
        Ok(())
    }

    /// The values as the artifact stores them (rounded through f16).
    pub fn rounded(&self) -> Correction {
        let r = |v: &Vec<f32>| v.iter().map(|x| round_f16(*x)).collect::<Vec<_>>();
        Correction {
            rows: self.rows.as_ref().map(r),
            cols: self.cols.as_ref().map(r),
            low_rank: self.low_rank.as_ref().map(|l| LowRank {
                rank: l.rank,
                a: r(&l.a),
                b: r(&l.b),
            }),
        }
    }

    /// Applies the correction to a decoded `[rows, cols]` weight in place.
    pub fn apply(&self, w: &mut [f32], rows: usize, cols: usize) -> Result<(), KernelError> {
        self.check(rows, cols)?;
        if rows.checked_mul(cols) != Some(w.len()) {
            return Err(bad(format!(
                "{} values for a [{rows}, {cols}] weight",
                w.len()
            )));
        }
        if w.is_empty() {
            return Ok(());
        }
        w.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
            if let Some(g) = &self.rows {
                let g = g[r];
                row.iter_mut().for_each(|v| *v *= g);
            }
            if let Some(c) = &self.cols {
                row.iter_mut().zip(c).for_each(|(v, c)| *v *= c);
            }
            if let Some(l) = &self.low_rank {
                let a = &l.a[r * l.rank..(r + 1) * l.rank];
                let mut acc = vec![0f32; cols];
                for (k, ak) in a.iter().enumerate() {
                    let b = &l.b[k * cols..(k + 1) * cols];
                    acc.iter_mut().zip(b).for_each(|(s, b)| *s += ak * b);
                }
                row.iter_mut().zip(&acc).for_each(|(v, s)| *v += s);
            }
        });
        Ok(())
    }

    /// The parts to store (names local to the stage: `rows`, `cols`, `a`,
    /// `b`), values rounded to f16.
    pub fn to_parts(&self, rows: usize, cols: usize) -> Vec<Part> {
        let mut out = Vec::new();
        if let Some(r) = &self.rows {
            out.push(Part::f16("rows", r, vec![rows]));
        }
        if let Some(c) = &self.cols {
            out.push(Part::f16("cols", c, vec![cols]));
        }
        if let Some(l) = &self.low_rank {
            out.push(Part::f16("a", &l.a, vec![rows, l.rank]));
            out.push(Part::f16("b", &l.b, vec![l.rank, cols]));
        }
        out
    }

    /// Reads what [`Correction::to_parts`] stored for a `[rows, cols]`
    /// weight, as `spec` describes it.
    pub fn from_parts(
        spec: &CorrectionSpec,
        parts: &Parts,
        rows: usize,
        cols: usize,
    ) -> Result<Correction, KernelError> {
        if spec.rank > hcx_protocol::stage::MAX_CORRECTION_RANK {
            return Err(bad(format!("rank {} is too large", spec.rank)));
        }
        let n = |a: usize, b: usize| {
            a.checked_mul(b)
                .ok_or_else(|| bad(format!("{a} × {b} values overflow")))
        };
        Ok(Correction {
            rows: spec
                .rows
                .then(|| parts.f16_values("rows", rows))
                .transpose()?,
            cols: spec
                .cols
                .then(|| parts.f16_values("cols", cols))
                .transpose()?,
            low_rank: if spec.rank > 0 {
                Some(LowRank {
                    rank: spec.rank,
                    a: parts.f16_values("a", n(rows, spec.rank)?)?,
                    b: parts.f16_values("b", n(spec.rank, cols)?)?,
                })
            } else {
                None
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::gaussian_vec;
    use proptest::prelude::*;

    fn sample(rows: usize, cols: usize, rank: usize, seed: u64) -> Correction {
        let g = |n: usize, s: u64| -> Vec<f32> {
            gaussian_vec(s, n).iter().map(|v| 1.0 + 0.1 * v).collect()
        };
        Correction {
            rows: Some(g(rows, seed)),
            cols: Some(g(cols, seed + 1)),
            low_rank: (rank > 0).then(|| LowRank {
                rank,
                a: gaussian_vec(seed + 2, rows * rank),
                b: gaussian_vec(seed + 3, rank * cols),
            }),
        }
        .rounded()
    }

    #[test]
    fn applies_diag_w_diag_plus_a_b() {
        let (rows, cols, rank) = (3, 5, 2);
        let c = sample(rows, cols, rank, 1);
        let w = gaussian_vec(9, rows * cols);
        let mut got = w.clone();
        c.apply(&mut got, rows, cols).unwrap();
        let (r, k, l) = (
            c.rows.as_ref().unwrap(),
            c.cols.as_ref().unwrap(),
            c.low_rank.as_ref().unwrap(),
        );
        for i in 0..rows {
            for j in 0..cols {
                let ab: f64 = (0..rank)
                    .map(|q| l.a[i * rank + q] as f64 * l.b[q * cols + j] as f64)
                    .sum();
                let want = r[i] as f64 * w[i * cols + j] as f64 * k[j] as f64 + ab;
                assert!((got[i * cols + j] as f64 - want).abs() < 1e-5, "{i},{j}");
            }
        }
    }

    #[test]
    fn wrong_lengths_are_errors_not_panics() {
        let c = sample(3, 5, 1, 2);
        let mut w = vec![0.0; 15];
        let e = c.apply(&mut w, 5, 3).unwrap_err().to_string();
        assert!(e.contains("the row gain has 3 values"), "{e}");
        let mut short = vec![0.0; 14];
        assert!(c.apply(&mut short, 3, 5).is_err());
        let parts = Parts::new(c.to_parts(3, 5));
        let spec = c.spec();
        assert!(Correction::from_parts(&spec, &parts, 3, 6).is_err());
        let huge = CorrectionSpec {
            rows: false,
            cols: false,
            rank: 1 << 20,
        };
        assert!(Correction::from_parts(&huge, &parts, 3, 5).is_err());
    }

    proptest! {
        #[test]
        fn parts_round_trip(rows in 1usize..12, cols in 1usize..12, rank in 0usize..4,
                            with_rows: bool, with_cols: bool, seed in 0u64..1000) {
            let mut c = sample(rows, cols, rank, seed);
            if !with_rows { c.rows = None; }
            if !with_cols { c.cols = None; }
            let parts = Parts::new(c.to_parts(rows, cols));
            let back = Correction::from_parts(&c.spec(), &parts, rows, cols).unwrap();
            prop_assert_eq!(&back, &c);
            // Same values, same bits, whatever the thread count.
            let w = gaussian_vec(seed + 7, rows * cols);
            let (mut x, mut y) = (w.clone(), w);
            c.apply(&mut x, rows, cols).unwrap();
            back.apply(&mut y, rows, cols).unwrap();
            prop_assert_eq!(x, y);
        }
    }
}
