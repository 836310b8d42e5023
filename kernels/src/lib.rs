//! The compression math of hcx-cluster: pure functions over tensors.
//!
//! The entry points are [`chain::encode_tensor`] (or
//! [`chain::encode_tensor_calibrated`], with the Hessian of a layer's
//! calibration inputs) and [`chain::decode_tensor`], which run a job's stage
//! chain over one tensor; each codec module (`rtn`, `uniform`, `nonuniform`,
//! `ternary`, `seedlm`, `vq`, `gptq`, `lowrank`, `sparse`, `hadamard`,
//! `entropy`) holds one stage's encoder and decoder, `correction` the gains
//! and low-rank terms distillation adds after a chain, `hessian` the
//! exact, additive calibration statistics (over `gram`'s fixed-order XᵀX),
//! and `gpu` the CUDA kernels that repeat the hot paths on a device.
//! Nothing here does I/O or knows about the network.
#![warn(missing_docs, unreachable_pub)]

pub mod bits;
pub mod cast;
pub mod chain;
pub mod collective;
pub mod correction;
pub mod entropy;
pub mod error;
pub mod gptq;
pub mod gpu;
pub mod gram;
pub mod hadamard;
pub mod hessian;
pub mod lowrank;
pub mod nonuniform;
pub mod part;
pub mod rans;
pub mod rng;
pub mod row_pieces;
pub mod rtn;
pub mod seedlm;
pub mod sparse;
pub mod stats;
pub mod ternary;
pub mod uniform;
pub mod vq;

pub use chain::{EncodedTensor, decode_tensor, encode_tensor, encode_tensor_calibrated};
pub use error::KernelError;
pub use part::{Coded, Part, PartDtype, Parts, Split};

/// A tensor viewed as a row-major matrix of f32: `rows` is the product of
/// all dimensions but the last, `cols` the last one (a 1-D tensor is one row).
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    /// Row-major values, `rows * cols` of them.
    pub data: Vec<f32>,
    /// Number of rows.
    pub rows: usize,
    /// Length of a row.
    pub cols: usize,
}

impl Signal {
    /// Wraps values with a tensor shape (`[]` and `[n]` become one row).
    pub fn from_shape(data: Vec<f32>, shape: &[usize]) -> Signal {
        let cols = shape.last().copied().unwrap_or(1).max(1);
        let rows = if data.is_empty() {
            0
        } else {
            data.len() / cols
        };
        Signal { data, rows, cols }
    }

    /// Wraps values as a matrix.
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Signal {
        debug_assert_eq!(data.len(), rows * cols);
        Signal { data, rows, cols }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when there are no values.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}
