//! Runs a compression job on one machine: reads the model, runs each
//! tensor's stage chain (tensors in parallel, memory bounded), and writes
//! the artifact; also decompresses and inspects artifacts.
//!
//! Entry points: [`run::run_job`], [`artifact::decompress`],
//! [`artifact::inspect`].
#![warn(missing_docs, unreachable_pub)]

pub mod artifact;
pub mod attribution;
pub mod calibrate;
pub mod charts;
pub mod dense;
mod distill;
mod end_to_end;
pub mod estimate;
pub mod gates;
pub mod gguf;
pub mod model;
pub mod run;
pub mod shard;
mod stages;
pub mod target;
pub mod walk_cost;
pub mod writer;

use std::path::{Path, PathBuf};

/// Keeps freed memory in the process for reuse. The forward passes of
/// calibration and distillation allocate and free tensors of tens of MB
/// thousands of times; glibc's malloc hands each one back to the kernel
/// and page-faults it in again the next time, which cost a third of a
/// SmolLM2 distillation step. Fixing glibc's mmap threshold at its largest
/// (32 MiB) keeps those blocks in the heap, and a large trim threshold
/// keeps the heap from shrinking between steps; the peak memory is
/// unchanged. Called once by the calibrated runs; a no-op elsewhere than
/// glibc.
pub fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes glibc's allocation thresholds; it is
        // called once, before the calibrated run allocates its tensors.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    });
}

/// Why a job, a decompression or an inspection failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A file operation failed.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The source model is unusable.
    #[error("{}: {why}", path.display())]
    Model {
        /// The model file or folder.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A tensor could not be encoded or decoded.
    #[error("tensor `{tensor}`: {source}")]
    Tensor {
        /// The tensor's name.
        tensor: String,
        /// What the kernel said.
        source: hcx_kernels::KernelError,
    },
    /// An artifact is incomplete, corrupt or of another format.
    #[error("{}: {why}", path.display())]
    Artifact {
        /// The artifact folder or file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The output location cannot be used.
    #[error("output {}: {why}", path.display())]
    Output {
        /// The output folder.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A collective between the ranks of a data-parallel run failed.
    #[error("collective during {during}: {source}")]
    Collective {
        /// What the ranks were exchanging.
        during: String,
        /// What the collective said.
        source: hcx_kernels::collective::CollectiveError,
    },
    /// A dry run cannot estimate this job.
    #[error("dry run: {why}")]
    Estimate {
        /// Why not.
        why: String,
    },
    /// A federated run's ranks, sites or statistics do not fit together,
    /// or a site's data is too small to share statistics of.
    #[error("federated calibration: {why}")]
    Federation {
        /// What is wrong.
        why: String,
    },
    /// The stages of a model split by layer (`calibration.parallel:
    /// layers`) do not fit together, or a stage sent malformed activations.
    #[error("layer-parallel calibration: {why}")]
    Stage {
        /// What is wrong.
        why: String,
    },
    /// Block-wise distillation failed.
    #[error("block {block}: distillation: {why}")]
    Distill {
        /// The block.
        block: usize,
        /// What went wrong.
        why: String,
    },
    /// End-to-end tuning of the norm gains failed.
    #[error("end-to-end tuning: {why}")]
    EndToEnd {
        /// What went wrong.
        why: String,
    },
    /// The attribution charts could not be drawn.
    #[error("{0}")]
    Charts(String),
    /// The artifact could not be measured against a quality gate.
    #[error("quality gate: {why}")]
    Gate {
        /// What went wrong.
        why: String,
    },
    /// The artifact misses a quality gate (and no raise was left).
    #[error("the artifact misses its quality gate: {why}")]
    GateMissed {
        /// The measured value, the gate, and each earlier try.
        why: String,
    },
}

impl PipelineError {
    /// An I/O error with its path and what was being done.
    pub fn io(path: &Path, what: &'static str, source: std::io::Error) -> PipelineError {
        PipelineError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    }
}

/// The layer a tensor belongs to, from the first `layers.N`, `layer.N`,
/// `h.N` or `blocks.N` in its name (as `layer.N`); other tensors are grouped
/// by their first name component (`embeddings`, `pooler`, …).
pub fn layer_of(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    for w in parts.windows(2) {
        if matches!(w[0], "layers" | "layer" | "h" | "blocks")
            && !w[1].is_empty()
            && w[1].bytes().all(|b| b.is_ascii_digit())
        {
            return format!("layer.{}", w[1]);
        }
    }
    parts.first().map(|s| s.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::layer_of;

    #[test]
    fn layers_from_names() {
        assert_eq!(
            layer_of("encoder.layer.3.attention.self.query.weight"),
            "layer.3"
        );
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), "layer.12");
        assert_eq!(layer_of("transformer.h.0.attn.c_attn.weight"), "layer.0");
        assert_eq!(layer_of("blocks.7.norm.weight"), "layer.7");
        assert_eq!(layer_of("embeddings.word_embeddings.weight"), "embeddings");
        assert_eq!(layer_of("h.x.y"), "h");
    }
}
