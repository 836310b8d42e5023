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
