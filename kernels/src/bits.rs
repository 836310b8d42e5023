//! Tight bit packing of small codes.
//!
//! Codes of `bits` bits (1..=8) are written least-significant bit first into
//! a continuous bit stream; the last byte is zero-padded. Ternary digits are
//! packed five to a byte (3^5 = 243 ≤ 256), 1.6 bits each.

/// Bytes needed for `n` codes of `bits` bits.
pub fn packed_len(n: usize, bits: u8) -> usize {
    (n * bits as usize).div_ceil(8)
}

/// Packs codes of `bits` bits; each code must be below 2^bits.
pub fn pack(codes: &[u8], bits: u8) -> Vec<u8> {
    assert!((1..=8).contains(&bits), "bit width {bits} out of 1..=8");
    let mut out = vec![0u8; packed_len(codes.len(), bits)];
    match bits {
        8 => out.copy_from_slice(codes),
        4 => {
            for (o, pair) in out.iter_mut().zip(codes.chunks(2)) {
                *o = pair[0] | (pair.get(1).copied().unwrap_or(0) << 4);
            }
        }
        2 => {
            for (o, quad) in out.iter_mut().zip(codes.chunks(4)) {
                let mut b = 0u8;
                for (i, c) in quad.iter().enumerate() {
                    b |= c << (2 * i);
                }
                *o = b;
            }
        }
        _ => {
            // 8 codes of `bits` bits make exactly `bits` bytes.
            let b = bits as usize;
            for (o, group) in out.chunks_mut(b).zip(codes.chunks(8)) {
                let mut acc: u64 = 0;
                for (i, c) in group.iter().enumerate() {
                    acc |= (*c as u64) << (i * b);
                }
                let bytes = acc.to_le_bytes();
                o.copy_from_slice(&bytes[..o.len()]);
            }
        }
    }
    out
}

/// Unpacks `n` codes of `bits` bits; `None` when `packed` is too short.
pub fn unpack(packed: &[u8], bits: u8, n: usize) -> Option<Vec<u8>> {
    if !(1..=8).contains(&bits) || packed.len() < packed_len(n, bits) {
        return None;
    }
    let mut out = vec![0u8; n];
    match bits {
        8 => out.copy_from_slice(&packed[..n]),
        4 => {
            for (pair, b) in out.chunks_mut(2).zip(packed) {
                pair[0] = b & 15;
                if pair.len() > 1 {
                    pair[1] = b >> 4;
                }
            }
        }
        2 => {
            for (quad, b) in out.chunks_mut(4).zip(packed) {
                for (i, c) in quad.iter_mut().enumerate() {
                    *c = (b >> (2 * i)) & 3;
                }
            }
        }
        _ => {
            let b = bits as usize;
            let mask = (1u64 << b) - 1;
            for (group, src) in out.chunks_mut(8).zip(packed.chunks(b)) {
                let mut bytes = [0u8; 8];
                bytes[..src.len()].copy_from_slice(src);
                let acc = u64::from_le_bytes(bytes);
                for (i, c) in group.iter_mut().enumerate() {
                    *c = ((acc >> (i * b)) & mask) as u8;
                }
            }
        }
    }
    Some(out)
}

/// Bytes needed for `n` trits.
pub fn trit_packed_len(n: usize) -> usize {
    n.div_ceil(5)
}

/// Packs trits (values 0, 1, 2) five per byte, base 3, first trit least significant.
pub fn pack_trits(trits: &[u8]) -> Vec<u8> {
    trits
        .chunks(5)
        .map(|c| c.iter().rev().fold(0u8, |acc, t| acc * 3 + t))
        .collect()
}

/// Unpacks `n` trits; `None` when a byte is above 242 or `packed` is short.
pub fn unpack_trits(packed: &[u8], n: usize) -> Option<Vec<u8>> {
    if packed.len() < trit_packed_len(n) {
        return None;
    }
    let mut out = vec![0u8; n];
    for (chunk, &b) in out.chunks_mut(5).zip(packed) {
        if b > 242 {
            return None;
        }
        let mut v = b;
        for t in chunk.iter_mut() {
            *t = v % 3;
            v /= 3;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pack_round_trips(bits in 1u8..=8, raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let codes: Vec<u8> = raw.iter().map(|c| if bits == 8 { *c } else { c & ((1u8 << bits) - 1) }).collect();
            let packed = pack(&codes, bits);
            prop_assert_eq!(packed.len(), packed_len(codes.len(), bits));
            prop_assert_eq!(unpack(&packed, bits, codes.len()).unwrap(), codes);
        }

        #[test]
        fn trits_round_trip(raw in proptest::collection::vec(0u8..3, 0..300)) {
            let packed = pack_trits(&raw);
            prop_assert_eq!(packed.len(), trit_packed_len(raw.len()));
            prop_assert_eq!(unpack_trits(&packed, raw.len()).unwrap(), raw);
        }

        #[test]
        fn unpack_never_panics(bits in 0u8..=9, data in proptest::collection::vec(any::<u8>(), 0..40), n in 0usize..100) {
            let _ = unpack(&data, bits, n);
            let _ = unpack_trits(&data, n);
        }
    }

    #[test]
    fn short_input_is_refused() {
        assert!(unpack(&[0], 4, 3).is_none());
        assert!(unpack_trits(&[243], 5).is_none());
    }
}
