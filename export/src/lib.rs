//! Exports an hcx artifact to a format an inference engine loads.
//!
//! The artifact's tensors are decoded to f32 (exactly as `decompress`
//! does) and re-encoded in the target format; [`ExportReport`] says what
//! each tensor became and how far the re-encoded weights lie from ours.
//!
//! - [`gguf`]: llama.cpp's GGUF for Llama-family decoders, with Q8_0, Q4_0,
//!   Q4_K or Q6_K blocks and the tokenizer and hyperparameters in the
//!   metadata.
//! - [`compressed`]: compressed-tensors' `pack-quantized` safetensors
//!   (int4 or int8 codes in int32 words, group scales and the
//!   `quantization_config` vLLM reads).

use std::path::PathBuf;

pub mod compressed;
pub mod gguf;

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The artifact could not be read or decoded.
    #[error(transparent)]
    Artifact(#[from] hcx_pipeline::PipelineError),
    /// A file operation failed.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The artifact's model cannot be written in this format.
    #[error("{}: {why}", path.display())]
    Unsupported {
        /// The artifact (or the file of it at fault).
        path: PathBuf,
        /// What is missing or not supported.
        why: String,
    },
    /// Encoding one tensor failed.
    #[error("tensor `{tensor}`: {why}")]
    Tensor {
        /// The tensor's name in the artifact.
        tensor: String,
        /// What went wrong.
        why: String,
    },
}

impl ExportError {
    fn io(path: &std::path::Path, what: &'static str, source: std::io::Error) -> ExportError {
        ExportError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    }
}

/// Refuses an output folder that exists and holds anything.
pub(crate) fn require_empty(output: &std::path::Path) -> Result<(), ExportError> {
    let busy = output.exists()
        && std::fs::read_dir(output)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
    if busy {
        return Err(ExportError::Unsupported {
            path: output.to_path_buf(),
            why: "exists and is not empty".into(),
        });
    }
    Ok(())
}

/// One exported tensor: its names, its encoding and its distance from the
/// artifact's decoded values.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportedTensor {
    /// The name in the artifact (Hugging Face's).
    pub name: String,
    /// The name in the exported file.
    pub exported_name: String,
    /// The block type or dtype written (`Q8_0`, `F32`, …).
    pub encoding: String,
    /// Bytes the tensor takes in the exported file.
    pub bytes: u64,
    /// Largest absolute difference between the exported weights (decoded
    /// again) and the artifact's.
    pub max_abs_error: f32,
    /// Signal-to-noise ratio of the exported weights against the
    /// artifact's, in dB (`None` when they are equal).
    pub sqnr_db: Option<f64>,
}

/// What an export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    /// The file written.
    pub file: PathBuf,
    /// Its size on disk.
    pub bytes: u64,
    /// Every tensor, in file order.
    pub tensors: Vec<ExportedTensor>,
}

impl ExportReport {
    /// The lowest per-tensor SQNR (dB) of the export against the artifact.
    pub fn worst_sqnr_db(&self) -> Option<f64> {
        self.tensors
            .iter()
            .filter_map(|t| t.sqnr_db)
            .min_by(|a, b| a.total_cmp(b))
    }
}

/// Largest absolute difference and SQNR (dB) of `b` against `a`.
pub(crate) fn distance(a: &[f32], b: &[f32]) -> (f32, Option<f64>) {
    let mut max = 0f32;
    let (mut signal, mut noise) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let d = x - y;
        max = max.max(d.abs());
        signal += f64::from(*x) * f64::from(*x);
        noise += f64::from(d) * f64::from(d);
    }
    let sqnr = (noise > 0.0).then(|| 10.0 * (signal / noise).log10());
    (max, sqnr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_of_equal_values_is_zero_and_sqnr_is_absent() {
        assert_eq!(distance(&[1.0, -2.0], &[1.0, -2.0]), (0.0, None));
        let (max, sqnr) = distance(&[1.0, 0.0], &[0.9, 0.0]);
        assert!((max - 0.1).abs() < 1e-6);
        assert!((sqnr.unwrap() - 20.0).abs() < 1e-3, "{sqnr:?}");
    }
}
