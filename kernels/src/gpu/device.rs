//! The kernels on a CUDA device through cudarc: the driver and NVRTC are
//! opened at run time, so building needs no CUDA toolkit.

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use super::{SOURCE, UniformTally};
use crate::uniform::OFFSETS;

/// Codes beyond ±512 the device lists at most; past that the CPU pass runs.
const FAR_CODES: usize = 1 << 20;

/// Why the device could not run a kernel.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No usable device: what is missing.
    #[error("no CUDA device: {0}")]
    Unavailable(String),
    /// NVRTC refused the kernels' source.
    #[error("NVRTC could not compile the kernels: {0}")]
    Compile(String),
    /// The driver failed a call.
    #[error("CUDA {what}: {why}")]
    Driver {
        /// The call.
        what: &'static str,
        /// The driver's answer.
        why: String,
    },
    /// The input does not fit what the kernel takes.
    #[error("{0}")]
    Shape(String),
}

fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> GpuError {
    move |e| GpuError::Driver {
        what,
        why: format!("{e:?}"),
    }
}

/// One device with the kernels compiled for it.
pub struct Gpu {
    name: String,
    memory: usize,
    stream: Arc<CudaStream>,
    gram: CudaFunction,
    hadamard: CudaFunction,
    uniform: CudaFunction,
}

static INSTALLED: OnceLock<Result<Gpu, String>> = OnceLock::new();

/// The device [`install`] opened, if it did.
pub(super) fn current() -> Option<&'static Gpu> {
    INSTALLED.get().and_then(|r| r.as_ref().ok())
}

/// Opens device 0 once for the whole process.
pub(super) fn install() -> Result<String, String> {
    INSTALLED
        .get_or_init(|| Gpu::open(0).map_err(|e| e.to_string()))
        .as_ref()
        .map(|g| g.describe())
        .map_err(Clone::clone)
}

fn int(v: usize, what: &str) -> Result<i32, GpuError> {
    i32::try_from(v).map_err(|_| GpuError::Shape(format!("{what} {v} exceeds the kernel's range")))
}

impl Gpu {
    /// Opens device `ordinal` and compiles the kernels for it.
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        // SAFETY: only tries to open the shared libraries by name.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::Unavailable(
                "no CUDA driver library (libcuda.so) on this machine".into(),
            ));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(GpuError::Unavailable(
                "no NVRTC library (libnvrtc.so) on this machine".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(driver("device count"))?;
        if ordinal >= count as usize {
            return Err(GpuError::Unavailable(format!(
                "the driver sees {count} devices, not device {ordinal}"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("context"))?;
        let name = ctx.name().map_err(driver("device name"))?;
        let memory = ctx.total_mem().map_err(driver("device memory"))?;
        let ptx = compile_ptx_with_opts(
            SOURCE,
            CompileOptions {
                // No contraction of a multiply and an add into one rounding:
                // the CPU path rounds each.
                fmad: Some(false),
                ftz: Some(false),
                prec_div: Some(true),
                prec_sqrt: Some(true),
                name: Some("hcx_kernels.cu".into()),
                ..Default::default()
            },
        )
        .map_err(|e| GpuError::Compile(format!("{e:?}")))?;
        let module = ctx.load_module(ptx).map_err(driver("module load"))?;
        let f = |n: &str| module.load_function(n).map_err(driver("function load"));
        Ok(Gpu {
            name,
            memory,
            // A stream of its own: the default one is NCCL's, and a kernel
            // queued behind a collective would wait for it.
            stream: ctx.new_stream().map_err(driver("stream"))?,
            gram: f("gram_upper")?,
            hadamard: f("hadamard_rows")?,
            uniform: f("uniform_tally")?,
        })
    }

    /// The device's name and memory.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:.1} GiB)",
            self.name,
            self.memory as f64 / (1u64 << 30) as f64
        )
    }

    /// [`super::gram_upper`] on this device, whatever the input's size.
    pub fn gram_upper(&self, x: &[f32], rows: usize, dim: usize) -> Result<Vec<f64>, GpuError> {
        if rows.checked_mul(dim) != Some(x.len()) {
            return Err(GpuError::Shape(format!(
                "{} values are not {rows} × {dim}",
                x.len()
            )));
        }
        let out_len = dim * (dim + 1) / 2;
        if dim == 0 {
            return Ok(Vec::new());
        }
        let (r, d) = (int(rows, "row count")?, int(dim, "row length")?);
        let s = &self.stream;
        let dx = s.clone_htod(x).map_err(driver("copy to device"))?;
        let mut out = s
            .alloc_zeros::<f64>(out_len)
            .map_err(driver("allocation"))?;
        let tiles = (dim as u32).div_ceil(16);
        let cfg = LaunchConfig {
            grid_dim: (tiles, tiles, 1),
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = s.launch_builder(&self.gram);
        launch.arg(&dx).arg(&r).arg(&d).arg(&mut out);
        // SAFETY: the arguments match the kernel's signature; `out` holds
        // the dim(dim+1)/2 entries the threads write, `dx` rows × dim.
        unsafe { launch.launch(cfg) }.map_err(driver("gram_upper launch"))?;
        s.clone_dtoh(&out).map_err(driver("copy from device"))
    }

    /// [`super::hadamard_rows`] on this device: `Ok(true)` with `x`
    /// rotated, or `Ok(false)` with `x` unchanged where the result holds a
    /// NaN (a GPU writes every NaN as the canonical one, where the CPU
    /// keeps an input NaN's sign and payload and writes inf − inf as
    /// −NaN, so those rows must come from the CPU for the same bytes).
    pub fn hadamard_rows(
        &self,
        x: &mut [f32],
        signs: &[f32],
        cols: usize,
        block: usize,
        signs_first: bool,
    ) -> Result<bool, GpuError> {
        if cols == 0
            || block == 0
            || !cols.is_multiple_of(block)
            || !x.len().is_multiple_of(cols)
            || signs.len() != cols
        {
            return Err(GpuError::Shape(format!(
                "{} values, {} signs, rows of {cols} in blocks of {block}",
                x.len(),
                signs.len()
            )));
        }
        let rows = (x.len() / cols) as i64;
        let (c, b) = (int(cols, "row length")?, int(block, "block")?);
        let norm = 1.0 / (block as f32).sqrt();
        let first = i32::from(signs_first);
        let s = &self.stream;
        let mut dx = s.clone_htod(&*x).map_err(driver("copy to device"))?;
        let ds = s.clone_htod(signs).map_err(driver("copy to device"))?;
        let threads = (x.len() / block) as u64;
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(threads.div_ceil(128)).map_err(|_| {
                    GpuError::Shape(format!("{threads} Hadamard blocks exceed one launch"))
                })?,
                1,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = s.launch_builder(&self.hadamard);
        launch
            .arg(&mut dx)
            .arg(&ds)
            .arg(&rows)
            .arg(&c)
            .arg(&b)
            .arg(&norm)
            .arg(&first);
        // SAFETY: the arguments match the kernel's signature; every thread
        // stays inside its row's block of `dx`.
        unsafe { launch.launch(cfg) }.map_err(driver("hadamard_rows launch"))?;
        let out = s.clone_dtoh(&dx).map_err(driver("copy from device"))?;
        if out.iter().any(|v| v.is_nan()) {
            return Ok(false);
        }
        x.copy_from_slice(&out);
        Ok(true)
    }

    /// [`super::uniform_tally`] on this device; `Ok(None)` where more
    /// codes lie beyond ±512 than it lists (the CPU pass then runs).
    pub fn uniform_tally(
        &self,
        x: &[f32],
        inv: f32,
        dz: f32,
        lo: &mut [u8],
    ) -> Result<Option<UniformTally>, GpuError> {
        if lo.len() != x.len() {
            return Err(GpuError::Shape(format!(
                "{} values and {} code bytes",
                x.len(),
                lo.len()
            )));
        }
        if x.is_empty() {
            return Ok(Some(UniformTally {
                hist: vec![0; 1025],
                sums: [0; OFFSETS],
                max_magnitude: 0,
                far: Vec::new(),
            }));
        }
        let n = x.len() as i64;
        let far_cap = x.len().min(FAR_CODES);
        let s = &self.stream;
        let dx = s.clone_htod(x).map_err(driver("copy to device"))?;
        let alloc = |what| driver(what);
        let mut dlo = s.alloc_zeros::<u8>(x.len()).map_err(alloc("allocation"))?;
        let mut hist = s.alloc_zeros::<u64>(1025).map_err(alloc("allocation"))?;
        let mut sums = s.alloc_zeros::<u64>(OFFSETS).map_err(alloc("allocation"))?;
        let mut max = s.alloc_zeros::<u32>(1).map_err(alloc("allocation"))?;
        let mut far = s.alloc_zeros::<i32>(far_cap).map_err(alloc("allocation"))?;
        let mut far_len = s.alloc_zeros::<u64>(1).map_err(alloc("allocation"))?;
        let cap = far_cap as i64;
        let blocks = u32::try_from((x.len() as u64).div_ceil(256))
            .map_err(|_| GpuError::Shape(format!("{n} values exceed one launch")))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = s.launch_builder(&self.uniform);
        launch
            .arg(&dx)
            .arg(&n)
            .arg(&inv)
            .arg(&dz)
            .arg(&mut dlo)
            .arg(&mut hist)
            .arg(&mut sums)
            .arg(&mut max)
            .arg(&mut far)
            .arg(&mut far_len)
            .arg(&cap);
        // SAFETY: the arguments match the kernel's signature; a thread
        // writes its own code byte and appends to `far` only below `cap`.
        unsafe { launch.launch(cfg) }.map_err(driver("uniform_tally launch"))?;
        let far_count = s.clone_dtoh(&far_len).map_err(driver("copy from device"))?[0];
        if far_count > far_cap as u64 {
            return Ok(None);
        }
        s.memcpy_dtoh(&dlo, lo)
            .map_err(driver("copy from device"))?;
        let sums = s.clone_dtoh(&sums).map_err(driver("copy from device"))?;
        let mut far = s.clone_dtoh(&far).map_err(driver("copy from device"))?;
        far.truncate(far_count as usize);
        Ok(Some(UniformTally {
            hist: s.clone_dtoh(&hist).map_err(driver("copy from device"))?,
            sums: std::array::from_fn(|i| sums[i] as i64),
            max_magnitude: s.clone_dtoh(&max).map_err(driver("copy from device"))?[0],
            far,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::gaussian_vec;

    fn device() -> Option<Gpu> {
        match Gpu::open(0) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("skipped: the GPU kernels need a CUDA device: {e}");
                None
            }
        }
    }

    /// The device's Gram matrix is the CPU's bit for bit, and so is the
    /// calibration Hessian built from it.
    #[test]
    fn gram_matches_the_cpu_bit_for_bit() {
        let Some(g) = device() else { return };
        for (rows, dim) in [(1, 1), (300, 17), (1024, 576), (777, 1536)] {
            let mut x = gaussian_vec(rows as u64 + 3, rows * dim);
            for (i, v) in x.iter_mut().enumerate() {
                if i % 7 == 0 {
                    *v *= 3000.0;
                }
            }
            let upper = g.gram_upper(&x, rows, dim).unwrap();
            for j in 0..dim {
                for i in 0..=j {
                    let want = crate::gram::entry(&x, dim, i, j);
                    assert_eq!(
                        upper[j * (j + 1) / 2 + i].to_bits(),
                        want.to_bits(),
                        "{i},{j}"
                    );
                }
            }
            let mut cpu = crate::hessian::HessianSum::new(dim);
            cpu.add_batch_on_cpu(&x, rows).unwrap();
            let mut gpu = crate::hessian::HessianSum::new(dim);
            gpu.add_batch(&x, rows).unwrap();
            assert_eq!(cpu, gpu, "{rows} × {dim}");
        }
    }

    /// Forward and inverse rotations and `uniform`'s codes equal the CPU's.
    #[test]
    fn hadamard_and_uniform_match_the_cpu_bit_for_bit() {
        let Some(g) = device() else { return };
        for (rows, cols, block) in [
            (3, 8, 8),
            (100, 384, 128),
            (64, 1536, 512),
            (16, 4096, 4096),
        ] {
            let x = gaussian_vec(cols as u64, rows * cols);
            let mut cpu = crate::Signal::new(x.clone(), rows, cols);
            let meta = crate::hadamard::forward_on_cpu(&mut cpu, Some(block), 11).unwrap();
            let signs = crate::hadamard::signs(11, cols);
            let mut gpu = x.clone();
            assert!(
                g.hadamard_rows(&mut gpu, &signs, cols, block, true)
                    .unwrap()
            );
            assert_eq!(gpu, cpu.data);
            crate::hadamard::inverse_on_cpu(&mut cpu.data, rows, cols, &meta).unwrap();
            assert!(
                g.hadamard_rows(&mut gpu, &signs, cols, block, false)
                    .unwrap()
            );
            assert_eq!(gpu, cpu.data);
        }
        // Two infinities in one block meet as inf − inf, a NaN: the
        // rotation goes back to the CPU with `x` untouched. One infinity a
        // block spreads as ±inf, which keeps its bits on the device.
        let mut x = gaussian_vec(9, 64 * 256);
        x[5] = f32::INFINITY;
        x[6] = f32::INFINITY;
        x[300] = f32::NEG_INFINITY;
        let signs = crate::hadamard::signs(3, 256);
        let mut gpu = x.clone();
        assert!(!g.hadamard_rows(&mut gpu, &signs, 256, 256, true).unwrap());
        assert_eq!(
            gpu.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        x[6] = 1.0;
        let mut gpu = x.clone();
        let mut cpu = crate::Signal::new(x.clone(), 64, 256);
        crate::hadamard::forward_on_cpu(&mut cpu, Some(256), 3).unwrap();
        assert!(g.hadamard_rows(&mut gpu, &signs, 256, 256, true).unwrap());
        assert_eq!(
            gpu.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            cpu.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let mut x = gaussian_vec(5, 100_003);
        x.extend([
            f32::NAN,
            f32::INFINITY,
            -f32::INFINITY,
            0.0,
            -0.0,
            3e38,
            -3e38,
        ]);
        for (inv, dz) in [(1.0f32, 0.0f32), (7.31, 0.17), (1e-3, 0.5), (900.0, 0.0)] {
            let mut cpu_lo = vec![0u8; x.len()];
            let cpu = crate::uniform::quantize_pass_on_cpu(&x, inv, dz, &mut cpu_lo);
            let mut lo = vec![0u8; x.len()];
            let t = g.uniform_tally(&x, inv, dz, &mut lo).unwrap().unwrap();
            assert_eq!(lo, cpu_lo, "inv {inv}");
            assert_eq!(crate::uniform::ChunkTally::from_device(t), cpu, "inv {inv}");
        }
    }
}
