//! Parts: the byte arrays an encoded tensor is stored as.

use crate::KernelError;

/// Element type of a stored part (names as safetensors spells them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartDtype {
    /// Raw bytes or packed codes.
    U8,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE single.
    F32,
    /// Unsigned 16-bit (seeds).
    U16,
}

impl PartDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            PartDtype::U8 => 1,
            PartDtype::F16 | PartDtype::Bf16 | PartDtype::U16 => 2,
            PartDtype::F32 => 4,
        }
    }

    /// The safetensors name.
    pub fn name(self) -> &'static str {
        match self {
            PartDtype::U8 => "U8",
            PartDtype::F16 => "F16",
            PartDtype::Bf16 => "BF16",
            PartDtype::F32 => "F32",
            PartDtype::U16 => "U16",
        }
    }

    /// Parses a safetensors name.
    pub fn parse(s: &str) -> Option<PartDtype> {
        Some(match s {
            "U8" => PartDtype::U8,
            "F16" => PartDtype::F16,
            "BF16" => PartDtype::Bf16,
            "F32" => PartDtype::F32,
            "U16" => PartDtype::U16,
            _ => return None,
        })
    }
}

/// One stored array of an encoded tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// Name under the tensor: `<stage>.<what>`, e.g. `rtn.codes`.
    pub name: String,
    /// Element type.
    pub dtype: PartDtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

impl Part {
    /// A byte part of shape `[len]`.
    pub fn bytes(name: impl Into<String>, data: Vec<u8>) -> Part {
        Part {
            name: name.into(),
            dtype: PartDtype::U8,
            shape: vec![data.len()],
            data,
        }
    }

    /// An f16 part from f32 values (rounded to nearest).
    pub fn f16(name: impl Into<String>, values: &[f32], shape: Vec<usize>) -> Part {
        let mut data = Vec::with_capacity(values.len() * 2);
        for v in values {
            data.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
        }
        Part {
            name: name.into(),
            dtype: PartDtype::F16,
            shape,
            data,
        }
    }

    /// A u16 part.
    pub fn u16(name: impl Into<String>, values: &[u16], shape: Vec<usize>) -> Part {
        let mut data = Vec::with_capacity(values.len() * 2);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Part {
            name: name.into(),
            dtype: PartDtype::U16,
            shape,
            data,
        }
    }

    /// Stored bytes.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when no bytes are stored.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The parts of one tensor, looked up by name.
#[derive(Debug, Clone, Default)]
pub struct Parts {
    items: Vec<Part>,
}

impl Parts {
    /// Wraps a list.
    pub fn new(items: Vec<Part>) -> Parts {
        Parts { items }
    }

    /// The part called `name`.
    pub fn get(&self, name: &str) -> Result<&Part, KernelError> {
        self.items
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| KernelError::MissingPart(name.to_string()))
    }

    /// Replaces or adds a part.
    pub fn put(&mut self, part: Part) {
        match self.items.iter_mut().find(|p| p.name == part.name) {
            Some(slot) => *slot = part,
            None => self.items.push(part),
        }
    }

    /// All parts.
    pub fn iter(&self) -> impl Iterator<Item = &Part> {
        self.items.iter()
    }

    /// Takes the list back.
    pub fn into_vec(self) -> Vec<Part> {
        self.items
    }

    /// Reads an f16 part as f32, checking its length.
    pub fn f16_values(&self, name: &str, expect: usize) -> Result<Vec<f32>, KernelError> {
        let p = self.get(name)?;
        if p.dtype != PartDtype::F16 || p.data.len() != expect * 2 {
            return Err(KernelError::corrupt(
                name,
                format!(
                    "expected {expect} f16 values, found {} bytes of {}",
                    p.data.len(),
                    p.dtype.name()
                ),
            ));
        }
        Ok(p.data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect())
    }

    /// Reads a u16 part, checking its length.
    pub fn u16_values(&self, name: &str, expect: usize) -> Result<Vec<u16>, KernelError> {
        let p = self.get(name)?;
        if p.dtype != PartDtype::U16 || p.data.len() != expect * 2 {
            return Err(KernelError::corrupt(
                name,
                format!(
                    "expected {expect} u16 values, found {} bytes of {}",
                    p.data.len(),
                    p.dtype.name()
                ),
            ));
        }
        Ok(p.data
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect())
    }

    /// Reads a byte part, checking its length.
    pub fn byte_values(&self, name: &str, expect: usize) -> Result<&[u8], KernelError> {
        let p = self.get(name)?;
        if p.data.len() != expect {
            return Err(KernelError::corrupt(
                name,
                format!("expected {expect} bytes, found {}", p.data.len()),
            ));
        }
        Ok(&p.data)
    }
}

/// Rounds f32 values through f16 (what an f16 part stores).
pub fn round_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// What a quantizer's encoder returns: the decoder's metadata and the parts
/// (names local to the stage, e.g. `codes`; the chain prefixes the stage).
#[derive(Debug, Clone)]
pub struct Coded {
    /// Everything the decoder needs besides the parts (JSON object).
    pub meta: serde_json::Value,
    /// The stored arrays.
    pub parts: Vec<Part>,
}

/// What a decomposition's encoder returns: its own parts, and the signal
/// left for the rest of the chain.
#[derive(Debug, Clone)]
pub struct Split {
    /// Everything the decoder needs besides the parts (JSON object).
    pub meta: serde_json::Value,
    /// The stored arrays (factors, masks).
    pub parts: Vec<Part>,
    /// The signal the next stages encode; `None` when the stage drops it.
    pub rest: Option<crate::Signal>,
    /// Squared error the stage itself adds (energy it drops).
    pub dropped_energy: f64,
}

/// Parses a stage's metadata into its typed form.
pub fn parse_meta<T: serde::de::DeserializeOwned>(
    stage: &str,
    meta: &serde_json::Value,
) -> Result<T, KernelError> {
    serde_json::from_value(meta.clone()).map_err(|e| KernelError::Meta {
        stage: stage.to_string(),
        why: e.to_string(),
    })
}

/// Serialises typed metadata (never fails for plain structs).
pub fn to_meta<T: serde::Serialize>(meta: &T) -> serde_json::Value {
    serde_json::to_value(meta).unwrap_or(serde_json::Value::Null)
}
