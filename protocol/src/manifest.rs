//! The artifact manifest, `hcx-manifest.json`: every tensor's stage chain,
//! the parameters its decoder needs, and the SHA-256 of every file.

use serde::{Deserialize, Serialize};

use crate::job::JobSpec;
use crate::stage::StageSpec;

/// Name of the manifest file inside an artifact folder.
pub const MANIFEST_FILE: &str = "hcx-manifest.json";

/// Format tag written into every manifest; readers refuse other values.
pub const FORMAT: &str = "hcx-artifact/1";

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// The job as it was run (paths as given in the job file's folder).
    pub job: JobSpec,
    /// What was read.
    pub source: SourceInfo,
    /// Every source tensor, in name order.
    pub tensors: Vec<TensorEntry>,
    /// Every tensor file of the artifact with its size and hash.
    pub files: Vec<FileEntry>,
}

/// The source model as read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    /// The safetensors files, names relative to the model folder.
    pub files: Vec<FileEntry>,
    /// Their total size on disk.
    pub bytes: u64,
    /// Files copied beside the tensors (config, tokenizer), with the size
    /// and hash of the copy in the artifact.
    pub copied: Vec<FileEntry>,
}

/// A file with its size and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Name relative to its folder.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the contents.
    pub sha256: String,
}

/// One source tensor and how it was encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// Source name.
    pub name: String,
    /// Source dtype as safetensors spells it (`F32`, `F16`, `BF16`, `I64`, …).
    pub dtype: String,
    /// Source shape.
    pub shape: Vec<usize>,
    /// Bytes of the tensor's data as the stages read it (shape × dtype).
    pub source_bytes: u64,
    /// Sum of squares of the source values (weights the error shares).
    pub energy: f64,
    /// The artifact file that holds its parts.
    pub file: String,
    /// The stages, in encode order, with what each recorded.
    pub steps: Vec<StepRecord>,
    /// The parts written, in order.
    pub parts: Vec<PartEntry>,
    /// Error of the whole chain against the source, dB (`null` when exact).
    pub sqnr_db: Option<f64>,
    /// Bytes the tensor takes in the source file where that differs from
    /// `source_bytes` (a GGUF tensor's quantized blocks; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
    /// Calibrated tensors: 10·log10(‖XW‖² / ‖X(W − Ŵ)‖²) over the
    /// calibration inputs X, dB (absent without calibration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_sqnr_db: Option<f64>,
}

/// A stored part of an encoded tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartEntry {
    /// Full tensor name in the artifact file (`<tensor>.<stage>.<part>`).
    pub name: String,
    /// Stored dtype (`U8`, `F16`, …).
    pub dtype: String,
    /// Stored shape.
    pub shape: Vec<usize>,
    /// Data bytes.
    pub bytes: u64,
    /// Bytes of its entry in the safetensors header (name, dtype, shape,
    /// offsets), counted in the tensor's size.
    pub header_bytes: u64,
}

/// What one stage did to one tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepRecord {
    /// The stage as the job gave it.
    pub spec: StageSpec,
    /// What the decoder needs besides the parts (shapes, chosen steps, seeds).
    pub meta: serde_json::Value,
    /// Size of the representation before the stage: parts so far plus the
    /// signal still to encode at the source's bytes per element.
    pub bytes_in: u64,
    /// The same after the stage.
    pub bytes_out: u64,
    /// Squared error this stage added, in units of the source's energy
    /// (0 for lossless stages).
    pub error_added: f64,
    /// SQNR of the chain up to and including this stage, dB (`null` when exact).
    pub sqnr_db: Option<f64>,
}

impl TensorEntry {
    /// Bytes the tensor takes in the source file as stored.
    pub fn stored(&self) -> u64 {
        self.stored_bytes.unwrap_or(self.source_bytes)
    }
}
