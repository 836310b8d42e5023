//! The hot kernels for NVIDIA GPUs: the calibration statistics' Gram matrix
//! ([`crate::gram`]), the Hadamard rotation and `uniform`'s quantizing
//! pass, written
//! in CUDA C ([`SOURCE`]) that repeats the CPU path operation for operation
//! so that a node with a GPU writes the same bytes as one without.
//!
//! With the `cuda` feature a node opens its first device at start
//! ([`install`]): cudarc loads the CUDA driver and NVRTC at run time, NVRTC
//! compiles [`SOURCE`] with `--fmad=false`, and from then on the kernels'
//! callers ([`crate::hessian::HessianSum::add_batch`],
//! [`crate::hadamard::forward`], [`crate::hadamard::inverse`] and
//! `uniform`'s encoders) hand large inputs to the device. Without the feature, or without a device, every
//! entry point here answers `None` and the CPU path runs.

/// The CUDA C source of every kernel.
pub const SOURCE: &str = include_str!("kernels.cu");

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub use device::{Gpu, GpuError};

#[cfg(test)]
mod host_check;

/// Inputs smaller than this many values stay on the CPU: moving them to a
/// device and back costs more than it saves.
pub const MIN_VALUES: usize = 1 << 16;

/// What the installed device is, for a node's registration: its name and
/// memory, or `None` where no device is in use.
pub fn describe() -> Option<String> {
    #[cfg(feature = "cuda")]
    {
        device::current().map(|g| g.describe())
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// Opens the first CUDA device for this process's kernels, once. Returns
/// what was opened, or why nothing was (no `cuda` feature, no driver, no
/// device, or NVRTC failed to compile the kernels): the CPU path then runs,
/// with the same results.
pub fn install() -> Result<String, String> {
    #[cfg(feature = "cuda")]
    {
        device::install()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("this build has no `cuda` feature".into())
    }
}

/// XᵀX's upper triangle by [`crate::gram`]'s definition, packed column by
/// column (column j at j(j+1)/2), computed on the device; `None` where no
/// device is installed, the input is small, or the device failed (the
/// failure is logged and the CPU path runs).
pub fn gram_upper(x: &[f32], rows: usize, dim: usize) -> Option<Vec<f64>> {
    #[cfg(feature = "cuda")]
    {
        let g = device::current()?;
        if x.len() < MIN_VALUES {
            return None;
        }
        g.gram_upper(x, rows, dim)
            .map_err(|e| tracing::warn!("GPU Gram matrix failed, using the CPU: {e}"))
            .ok()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, rows, dim);
        None
    }
}

/// What `uniform`'s quantizing pass counts, as the device returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniformTally {
    /// Codes −512..=512, by code + 512.
    pub hist: Vec<u64>,
    /// Σ |x|/Δ in units of 2^-24 of the values coded with magnitude 1 to 8.
    pub sums: [i64; crate::uniform::OFFSETS],
    /// The largest code magnitude.
    pub max_magnitude: u32,
    /// Every code beyond ±512, in no particular order.
    pub far: Vec<i32>,
}

/// `uniform`'s quantizing pass on the device: each value's code's low
/// byte into `lo`, and the pass's tally; `None` where it did not run there
/// (no device, a small input, a failure, or too many codes beyond ±512 to
/// list), and `lo` is then to be written by the CPU.
pub fn uniform_tally(x: &[f32], inv: f32, dz: f32, lo: &mut [u8]) -> Option<UniformTally> {
    #[cfg(feature = "cuda")]
    {
        let g = device::current()?;
        if x.len() < MIN_VALUES {
            return None;
        }
        g.uniform_tally(x, inv, dz, lo)
            .map_err(|e| tracing::warn!("GPU quantizing pass failed, using the CPU: {e}"))
            .ok()
            .flatten()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, inv, dz, lo);
        None
    }
}

/// Rotates rows in place on the device as [`crate::hadamard`] does on the
/// CPU (`signs_first` going forward, after the transform going back);
/// `false` where it did not run there or its result holds a NaN (whose
/// bits a GPU does not keep as the CPU does), and `x` is then unchanged.
pub fn hadamard_rows(
    x: &mut [f32],
    signs: &[f32],
    cols: usize,
    block: usize,
    signs_first: bool,
) -> bool {
    #[cfg(feature = "cuda")]
    {
        let Some(g) = device::current() else {
            return false;
        };
        if x.len() < MIN_VALUES {
            return false;
        }
        g.hadamard_rows(x, signs, cols, block, signs_first)
            .map_err(|e| tracing::warn!("GPU Hadamard rotation failed, using the CPU: {e}"))
            .unwrap_or(false)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, signs, cols, block, signs_first);
        false
    }
}
