//! Encode and decode throughput of every codec on a 4096 × 4096 Gaussian f32
//! tensor (64 MiB), on one thread and on all cores. Throughput is in bytes
//! of f32 input per second. Each codec is called directly (no chain, no
//! verification decode). SeedLM searches all 65,535 seeds per block, so it
//! runs on the first 16 rows (256 KiB) and reports the same unit.
//!
//! `cargo bench --bench codecs` (figures in docs/PERFORMANCE.md).

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hcx_kernels::rng::gaussian_vec;
use hcx_kernels::{
    Part, Parts, Signal, cast, entropy, gptq, hadamard, hessian, lowrank, nonuniform, rtn, seedlm,
    sparse, ternary, uniform, vq,
};
use hcx_protocol::stage::*;

const N: usize = 4096;

type Enc = Box<dyn Fn(&Signal) -> (serde_json::Value, Vec<Part>) + Sync>;
type Dec = Box<dyn Fn(&serde_json::Value, &Parts, usize, usize) -> Vec<f32> + Sync>;
/// A codec's decoder, as every codec module spells it.
type DecodeFn =
    fn(&serde_json::Value, &Parts, usize, usize) -> Result<Vec<f32>, hcx_kernels::KernelError>;

fn codecs() -> Vec<(&'static str, usize, Enc, Dec)> {
    fn q<S: Sync + 'static>(
        spec: S,
        enc: fn(&S, &Signal) -> Result<hcx_kernels::Coded, hcx_kernels::KernelError>,
    ) -> Enc {
        Box::new(move |x| {
            let c = enc(&spec, x).expect("encode");
            (c.meta, c.parts)
        })
    }
    fn d(dec: DecodeFn) -> Dec {
        Box::new(move |m, p, r, c| dec(m, p, r, c).expect("decode"))
    }
    // SeedLM at 4 bits per weight (C = 8, P = 3), on 16 rows.
    let seedlm_4bit = |name, basis| -> (&'static str, usize, Enc, Dec) {
        let spec = SeedlmSpec {
            block: 8,
            coefficients: 3,
            coefficient_bits: 4,
            exponent_bits: 4,
            basis,
        };
        (
            name,
            16,
            q(spec, |s, x| seedlm::encode(s, x, 1)),
            d(seedlm::decode),
        )
    };
    let rtn8 = RtnSpec {
        bits: 8,
        group: None,
        symmetric: true,
        search: false,
    };
    vec![
        (
            "cast-f16",
            N,
            q(
                CastSpec {
                    dtype: CastDtype::F16,
                },
                cast::encode,
            ),
            d(cast::decode),
        ),
        (
            "rtn-int8-row",
            N,
            q(rtn8.clone(), rtn::encode),
            d(rtn::decode),
        ),
        (
            "rtn-int8-g32",
            N,
            q(
                RtnSpec {
                    bits: 8,
                    group: Some(32),
                    symmetric: true,
                    search: false,
                },
                rtn::encode,
            ),
            d(rtn::decode),
        ),
        (
            "rtn-int4-g32",
            N,
            q(
                RtnSpec {
                    bits: 4,
                    group: Some(32),
                    symmetric: true,
                    search: false,
                },
                rtn::encode,
            ),
            d(rtn::decode),
        ),
        (
            "rtn-int4-g128-asym-search",
            N,
            q(
                RtnSpec {
                    bits: 4,
                    group: Some(128),
                    symmetric: false,
                    search: true,
                },
                rtn::encode,
            ),
            d(rtn::decode),
        ),
        (
            "uniform-4.4",
            N,
            q(
                UniformSpec {
                    bits: 4.4,
                    deadzone: 0.0,
                },
                uniform::encode,
            ),
            d(uniform::decode),
        ),
        (
            "nonuniform-4-g128",
            N,
            q(
                NonuniformSpec {
                    bits: 4,
                    group: 128,
                    levels: LevelSource::LloydMax,
                },
                nonuniform::encode,
            ),
            d(nonuniform::decode),
        ),
        (
            "ternary-g128",
            N,
            q(TernarySpec { group: Some(128) }, ternary::encode),
            d(ternary::decode),
        ),
        (
            "vq-d2-k8",
            N,
            Box::new(|x| {
                let c = vq::encode(
                    &VqSpec {
                        dim: 2,
                        bits: 8,
                        residual: false,
                        iterations: 20,
                    },
                    x,
                    1,
                )
                .expect("encode");
                (c.meta, c.parts)
            }),
            d(vq::decode),
        ),
        seedlm_4bit("seedlm-c8-p3-4bit", SeedlmBasis::Bits),
        seedlm_4bit("seedlm-c8-p3-4bit-lfsr", SeedlmBasis::Lfsr),
    ]
}

fn group(
    c: &mut Criterion,
    name: String,
    bytes: usize,
) -> criterion::BenchmarkGroup<'_, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Bytes(bytes as u64));
    g
}

fn bench_codecs(c: &mut Criterion) {
    let data = gaussian_vec(42, N * N);
    for (label, threads) in [("1-thread", 1usize), ("all-cores", 0)] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        for (name, rows, enc, dec) in codecs() {
            let x = Signal::new(data[..rows * N].to_vec(), rows, N);
            let (meta, parts) = pool.install(|| enc(&x));
            let parts = Parts::new(parts);
            let mut g = group(c, format!("{name}/{label}"), rows * N * 4);
            g.bench_function("encode", |b| b.iter(|| pool.install(|| enc(&x))));
            g.bench_function("decode", |b| {
                b.iter(|| pool.install(|| dec(&meta, &parts, rows, N)))
            });
            g.finish();
        }
        let x = Signal::new(data.clone(), N, N);
        let mut g = group(c, format!("lowrank-64/{label}"), N * N * 4);
        let lr = LowrankSpec {
            rank: Some(64),
            rank_fraction: None,
            energy: None,
            keep_residual: true,
        };
        g.bench_function("encode", |b| {
            b.iter(|| pool.install(|| lowrank::encode(&lr, &x, 1).expect("encode")))
        });
        g.finish();
        let mut g = group(c, format!("sparse-2:4/{label}"), N * N * 4);
        let sp = SparseSpec {
            pattern: SparsePattern::TwoFour,
            density: 0.5,
        };
        g.bench_function("encode", |b| {
            b.iter(|| pool.install(|| sparse::encode(&sp, &x, 1).expect("encode")))
        });
        g.finish();
        let mut g = group(c, format!("hadamard/{label}"), N * N * 4);
        g.bench_function("forward", |b| {
            b.iter(|| {
                let mut s = x.clone();
                pool.install(|| hadamard::forward(&mut s, None, 3))
                    .expect("rotate")
            })
        });
        g.finish();
        // Calibration: the exact Hessian of 4,096 input rows of 1,536 (a
        // SmolLM2 down_proj input), and GPTQ of a 576 × 1,536 weight.
        let (rows, cols, n) = (576, 1536, 4096);
        let inputs = gaussian_vec(7, n * cols);
        let mut g = group(c, format!("hessian-4096x1536/{label}"), n * cols * 4);
        g.bench_function("add_batch", |b| {
            b.iter(|| {
                let mut h = hessian::HessianSum::new(cols);
                pool.install(|| h.add_batch(&inputs, n)).expect("hessian");
                h
            })
        });
        g.finish();
        let mut hs = hessian::HessianSum::new(cols);
        hs.add_batch(&inputs, n).expect("hessian");
        let h = hs.to_f64();
        let w = Signal::new(gaussian_vec(8, rows * cols), rows, cols);
        let spec = GptqSpec {
            grid: GptqGrid::Uniform(UniformSpec {
                bits: 4.0,
                deadzone: 0.0,
            }),
            damp: 0.01,
            block: 128,
            act_order: true,
        };
        let mut g = group(c, format!("gptq-uniform-576x1536/{label}"), rows * cols * 4);
        g.bench_function("encode", |b| {
            b.iter(|| pool.install(|| gptq::encode(&spec, &w, &h)).expect("gptq"))
        });
        g.finish();
        // The 4-bit example's whole chain as a node runs it on one tensor:
        // Hadamard rotation, the uniform grid at 4.4 bits, rANS, and the
        // verifying decode; then the decoder alone.
        let chain = vec![
            StageSpec::Hadamard(HadamardSpec::default()),
            StageSpec::Uniform(UniformSpec {
                bits: 4.4,
                deadzone: 0.0,
            }),
            StageSpec::Rans(RansSpec {}),
        ];
        let enc = |x: Vec<f32>| {
            hcx_kernels::chain::encode_tensor("bench.weight", x, &[N, N], &chain, 1, 4)
                .expect("chain")
        };
        let coded = pool.install(|| enc(data.clone()));
        let mut g = group(
            c,
            format!("chain-hadamard-uniform-4.4-rans/{label}"),
            N * N * 4,
        );
        // The tensor is copied outside the timing: the chain takes it by value.
        g.bench_function("encode", |b| {
            b.iter_batched(
                || data.clone(),
                |x| pool.install(|| enc(x)),
                criterion::BatchSize::PerIteration,
            )
        });
        g.bench_function("decode", |b| {
            b.iter(|| {
                pool.install(|| {
                    hcx_kernels::chain::decode_tensor(&coded.steps, coded.parts.clone(), &[N, N])
                        .expect("decode")
                })
            })
        });
        g.finish();
        if threads != 1 {
            continue; // zstd runs on one thread per part
        }
        let codes: Vec<u8> = data
            .iter()
            .map(|v| (v * 4.0).round().clamp(-127.0, 127.0) as i8 as u8)
            .collect();
        let mut g = group(c, format!("zstd-codes/{label}"), codes.len());
        for level in [3, 19] {
            g.bench_function(format!("encode-level{level}"), |b| {
                b.iter(|| {
                    let mut p = vec![Part::bytes("c", codes.clone())];
                    entropy::encode(level, &mut p).expect("zstd")
                })
            });
        }
        g.finish();
        // The same codes through rANS: encode, decode, and its rate
        // against the codes' empirical entropy (printed once).
        let stream = hcx_kernels::rans::encode(&codes);
        let h = hcx_kernels::rans::entropy_bits(&hcx_kernels::rans::histogram(&codes));
        println!(
            "rans-codes: {:.4} bits per code against an entropy of {:.4} (+{:.4})",
            stream.len() as f64 * 8.0 / codes.len() as f64,
            h,
            stream.len() as f64 * 8.0 / codes.len() as f64 - h
        );
        let mut g = group(c, format!("rans-codes/{label}"), codes.len());
        g.bench_function("encode", |b| b.iter(|| hcx_kernels::rans::encode(&codes)));
        g.bench_function("decode", |b| {
            b.iter(|| hcx_kernels::rans::decode(&stream, codes.len()).expect("rans"))
        });
        g.finish();
    }
}

/// The GPU kernels on device 0, built with `--features cuda` on a machine
/// with a device (`cargo bench --features cuda --bench codecs -- gpu`):
/// the calibration Gram matrix of 4,096 rows × 1,536 and the Hadamard
/// rotation of the 64 MiB tensor, each with its copies to the device and
/// back. Elsewhere the group says why it is skipped.
fn bench_gpu(c: &mut Criterion) {
    #[cfg(feature = "cuda")]
    {
        let gpu = match hcx_kernels::gpu::Gpu::open(0) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("gpu: skipped: {e}");
                return;
            }
        };
        let (n, cols) = (4096, 1536);
        let inputs = gaussian_vec(7, n * cols);
        eprintln!("gpu: {}", gpu.describe());
        let mut g = group(c, "gpu".into(), n * cols * 4);
        g.bench_function("gram-4096x1536", |b| {
            b.iter(|| gpu.gram_upper(&inputs, n, cols).expect("gram"))
        });
        let x = gaussian_vec(1, N * N);
        let signs: Vec<f32> = (0..N)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        g.throughput(Throughput::Bytes((N * N * 4) as u64));
        g.bench_function("hadamard-4096x4096", |b| {
            b.iter(|| {
                let mut s = x.clone();
                gpu.hadamard_rows(&mut s, &signs, N, N, true)
                    .expect("rotate");
                s
            })
        });
        g.finish();
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = c;
        eprintln!("gpu: skipped: this build has no `cuda` feature");
    }
}

criterion_group!(benches, bench_codecs, bench_gpu);
criterion_main!(benches);
