//! The CUDA kernels' source compiled by the host's C++ compiler (with
//! `host_shim.h` standing in for CUDA's built-ins and `host_check.cpp`
//! running each launch grid thread by thread) and compared bit for bit
//! with the CPU path: the kernels' indexing and arithmetic are checked on
//! every machine, with or without a GPU.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::rng::{SplitMix64, gaussian_vec};

/// The helper program, built once per test run; `None` (with the reason
/// printed) where the machine has no C++ compiler.
fn helper() -> Option<&'static PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/gpu");
        let dir = std::env::temp_dir().join(format!("hcx-gpu-host-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let main = dir.join("main.cpp");
        std::fs::write(
            &main,
            "#include \"host_shim.h\"\n#include \"kernels.cu\"\n#include \"host_check.cpp\"\n",
        )
        .map_err(|e| format!("{}: {e}", main.display()))?;
        let exe = dir.join("host_check");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = Command::new(&cxx)
            .args(["-std=c++17", "-O2", "-ffp-contract=off", "-I"])
            .arg(&here)
            .arg(&main)
            .arg("-o")
            .arg(&exe)
            .output()
            .map_err(|e| format!("no C++ compiler ({cxx}): {e}"))?;
        if !out.status.success() {
            // A compiler that runs but refuses the source is a failure of
            // the source, not a missing tool.
            panic!(
                "{cxx} refused the kernels:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(exe)
    });
    match built {
        Ok(p) => Some(p),
        Err(why) => {
            eprintln!("skipped: the kernels' host check needs a C++ compiler: {why}");
            None
        }
    }
}

/// Runs one kernel through the helper: `args`, raw input, raw output.
fn run(args: &[String], input: &[u8]) -> Vec<u8> {
    let exe = helper().expect("checked by the caller");
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the host check");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("host check");
    writer.join().expect("writer").expect("write input");
    assert!(
        out.status.success(),
        "host check {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bits(v: f32) -> String {
    format!("{:x}", v.to_bits())
}

/// Values of every magnitude, with exact zeros.
fn inputs(seed: u64, n: usize) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..n)
        .map(|i| {
            let g = r.gaussian() as f32;
            match i % 9 {
                0 => g * 4000.0,
                1 => g * 1e-7,
                2 => 0.0,
                _ => g,
            }
        })
        .collect()
}

#[test]
fn gram_kernel_matches_the_cpu_bit_for_bit() {
    if helper().is_none() {
        return;
    }
    for (rows, dim) in [(0, 3), (1, 1), (5, 8), (61, 29), (200, 48)] {
        let x = inputs(rows as u64 * 31 + dim as u64, rows * dim);
        let out = run(
            &["gram".into(), rows.to_string(), dim.to_string()],
            &bytes_f32(&x),
        );
        let upper: Vec<f64> = out
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        assert_eq!(upper.len(), dim * (dim + 1) / 2);
        for j in 0..dim {
            for i in 0..=j {
                let want = if rows == 0 {
                    0.0
                } else {
                    crate::gram::entry(&x, dim, i, j)
                };
                assert_eq!(
                    upper[j * (j + 1) / 2 + i].to_bits(),
                    want.to_bits(),
                    "{rows} × {dim}: {i},{j}"
                );
            }
        }
        if rows > 0 {
            // The calibration sum built from the kernel's triangle is the
            // CPU's.
            let mut cpu = crate::hessian::HessianSum::new(dim);
            cpu.add_batch_on_cpu(&x, rows).unwrap();
            let mut from_kernel = crate::hessian::HessianSum::new(dim);
            from_kernel.add_upper_for_test(&upper, rows);
            assert_eq!(from_kernel, cpu);
        }
    }
}

#[test]
fn hadamard_kernel_matches_the_cpu_bit_for_bit() {
    if helper().is_none() {
        return;
    }
    for (rows, cols, block) in [
        (3, 2, 2),
        (5, 12, 4),
        (4, 384, 128),
        (3, 1536, 512),
        (2, 64, 64),
    ] {
        let mut x = inputs(cols as u64, rows * cols);
        if rows * cols >= 64 {
            // One infinity in a block, and two (which meet as inf − inf).
            x[1] = f32::INFINITY;
            x[rows * cols - 2] = f32::NEG_INFINITY;
            x[rows * cols - 1] = f32::INFINITY;
        }
        let signs = crate::hadamard::signs(7, cols);
        let norm = 1.0 / (block as f32).sqrt();
        let mut input = bytes_f32(&x);
        input.extend(bytes_f32(&signs));
        let args = |first: bool| {
            vec![
                "hadamard".into(),
                rows.to_string(),
                cols.to_string(),
                block.to_string(),
                bits(norm),
                u8::from(first).to_string(),
            ]
        };
        let forward = run(&args(true), &input);
        let mut cpu = crate::Signal::new(x.clone(), rows, cols);
        let meta = crate::hadamard::forward_on_cpu(&mut cpu, Some(block), 7).unwrap();
        assert_eq!(
            forward,
            bytes_f32(&cpu.data),
            "forward {rows} × {cols} / {block}"
        );
        let mut back_in = forward.clone();
        back_in.extend(bytes_f32(&signs));
        let back = run(&args(false), &back_in);
        crate::hadamard::inverse_on_cpu(&mut cpu.data, rows, cols, &meta).unwrap();
        assert_eq!(
            back,
            bytes_f32(&cpu.data),
            "inverse {rows} × {cols} / {block}"
        );
    }
}

fn words<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes
        .chunks_exact(N)
        .map(|c| c.try_into().expect("whole words"))
}

/// Runs the quantizing pass through the helper, listing at most `far_cap`
/// codes beyond ±512: the codes' low bytes, the tally, and how many codes
/// lay beyond.
fn uniform_on_host(
    x: &[f32],
    inv: f32,
    dz: f32,
    far_cap: usize,
) -> (Vec<u8>, crate::gpu::UniformTally, u64) {
    let n = x.len();
    let out = run(
        &[
            "uniform".into(),
            n.to_string(),
            bits(inv),
            bits(dz),
            far_cap.to_string(),
        ],
        &bytes_f32(x),
    );
    let (lo, rest) = out.split_at(n);
    let (hist, rest) = rest.split_at(1025 * 8);
    let (sums, rest) = rest.split_at(crate::uniform::OFFSETS * 8);
    let (max, rest) = rest.split_at(4);
    let (far_len, far) = rest.split_at(8);
    let far_len = u64::from_le_bytes(far_len.try_into().expect("8 bytes"));
    let mut far: Vec<i32> = words::<4>(far).map(i32::from_le_bytes).collect();
    assert_eq!(far.len(), far_cap);
    far.truncate(far_len.min(far_cap as u64) as usize);
    let sums: Vec<i64> = words::<8>(sums).map(i64::from_le_bytes).collect();
    let tally = crate::gpu::UniformTally {
        hist: words::<8>(hist).map(u64::from_le_bytes).collect(),
        sums: sums.try_into().expect("8 sums"),
        max_magnitude: u32::from_le_bytes(max.try_into().expect("4 bytes")),
        far,
    };
    (lo.to_vec(), tally, far_len)
}

#[test]
fn uniform_kernel_matches_the_cpu_bit_for_bit() {
    if helper().is_none() {
        return;
    }
    let mut x = gaussian_vec(3, 5000);
    x.extend([
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        3e38,
        -3e38,
        0.5,
        -0.5,
        1.5,
        f32::MIN_POSITIVE,
    ]);
    // Narrow codes, codes past ±127 (two bytes), past ±512 (listed apart)
    // and past ±32767 (too wide for the stage).
    for (inv, dz) in [
        (1.0f32, 0.0f32),
        (7.31, 0.17),
        (1e-3, 0.5),
        (2.0, 0.25),
        (300.0, 0.0),
        (1e5, 0.1),
    ] {
        let (lo, tally, far_len) = uniform_on_host(&x, inv, dz, x.len());
        assert_eq!(far_len as usize, tally.far.len());
        let mut cpu_lo = vec![0u8; x.len()];
        let cpu = crate::uniform::quantize_pass_on_cpu(&x, inv, dz, &mut cpu_lo);
        assert_eq!(lo, cpu_lo, "inv {inv}, dz {dz}");
        assert_eq!(
            crate::uniform::ChunkTally::from_device(tally),
            cpu,
            "inv {inv}, dz {dz}"
        );
    }
    // More codes beyond ±512 than the list holds: the count says so.
    let (_, tally, far_len) = uniform_on_host(&x, 1e5, 0.0, 10);
    assert_eq!(tally.far.len(), 10);
    assert!(far_len > 10);
}
