//! The one error type of the kernels.

/// Why a stage could not encode or decode a tensor. The caller adds the
/// tensor's name.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The tensor's shape does not fit the stage's parameters.
    #[error("shape [{rows}, {cols}]: {why}")]
    Shape {
        /// Rows of the matrix view.
        rows: usize,
        /// Row length.
        cols: usize,
        /// What does not fit.
        why: String,
    },
    /// A part the decoder needs is absent.
    #[error("part `{0}` is missing")]
    MissingPart(String),
    /// A part's bytes do not decode.
    #[error("part `{part}` is corrupt: {why}")]
    Corrupt {
        /// The part.
        part: String,
        /// What is wrong.
        why: String,
    },
    /// A stage's recorded metadata does not parse or is inconsistent.
    #[error("stage `{stage}`: bad metadata: {why}")]
    Meta {
        /// The stage.
        stage: String,
        /// What is wrong.
        why: String,
    },
    /// The values cannot be encoded (NaN or infinite inputs).
    #[error("{0}")]
    Values(String),
    /// The stage needs calibration statistics and none were given.
    #[error("stage `{0}` needs calibration data (`calibration:` in the job)")]
    NeedsCalibration(String),
}

impl KernelError {
    /// Shorthand for a shape error.
    pub fn shape(rows: usize, cols: usize, why: impl Into<String>) -> KernelError {
        KernelError::Shape {
            rows,
            cols,
            why: why.into(),
        }
    }

    /// Shorthand for a corrupt part.
    pub fn corrupt(part: &str, why: impl Into<String>) -> KernelError {
        KernelError::Corrupt {
            part: part.to_string(),
            why: why.into(),
        }
    }
}
