//! Cast: store the signal as f16, bf16 or f32 (the simplest quantizer).

use serde::{Deserialize, Serialize};

use crate::part::{Coded, parse_meta, to_meta};
use crate::{KernelError, Part, PartDtype, Parts, Signal};
use hcx_protocol::stage::{CastDtype, CastSpec};

#[derive(Debug, Serialize, Deserialize)]
struct CastMeta {
    dtype: CastDtype,
}

/// Stores the values in the spec's dtype.
pub fn encode(spec: &CastSpec, x: &Signal) -> Result<Coded, KernelError> {
    let shape = vec![x.rows, x.cols];
    let part = match spec.dtype {
        CastDtype::F16 => Part::f16("values", &x.data, shape),
        CastDtype::Bf16 => Part {
            name: "values".into(),
            dtype: PartDtype::Bf16,
            shape,
            data: x
                .data
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        },
        CastDtype::F32 => Part {
            name: "values".into(),
            dtype: PartDtype::F32,
            shape,
            data: x.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        },
    };
    Ok(Coded {
        meta: to_meta(&CastMeta { dtype: spec.dtype }),
        parts: vec![part],
    })
}

/// Reads the values back as f32.
pub fn decode(
    meta: &serde_json::Value,
    parts: &Parts,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, KernelError> {
    let m: CastMeta = parse_meta("cast", meta)?;
    let n = rows * cols;
    match m.dtype {
        CastDtype::F16 => parts.f16_values("values", n),
        CastDtype::Bf16 => {
            let b = parts.byte_values("values", n * 2)?;
            Ok(b.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect())
        }
        CastDtype::F32 => {
            let b = parts.byte_values("values", n * 4)?;
            Ok(b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::gaussian_vec;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip_within_the_dtype_precision(seed in any::<u64>(), which in 0u8..3) {
            let dtype = [CastDtype::F16, CastDtype::Bf16, CastDtype::F32][which as usize];
            let x = Signal::new(gaussian_vec(seed, 96), 3, 32);
            let c = encode(&CastSpec { dtype }, &x).unwrap();
            let y = decode(&c.meta, &Parts::new(c.parts), 3, 32).unwrap();
            // Relative rounding error: 2^-11 (f16), 2^-8 (bf16), exact (f32).
            let rel = [1.0 / 2048.0, 1.0 / 256.0, 0.0][which as usize];
            for (a, b) in x.data.iter().zip(&y) {
                prop_assert!((a - b).abs() <= a.abs() * rel + 1e-7);
            }
        }
    }

    #[test]
    fn short_part_is_an_error() {
        let c = encode(
            &CastSpec {
                dtype: CastDtype::F16,
            },
            &Signal::new(vec![1.0; 8], 2, 4),
        )
        .unwrap();
        assert!(decode(&c.meta, &Parts::new(c.parts), 3, 4).is_err());
    }
}
