//! Exact 128-bit sums through a backend that only adds 64-bit integers
//! (NCCL has no 128-bit type): each value is cut into four 32-bit limbs held
//! in i64, the limbs are summed position by position, and the sums are put
//! back together with wrapping 128-bit arithmetic.
//!
//! A limb sum over n ranks stays below n·2^32 in magnitude, exact in i64 for
//! any n below 2^31; reassembling modulo 2^128 then gives the wrapping sum of
//! the original values, the same bits as adding them as i128 directly.

/// Limbs per i128.
pub const LIMBS: usize = 4;

/// Cuts every value into [`LIMBS`] limbs, least significant first: three
/// unsigned 32-bit pieces and a signed top piece.
pub fn split(values: &[i128]) -> Vec<i64> {
    let mut out = Vec::with_capacity(values.len() * LIMBS);
    for &v in values {
        let u = v as u128;
        out.push((u & 0xffff_ffff) as i64);
        out.push(((u >> 32) & 0xffff_ffff) as i64);
        out.push(((u >> 64) & 0xffff_ffff) as i64);
        out.push((v >> 96) as i64);
    }
    out
}

/// Puts summed limbs back together into `values` (wrapping, as the sum of
/// i128 values wraps).
pub fn join(limbs: &[i64], values: &mut [i128]) {
    for (v, l) in values.iter_mut().zip(limbs.chunks_exact(LIMBS)) {
        *v = (l[0] as i128)
            .wrapping_add((l[1] as i128) << 32)
            .wrapping_add((l[2] as i128) << 64)
            .wrapping_add((l[3] as i128).wrapping_shl(96));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sum_by_limbs(inputs: &[Vec<i128>]) -> Vec<i128> {
        let n = inputs.first().map_or(0, Vec::len);
        let mut acc = vec![0i64; n * LIMBS];
        for x in inputs {
            for (a, l) in acc.iter_mut().zip(split(x)) {
                *a += l;
            }
        }
        let mut out = vec![0i128; n];
        join(&acc, &mut out);
        out
    }

    #[test]
    fn extremes_survive() {
        let edge = vec![i128::MIN, i128::MAX, -1, 0, 1, 1 << 96, -(1 << 96)];
        assert_eq!(sum_by_limbs(std::slice::from_ref(&edge)), edge);
        let twice: Vec<i128> = edge.iter().map(|v| v.wrapping_add(*v)).collect();
        assert_eq!(sum_by_limbs(&[edge.clone(), edge]), twice);
    }

    proptest! {
        #[test]
        fn limb_sums_are_the_wrapping_i128_sums(
            inputs in (1usize..6, 0usize..20).prop_flat_map(|(ranks, n)| {
                proptest::collection::vec(proptest::collection::vec(any::<i128>(), n), ranks)
            })
        ) {
            let n = inputs[0].len();
            let want: Vec<i128> = (0..n)
                .map(|i| inputs.iter().fold(0i128, |s, x| s.wrapping_add(x[i])))
                .collect();
            prop_assert_eq!(sum_by_limbs(&inputs), want);
        }
    }
}
