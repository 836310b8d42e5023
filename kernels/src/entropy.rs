//! Lossless entropy stages: zstd, or rANS ([`crate::rans`]), over every
//! part, floats split into byte planes first.
//!
//! A part whose elements are wider than a byte (f16, bf16, f32, u16) is
//! rearranged so that byte 0 of every element comes first, then byte 1, and
//! so on: exponent bytes are far more predictable than mantissa bytes and
//! each plane compresses well on its own (rANS gives each plane its own
//! frequency table). A part (zstd) or plane (rANS) that the coder does not
//! shrink is stored as it is (the metadata says which).

use serde::{Deserialize, Serialize};

use crate::part::{parse_meta, to_meta};
use crate::{KernelError, Part, PartDtype};

/// One coded part as the decoder needs to know it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CodedPart {
    /// The part's name.
    pub name: String,
    /// Its dtype before coding.
    pub dtype: String,
    /// Its shape before coding.
    pub shape: Vec<usize>,
    /// Its byte length before coding.
    pub raw_len: usize,
    /// Whether the stored bytes are zstd frames (false: stored raw).
    pub zstd: bool,
}

/// What the decoder needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntropyMeta {
    /// The parts coded, in order.
    pub parts: Vec<CodedPart>,
}

fn split_planes(data: &[u8], width: usize) -> Vec<u8> {
    if width == 1 {
        return data.to_vec();
    }
    let n = data.len() / width;
    let mut out = vec![0u8; data.len()];
    for (i, e) in data.chunks_exact(width).enumerate() {
        for (b, v) in e.iter().enumerate() {
            out[b * n + i] = *v;
        }
    }
    out
}

fn join_planes(data: &[u8], width: usize) -> Vec<u8> {
    if width == 1 {
        return data.to_vec();
    }
    let n = data.len() / width;
    let mut out = vec![0u8; data.len()];
    for (i, e) in out.chunks_exact_mut(width).enumerate() {
        for (b, v) in e.iter_mut().enumerate() {
            *v = data[b * n + i];
        }
    }
    out
}

/// zstd at `level` with the frame checksum on: a flipped bit anywhere in the
/// frame makes decoding fail instead of returning wrong codes (4 bytes a part).
fn compress_checked(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    let mut c = zstd::bulk::Compressor::new(level)?;
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
    c.compress(data)
}

/// Codes every part in place; returns the metadata.
pub fn encode(level: i32, parts: &mut [Part]) -> Result<serde_json::Value, KernelError> {
    let mut coded = Vec::with_capacity(parts.len());
    for p in parts.iter_mut() {
        let planes = split_planes(&p.data, p.dtype.size());
        let z = compress_checked(&planes, level)
            .map_err(|e| KernelError::Values(format!("zstd failed on part `{}`: {e}", p.name)))?;
        let use_zstd = z.len() < p.data.len();
        coded.push(CodedPart {
            name: p.name.clone(),
            dtype: p.dtype.name().to_string(),
            shape: p.shape.clone(),
            raw_len: p.data.len(),
            zstd: use_zstd,
        });
        let bytes = if use_zstd {
            z
        } else {
            std::mem::take(&mut p.data)
        };
        p.shape = vec![bytes.len()];
        p.dtype = PartDtype::U8;
        p.data = bytes;
    }
    Ok(to_meta(&EntropyMeta { parts: coded }))
}

/// The bytes the metadata of entropy stage `stage` (`zstd`, `rans`) says
/// its parts hold before coding, summed; an error when the metadata is
/// malformed or the sum overflows.
pub fn declared_raw_bytes(stage: &str, meta: &serde_json::Value) -> Result<u64, KernelError> {
    #[derive(Deserialize)]
    struct RawLen {
        raw_len: usize,
    }
    #[derive(Deserialize)]
    struct RawLens {
        parts: Vec<RawLen>,
    }
    let m: RawLens = parse_meta(stage, meta)?;
    m.parts
        .iter()
        .try_fold(0u64, |a, p| a.checked_add(p.raw_len as u64))
        .ok_or_else(|| KernelError::Meta {
            stage: stage.into(),
            why: "the parts' raw lengths overflow".into(),
        })
}

/// One byte plane of a part as the rANS stage stored it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CodedPlane {
    /// Its stored bytes.
    pub bytes: usize,
    /// Whether they are a rANS stream (false: the plane as it is).
    pub rans: bool,
}

/// One part as the rANS stage's decoder needs to know it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RansPart {
    /// The part's name.
    pub name: String,
    /// Its dtype before coding.
    pub dtype: String,
    /// Its shape before coding.
    pub shape: Vec<usize>,
    /// Its byte length before coding.
    pub raw_len: usize,
    /// Its byte planes, in order (one for bytes, two for f16, ...).
    pub planes: Vec<CodedPlane>,
}

/// What the rANS stage's decoder needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RansMeta {
    /// The parts coded, in order.
    pub parts: Vec<RansPart>,
}

/// Codes every part in place with rANS, a frequency table per byte plane;
/// returns the metadata.
pub fn encode_rans(parts: &mut [Part]) -> Result<serde_json::Value, KernelError> {
    let mut coded = Vec::with_capacity(parts.len());
    for p in parts.iter_mut() {
        let width = p.dtype.size();
        let planes = split_planes(&p.data, width);
        let n = p.data.len() / width;
        let mut out = Vec::with_capacity(p.data.len());
        let mut record = Vec::with_capacity(width);
        for plane in planes.chunks(n.max(1)).take(width) {
            let s = crate::rans::encode(plane);
            let use_rans = s.len() < plane.len();
            let stored: &[u8] = if use_rans { &s } else { plane };
            record.push(CodedPlane {
                bytes: stored.len(),
                rans: use_rans,
            });
            out.extend_from_slice(stored);
        }
        coded.push(RansPart {
            name: p.name.clone(),
            dtype: p.dtype.name().to_string(),
            shape: p.shape.clone(),
            raw_len: p.data.len(),
            planes: record,
        });
        p.shape = vec![out.len()];
        p.dtype = PartDtype::U8;
        p.data = out;
    }
    Ok(to_meta(&RansMeta { parts: coded }))
}

/// Restores the parts the rANS stage's metadata lists, in place.
pub fn decode_rans(meta: &serde_json::Value, parts: &mut [Part]) -> Result<(), KernelError> {
    let m: RansMeta = parse_meta("rans", meta)?;
    for c in &m.parts {
        let dtype = PartDtype::parse(&c.dtype).ok_or_else(|| KernelError::Meta {
            stage: "rans".into(),
            why: format!("unknown dtype {}", c.dtype),
        })?;
        let width = dtype.size();
        let p = parts
            .iter_mut()
            .find(|p| p.name == c.name)
            .ok_or_else(|| KernelError::MissingPart(c.name.clone()))?;
        if c.raw_len % width != 0 || (c.raw_len > 0 && c.planes.len() != width) {
            return Err(KernelError::corrupt(
                &c.name,
                format!(
                    "{} bytes in {} planes for {} values",
                    c.raw_len,
                    c.planes.len(),
                    c.dtype
                ),
            ));
        }
        let n = c.raw_len / width;
        let stored: usize = c
            .planes
            .iter()
            .try_fold(0usize, |a, q| a.checked_add(q.bytes))
            .ok_or_else(|| KernelError::corrupt(&c.name, "plane lengths overflow"))?;
        if stored != p.data.len() {
            return Err(KernelError::corrupt(
                &c.name,
                format!("{} bytes, the planes say {stored}", p.data.len()),
            ));
        }
        let mut planes = Vec::with_capacity(c.raw_len);
        let mut at = 0;
        for q in &c.planes {
            let bytes = &p.data[at..at + q.bytes];
            at += q.bytes;
            if q.rans {
                let d = crate::rans::decode(bytes, n)
                    .map_err(|e| KernelError::corrupt(&c.name, e.to_string()))?;
                planes.extend_from_slice(&d);
            } else if q.bytes == n {
                planes.extend_from_slice(bytes);
            } else {
                return Err(KernelError::corrupt(
                    &c.name,
                    format!("a plane stored as it is has {} bytes, not {n}", q.bytes),
                ));
            }
        }
        p.data = join_planes(&planes, width);
        p.dtype = dtype;
        p.shape = c.shape.clone();
    }
    Ok(())
}

/// Restores the parts the metadata lists, in place.
pub fn decode(meta: &serde_json::Value, parts: &mut [Part]) -> Result<(), KernelError> {
    let m: EntropyMeta = parse_meta("zstd", meta)?;
    for c in &m.parts {
        let dtype = PartDtype::parse(&c.dtype).ok_or_else(|| KernelError::Meta {
            stage: "zstd".into(),
            why: format!("unknown dtype {}", c.dtype),
        })?;
        let p = parts
            .iter_mut()
            .find(|p| p.name == c.name)
            .ok_or_else(|| KernelError::MissingPart(c.name.clone()))?;
        let raw = if c.zstd {
            let d = zstd::bulk::decompress(&p.data, c.raw_len)
                .map_err(|e| KernelError::corrupt(&c.name, format!("zstd: {e}")))?;
            if d.len() != c.raw_len || c.raw_len % dtype.size() != 0 {
                return Err(KernelError::corrupt(
                    &c.name,
                    format!("decoded {} bytes, expected {}", d.len(), c.raw_len),
                ));
            }
            join_planes(&d, dtype.size())
        } else {
            if p.data.len() != c.raw_len {
                return Err(KernelError::corrupt(
                    &c.name,
                    format!("{} bytes, expected {}", p.data.len(), c.raw_len),
                ));
            }
            std::mem::take(&mut p.data)
        };
        p.data = raw;
        p.dtype = dtype;
        p.shape = c.shape.clone();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(a in proptest::collection::vec(any::<u8>(), 0..500), f in proptest::collection::vec(-1e3f32..1e3, 0..200)) {
            let orig = vec![Part::bytes("a", a), Part::f16("f", &f, vec![f.len()])];
            let mut parts = orig.clone();
            let meta = encode(3, &mut parts).unwrap();
            decode(&meta, &mut parts).unwrap();
            prop_assert_eq!(parts, orig);
        }
    }

    #[test]
    fn compresses_skewed_codes_near_entropy() {
        // Codes from a two-sided geometric source with entropy ≈ 2.0 bits.
        let mut r = crate::rng::SplitMix64::new(1);
        let data: Vec<u8> = (0..200_000)
            .map(|_| {
                let u = r.next_f64();
                let m = (u.ln() / 0.5f64.ln()).floor() as i32; // P(m) = 2^-(m+1)
                let s = if r.next_u64() & 1 == 1 { -1 } else { 1 };
                (s * m.min(100)) as i8 as u8
            })
            .collect();
        let mut parts = vec![Part::bytes("c", data)];
        encode(19, &mut parts).unwrap();
        let bits = parts[0].len() as f64 * 8.0 / 200_000.0;
        // Entropy: H(m) = 2 bits, sign adds 1 bit except at m = 0 (p = 1/2): 2.5 bits.
        assert!(bits < 2.56, "{bits}");
    }

    proptest! {
        #[test]
        fn rans_round_trips(a in proptest::collection::vec(any::<u8>(), 0..500), f in proptest::collection::vec(-1e3f32..1e3, 0..200), g in proptest::collection::vec(-1e3f32..1e3, 0..50)) {
            let orig = vec![
                Part::bytes("a", a),
                Part::f16("f", &f, vec![f.len()]),
                Part {
                    name: "g".into(),
                    dtype: PartDtype::F32,
                    shape: vec![g.len()],
                    data: g.iter().flat_map(|v| v.to_le_bytes()).collect(),
                },
            ];
            let mut parts = orig.clone();
            let meta = encode_rans(&mut parts).unwrap();
            let raw: usize = orig.iter().map(|p| p.data.len()).sum();
            prop_assert_eq!(declared_raw_bytes("rans", &meta).unwrap(), raw as u64);
            decode_rans(&meta, &mut parts).unwrap();
            prop_assert_eq!(parts, orig);
        }
    }

    #[test]
    fn rans_codes_skewed_codes_near_their_entropy_and_refuses_bad_parts() {
        let mut r = crate::rng::SplitMix64::new(1);
        let data: Vec<u8> = (0..200_000)
            .map(|_| {
                let u = r.next_f64().max(1e-300);
                let m = (u.ln() / 0.5f64.ln()).floor() as i32;
                let s = if r.next_u64() & 1 == 1 { -1 } else { 1 };
                (s * m.min(100)) as i8 as u8
            })
            .collect();
        let h = crate::rans::entropy_bits(&crate::rans::histogram(&data));
        let mut parts = vec![Part::bytes("c", data.clone())];
        let meta = encode_rans(&mut parts).unwrap();
        let bits = parts[0].len() as f64 * 8.0 / 200_000.0;
        assert!(bits - h < 0.01, "{bits} bits against {h}");
        let clean = parts.clone();
        // A part cut short, or one byte longer, is refused.
        let mut cut = clean.clone();
        cut[0].data.pop();
        assert!(decode_rans(&meta, &mut cut).is_err());
        let mut long = clean.clone();
        long[0].data.push(0);
        assert!(decode_rans(&meta, &mut long).is_err());
        let mut ok = clean;
        decode_rans(&meta, &mut ok).unwrap();
        assert_eq!(ok[0].data, data);
    }

    #[test]
    fn corrupt_frame_is_an_error() {
        let mut parts = vec![Part::bytes("a", vec![7u8; 1000])];
        let meta = encode(3, &mut parts).unwrap();
        // Every single-byte corruption of the frame, header to checksum, is
        // an error: none decodes to other bytes.
        let clean = parts.clone();
        for i in 0..clean[0].data.len() {
            let mut bad = clean.clone();
            bad[0].data[i] ^= 0x5a;
            let r = decode(&meta, &mut bad);
            assert!(r.is_err(), "corrupting byte {i} decoded without error");
        }
        let mut ok = clean.clone();
        decode(&meta, &mut ok).unwrap();
        assert_eq!(ok[0].data, vec![7u8; 1000]);
        let mut parts2 = vec![Part::bytes("b", vec![1])];
        assert!(decode(&meta, &mut parts2).is_err());
    }
}
