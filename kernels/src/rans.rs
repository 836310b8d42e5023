//! A byte-alphabet range asymmetric numeral system (rANS) coder with a
//! static order-0 frequency table per stream: within a few thousandths of a
//! bit of the bytes' empirical entropy, and fast (four interleaved 32-bit
//! states, byte-wise renormalisation, division-free encoding through
//! per-symbol reciprocals, table-driven decoding).
//!
//! A stream is `[table][state 0][state 1][state 2][state 3][payload]`:
//! the table is the number of distinct symbols less one (a byte) and each
//! symbol with its frequency (a byte, then a LEB128 varint); the
//! frequencies sum to 2^[`PROB_BITS`]. Symbol i goes through state i mod 4.
//! The encoder runs backwards, so the decoder reads forwards. Decoding
//! checks every read against the stream's end and, at the end, that every
//! state is back at its initial value and every byte was consumed, so a
//! corrupted stream is an error rather than wrong bytes (almost always; the
//! artifact's SHA-256 per file is the guarantee).

/// Frequencies are quantised to sum to 2^PROB_BITS.
pub const PROB_BITS: u32 = 15;
const M: u32 = 1 << PROB_BITS;
const MASK: u32 = M - 1;
/// The lower bound of a normalised state.
const L: u32 = 1 << 23;
/// Interleaved states.
const LANES: usize = 4;

/// Why a stream does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rANS stream: {0}")]
pub struct RansError(pub String);

fn bad(why: impl Into<String>) -> RansError {
    RansError(why.into())
}

/// Counts of each byte value.
pub fn histogram(data: &[u8]) -> [u64; 256] {
    // Four tables break the store-to-load chain on runs of one value.
    let mut h = [[0u64; 256]; 4];
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        h[0][c[0] as usize] += 1;
        h[1][c[1] as usize] += 1;
        h[2][c[2] as usize] += 1;
        h[3][c[3] as usize] += 1;
    }
    for &b in chunks.remainder() {
        h[0][b as usize] += 1;
    }
    let mut out = [0u64; 256];
    for (i, o) in out.iter_mut().enumerate() {
        *o = h[0][i] + h[1][i] + h[2][i] + h[3][i];
    }
    out
}

/// Empirical (order-0) entropy of `counts`, bits per symbol.
pub fn entropy_bits(counts: &[u64; 256]) -> f64 {
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return 0.0;
    }
    let n = n as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// Frequencies summing to [`M`], every symbol present getting at least 1:
/// each count scaled and rounded, then the rounding error taken from (or
/// given to) the symbols where it costs the fewest bits, in a fixed order.
pub fn normalise(counts: &[u64; 256]) -> [u32; 256] {
    let n: u64 = counts.iter().sum();
    let mut f = [0u32; 256];
    if n == 0 {
        return f;
    }
    let mut total: i64 = 0;
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 {
            let scaled = (c as u128 * M as u128 + n as u128 / 2) / n as u128;
            f[i] = (scaled as u32).clamp(1, M);
            total += i64::from(f[i]);
        }
    }
    // Settle the difference one unit at a time on the symbol whose code
    // length changes least for it: the largest frequencies (ties to the
    // lower symbol, so the table depends on the counts alone).
    let mut diff = i64::from(M) - total;
    while diff != 0 {
        let step: i64 = if diff > 0 { 1 } else { -1 };
        let mut best: Option<usize> = None;
        for i in 0..256 {
            if counts[i] == 0 || (step < 0 && f[i] <= 1) {
                continue;
            }
            // A unit more or less changes the payload by about count / f
            // bits: give it where that saves most, take it where it costs
            // least.
            let better = match best {
                None => true,
                Some(b) => {
                    let (here, there) = (
                        u128::from(counts[i]) * u128::from(f[b]),
                        u128::from(counts[b]) * u128::from(f[i]),
                    );
                    if step > 0 { here > there } else { here < there }
                }
            };
            if better {
                best = Some(i);
            }
        }
        // Some symbol can always give a unit: the frequencies exceed M
        // only through rounding up, which leaves one above 1.
        let Some(b) = best else {
            break;
        };
        // Move as many units at once as keeps the choice sound.
        let room = if step > 0 {
            diff
        } else {
            (-diff).min(i64::from(f[b]) - 1).max(1)
        };
        let units = room.min((i64::from(f[b]) / 8).max(1));
        f[b] = (i64::from(f[b]) + step * units) as u32;
        diff -= step * units;
    }
    f
}

/// Bits a stream of data with these counts takes with frequencies `f`
/// (the payload, not the table): Σ count · log2(M / f).
pub fn coded_bits(counts: &[u64; 256], f: &[u32; 256]) -> f64 {
    counts
        .iter()
        .zip(f)
        .filter(|(c, _)| **c > 0)
        .map(|(&c, &f)| c as f64 * (f64::from(M) / f64::from(f)).log2())
        .sum()
}

#[derive(Clone, Copy, Default)]
struct EncSymbol {
    x_max: u32,
    rcp_freq: u32,
    bias: u32,
    cmpl_freq: u32,
    rcp_shift: u32,
}

impl EncSymbol {
    fn new(start: u32, freq: u32) -> EncSymbol {
        let x_max = ((L >> PROB_BITS) << 8) * freq;
        let cmpl_freq = M - freq;
        if freq < 2 {
            EncSymbol {
                x_max,
                rcp_freq: u32::MAX,
                bias: start + M - 1,
                cmpl_freq,
                rcp_shift: 0,
            }
        } else {
            let mut shift = 0;
            while freq > (1u32 << shift) {
                shift += 1;
            }
            EncSymbol {
                x_max,
                rcp_freq: (1u64 << (shift + 31)).div_ceil(u64::from(freq)) as u32,
                bias: start,
                cmpl_freq,
                rcp_shift: shift - 1,
            }
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(data: &[u8], at: &mut usize) -> Result<u32, RansError> {
    let mut v: u32 = 0;
    for shift in (0..35).step_by(7) {
        let b = *data.get(*at).ok_or_else(|| bad("the table ends early"))?;
        *at += 1;
        v |= u32::from(b & 0x7f)
            .checked_shl(shift)
            .ok_or_else(|| bad("a frequency is too long"))?;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(bad("a frequency is too long"))
}

/// Codes `data`; [`decode`] with `data.len()` gives it back.
pub fn encode(data: &[u8]) -> Vec<u8> {
    if data.is_empty() {
        return Vec::new();
    }
    let counts = histogram(data);
    let freq = normalise(&counts);
    let mut out = Vec::new();
    let present: Vec<usize> = (0..256).filter(|&i| freq[i] > 0).collect();
    out.push((present.len() - 1) as u8);
    let mut syms = [EncSymbol::default(); 256];
    let mut start = 0u32;
    for &s in &present {
        out.push(s as u8);
        put_varint(&mut out, freq[s]);
        syms[s] = EncSymbol::new(start, freq[s]);
        start += freq[s];
    }
    // Each symbol writes at most two bytes (a frequency of 1 in 2^15), and
    // the states four each; written from the end backwards.
    let n = data.len();
    let cap = 2 * n + 4 * LANES;
    let mut buf = vec![0u8; cap];
    let mut at = cap;
    let mut x = [L; LANES];
    // The encoder runs backwards: the symbols after the last whole group
    // of four first, each in its own lane, then the groups, four lanes at
    // a time in registers.
    let body = n - n % LANES;
    for i in (body..n).rev() {
        put(
            &mut x[i % LANES],
            &syms[data[i] as usize],
            &mut buf,
            &mut at,
        );
    }
    let [mut x0, mut x1, mut x2, mut x3] = x;
    for c in data[..body].chunks_exact(LANES).rev() {
        put(&mut x3, &syms[c[3] as usize], &mut buf, &mut at);
        put(&mut x2, &syms[c[2] as usize], &mut buf, &mut at);
        put(&mut x1, &syms[c[1] as usize], &mut buf, &mut at);
        put(&mut x0, &syms[c[0] as usize], &mut buf, &mut at);
    }
    for lane in [x3, x2, x1, x0] {
        at -= 4;
        buf[at..at + 4].copy_from_slice(&lane.to_le_bytes());
    }
    out.extend_from_slice(&buf[at..]);
    out
}

/// Puts one symbol into state `x`, writing the bytes renormalisation
/// shifts out backwards at `at`.
#[inline(always)]
fn put(x: &mut u32, s: &EncSymbol, buf: &mut [u8], at: &mut usize) {
    // A normalised state shifts out no, one or two bytes before a symbol
    // (x < 2^31 and x_max ≥ 2^16): both are written, branch-free, and the
    // position moves by as many as were needed (a byte written below it is
    // overwritten later or left outside the stream).
    let v = *x;
    let k = u32::from(v >= s.x_max) + u32::from(u64::from(v) >= u64::from(s.x_max) << 8);
    buf[*at - 1] = v as u8;
    buf[*at - 2] = (v >> 8) as u8;
    *at -= k as usize;
    let v = ((u64::from(v)) >> (8 * k)) as u32;
    let q = (((u64::from(v) * u64::from(s.rcp_freq)) >> 32) as u32) >> s.rcp_shift;
    *x = v
        .wrapping_add(s.bias)
        .wrapping_add(q.wrapping_mul(s.cmpl_freq));
}

/// [`take`] where the stream's next eight bytes are `w` (big-endian) and
/// this round's earlier lanes took `off` of them: branch-free and without
/// loads from the stream. A normalised state takes no, one or two bytes
/// after a symbol (the state before the refill is at least 2^8), and the
/// four lanes of a round take at most eight, so the two bytes at `off` are
/// in the window and as many of them as are needed are shifted in.
#[inline(always)]
fn take_window(x: &mut u32, slot: &[u8; M as usize], fc: &[u32; 256], w: u64, off: &mut u32) -> u8 {
    let v = *x;
    let s = slot[(v & MASK) as usize];
    let f = fc[s as usize];
    let v = (f >> 16)
        .wrapping_mul(v >> PROB_BITS)
        .wrapping_add(v & MASK)
        .wrapping_sub(f & 0xffff);
    let k = u32::from(v < L) + u32::from(v < (L >> 8));
    let next = ((w << (8 * *off)) >> 48) as u32;
    let shift = 8 * k;
    *x = (v << shift) | (next >> (16 - shift));
    *off += k;
    s
}

/// Takes one symbol out of state `x` (`fc`: each symbol's frequency in the
/// high 16 bits, its cumulative start in the low 16) and refills the state
/// from `stream` at `at`.
#[inline(always)]
fn take(
    x: &mut u32,
    slot: &[u8],
    fc: &[u32; 256],
    stream: &[u8],
    at: &mut usize,
) -> Result<u8, RansError> {
    let v = *x;
    let s = slot[(v & MASK) as usize];
    let f = fc[s as usize];
    let mut v = (f >> 16)
        .wrapping_mul(v >> PROB_BITS)
        .wrapping_add(v & MASK)
        .wrapping_sub(f & 0xffff);
    while v < L {
        let b = *stream
            .get(*at)
            .ok_or_else(|| bad("the payload ends early"))?;
        *at += 1;
        v = (v << 8) | u32::from(b);
    }
    *x = v;
    Ok(s)
}

/// Decodes a stream of [`encode`] holding `n` bytes.
pub fn decode(stream: &[u8], n: usize) -> Result<Vec<u8>, RansError> {
    if n == 0 {
        return if stream.is_empty() {
            Ok(Vec::new())
        } else {
            Err(bad("bytes where no symbol was coded"))
        };
    }
    let mut at = 0usize;
    let k = usize::from(*stream.first().ok_or_else(|| bad("empty"))?) + 1;
    at += 1;
    let mut freq = [0u32; 256];
    let mut cum = [0u32; 256];
    let mut total: u32 = 0;
    let mut last: Option<u8> = None;
    let mut slot = vec![0u8; M as usize];
    for _ in 0..k {
        let s = *stream.get(at).ok_or_else(|| bad("the table ends early"))?;
        at += 1;
        if last.is_some_and(|l| s <= l) {
            return Err(bad("the table's symbols are not ascending"));
        }
        last = Some(s);
        let f = get_varint(stream, &mut at)?;
        if f == 0 || f > M - total {
            return Err(bad(format!(
                "symbol {s}'s frequency {f} does not fit in {M}"
            )));
        }
        freq[s as usize] = f;
        cum[s as usize] = total;
        slot[total as usize..(total + f) as usize].fill(s);
        total += f;
    }
    if total != M {
        return Err(bad(format!("the frequencies sum to {total}, not {M}")));
    }
    let mut x = [0u32; LANES];
    for lane in &mut x {
        let b = stream
            .get(at..at + 4)
            .ok_or_else(|| bad("the states are cut short"))?;
        *lane = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        at += 4;
    }
    let mut fc = [0u32; 256];
    for (i, c) in fc.iter_mut().enumerate() {
        *c = (freq[i] << 16) | cum[i];
    }
    let mut out = vec![0u8; n];
    let body = n - n % LANES;
    let [mut x0, mut x1, mut x2, mut x3] = x;
    let slots: &[u8; M as usize] = slot
        .as_slice()
        .try_into()
        .map_err(|_| bad("slot table size"))?;
    for o in out[..body].chunks_exact_mut(LANES) {
        // Four symbols read at most eight bytes: one big-endian load of
        // them, each lane taking its bytes from that window.
        if let Some(win) = stream.get(at..at + 2 * LANES) {
            let mut w = [0u8; 8];
            w.copy_from_slice(win);
            let w = u64::from_be_bytes(w);
            let mut off = 0u32;
            o[0] = take_window(&mut x0, slots, &fc, w, &mut off);
            o[1] = take_window(&mut x1, slots, &fc, w, &mut off);
            o[2] = take_window(&mut x2, slots, &fc, w, &mut off);
            o[3] = take_window(&mut x3, slots, &fc, w, &mut off);
            at += off as usize;
        } else {
            o[0] = take(&mut x0, &slot, &fc, stream, &mut at)?;
            o[1] = take(&mut x1, &slot, &fc, stream, &mut at)?;
            o[2] = take(&mut x2, &slot, &fc, stream, &mut at)?;
            o[3] = take(&mut x3, &slot, &fc, stream, &mut at)?;
        }
    }
    let mut x = [x0, x1, x2, x3];
    for (i, o) in out.iter_mut().enumerate().skip(body) {
        *o = take(&mut x[i % LANES], &slot, &fc, stream, &mut at)?;
    }
    if x.iter().any(|&v| v != L) || at != stream.len() {
        return Err(bad(
            "the stream does not end where its symbols do (corrupted or cut)",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(data in proptest::collection::vec(any::<u8>(), 0..3000), skew in 0u8..4) {
            // Skewed data too: fewer symbols, some of frequency one.
            let data: Vec<u8> = data.iter().map(|b| b >> (2 * skew)).collect();
            let s = encode(&data);
            prop_assert_eq!(decode(&s, data.len()).unwrap(), data);
        }

        #[test]
        fn frequencies_sum_to_the_scale_and_keep_every_symbol(data in proptest::collection::vec(any::<u8>(), 1..2000)) {
            let c = histogram(&data);
            let f = normalise(&c);
            prop_assert_eq!(f.iter().sum::<u32>(), M);
            for i in 0..256 {
                prop_assert_eq!(c[i] > 0, f[i] > 0);
            }
        }

        #[test]
        fn garbage_never_panics(stream in proptest::collection::vec(any::<u8>(), 0..200), n in 0usize..500) {
            let _ = decode(&stream, n);
        }
    }

    fn geometric(n: usize, seed: u64, ratio: f64) -> Vec<u8> {
        let mut r = crate::rng::SplitMix64::new(seed);
        (0..n)
            .map(|_| {
                let u = r.next_f64().max(1e-300);
                let m = (u.ln() / ratio.ln()).floor() as i32;
                let s = if r.next_u64() & 1 == 1 { -1 } else { 1 };
                (s * m.min(100)) as i8 as u8
            })
            .collect()
    }

    #[test]
    fn lands_within_a_hundredth_of_a_bit_of_the_entropy() {
        for (ratio, n) in [(0.5, 200_000), (0.2, 200_000), (0.8, 1_000_000)] {
            let data = geometric(n, 7, ratio);
            let h = entropy_bits(&histogram(&data));
            let s = encode(&data);
            let bits = s.len() as f64 * 8.0 / n as f64;
            assert!(bits - h < 0.01, "ratio {ratio}: {bits} bits against {h}");
            assert_eq!(decode(&s, n).unwrap(), data);
        }
    }

    #[test]
    fn one_symbol_costs_only_the_table_and_states() {
        let data = vec![9u8; 100_000];
        let s = encode(&data);
        // The count, the symbol, its frequency (3 bytes), the states.
        assert_eq!(s.len(), 1 + 1 + 3 + 4 * LANES);
        assert_eq!(decode(&s, data.len()).unwrap(), data);
        assert!(encode(&[]).is_empty());
        assert_eq!(decode(&[], 0).unwrap(), Vec::<u8>::new());
        assert!(decode(&[0], 0).is_err());
    }

    #[test]
    fn every_byte_flip_is_caught_or_decodes_differently_never_silently_the_same() {
        let data = geometric(5_000, 3, 0.5);
        let s = encode(&data);
        let mut caught = 0;
        for i in 0..s.len() {
            let mut bad = s.clone();
            bad[i] ^= 0x21;
            match decode(&bad, data.len()) {
                Err(_) => caught += 1,
                Ok(d) => assert_ne!(d, data, "flipping byte {i} changed nothing"),
            }
        }
        // The end-state check catches nearly all of them.
        assert!(caught * 100 >= s.len() * 99, "{caught} of {}", s.len());
        // A stream cut short, or a count that is not the encoded one.
        assert!(decode(&s[..s.len() - 1], data.len()).is_err());
        assert!(decode(&s, data.len() + 1).is_err());
        assert!(decode(&s, data.len() - 1).is_err());
    }
}
