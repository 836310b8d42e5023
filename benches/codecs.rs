//! Encode and decode throughput of every codec on a 4096 × 4096 Gaussian f32
//! tensor (64 MiB), on one thread and on all cores. Throughput is reported
//! in bytes of f32 input per second. SeedLM searches all 65,535 seeds per
//! block, so it runs on the first 16 rows (256 KiB) and reports the same unit.
//!
//! `cargo bench --bench codecs` (figures in docs/PERFORMANCE.md).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hcx_kernels::rng::gaussian_vec;
use hcx_kernels::{Parts, Signal, chain, entropy, hadamard};
use hcx_protocol::stage::*;

const N: usize = 4096;

fn stages() -> Vec<(&'static str, Vec<StageSpec>, usize)> {
    let rtn4 = StageSpec::Rtn(RtnSpec {
        bits: 4,
        group: Some(128),
        symmetric: true,
        search: false,
    });
    vec![
        (
            "rtn-int8-row",
            vec![StageSpec::Rtn(RtnSpec {
                bits: 8,
                group: None,
                symmetric: true,
                search: false,
            })],
            N,
        ),
        ("rtn-int4-g128", vec![rtn4.clone()], N),
        (
            "rtn-int4-g128-search",
            vec![StageSpec::Rtn(RtnSpec {
                bits: 4,
                group: Some(128),
                symmetric: false,
                search: true,
            })],
            N,
        ),
        (
            "uniform-4.4",
            vec![
                StageSpec::Uniform(UniformSpec {
                    bits: 4.4,
                    deadzone: 0.0,
                }),
                StageSpec::Zstd(ZstdSpec { level: 3 }),
            ],
            N,
        ),
        (
            "nonuniform-4-g128",
            vec![StageSpec::Nonuniform(NonuniformSpec {
                bits: 4,
                group: 128,
                levels: LevelSource::LloydMax,
            })],
            N,
        ),
        (
            "ternary-g128",
            vec![StageSpec::Ternary(TernarySpec { group: Some(128) })],
            N,
        ),
        (
            "vq-d2-k8",
            vec![StageSpec::Vq(VqSpec {
                dim: 2,
                bits: 8,
                residual: false,
                iterations: 10,
            })],
            N,
        ),
        (
            "seedlm-c8-p3",
            vec![StageSpec::Seedlm(SeedlmSpec {
                block: 8,
                coefficients: 3,
                coefficient_bits: 4,
                exponent_bits: 4,
            })],
            16,
        ),
        (
            "lowrank-64",
            vec![StageSpec::Lowrank(LowrankSpec {
                rank: Some(64),
                rank_fraction: None,
                energy: None,
                keep_residual: false,
            })],
            N,
        ),
        (
            "sparse-2:4+rtn8",
            vec![
                StageSpec::Sparse(SparseSpec {
                    pattern: SparsePattern::TwoFour,
                    density: 0.5,
                }),
                StageSpec::Rtn(RtnSpec {
                    bits: 8,
                    group: None,
                    symmetric: true,
                    search: false,
                }),
            ],
            N,
        ),
    ]
}

fn bench_codecs(c: &mut Criterion) {
    let data = gaussian_vec(42, N * N);
    let pools = [("1-thread", 1usize), ("all-cores", 0)];
    for (label, threads) in pools {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        for (name, chain_spec, rows) in stages() {
            let x = data[..rows * N].to_vec();
            let mut g = c.benchmark_group(format!("{name}/{label}"));
            g.sample_size(10);
            g.throughput(Throughput::Bytes((rows * N * 4) as u64));
            let encoded = pool
                .install(|| chain::encode_tensor("bench", x.clone(), &[rows, N], &chain_spec, 1, 4))
                .expect("encode");
            g.bench_function("encode", |b| {
                b.iter(|| {
                    pool.install(|| {
                        chain::encode_tensor("bench", x.clone(), &[rows, N], &chain_spec, 1, 4)
                    })
                    .expect("encode")
                })
            });
            g.bench_function("decode", |b| {
                b.iter(|| {
                    pool.install(|| {
                        chain::decode_tensor(&encoded.steps, encoded.parts.clone(), &[rows, N])
                    })
                    .expect("decode")
                })
            });
            g.finish();
        }
        // Lossless stages on their own.
        let mut g = c.benchmark_group(format!("hadamard/{label}"));
        g.sample_size(10);
        g.throughput(Throughput::Bytes((N * N * 4) as u64));
        g.bench_function("forward", |b| {
            b.iter(|| {
                let mut s = Signal::new(data.clone(), N, N);
                pool.install(|| hadamard::forward(&mut s, None, 3))
                    .expect("rotate")
            })
        });
        g.finish();
        let codes: Vec<u8> = data
            .iter()
            .map(|v| (v * 4.0).round().clamp(-127.0, 127.0) as i8 as u8)
            .collect();
        let mut g = c.benchmark_group(format!("zstd-codes/{label}"));
        g.sample_size(10);
        g.throughput(Throughput::Bytes(codes.len() as u64));
        g.bench_function("encode-level3", |b| {
            b.iter(|| {
                let mut p = vec![hcx_kernels::Part::bytes("c", codes.clone())];
                entropy::encode(3, &mut p).expect("zstd")
            })
        });
        g.finish();
    }
    let _ = Parts::default();
}

criterion_group!(benches, bench_codecs);
criterion_main!(benches);
