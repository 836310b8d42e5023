//! The real model end to end: run, determinism, ratio and quality targets,
//! decompress, and embedding quality.

mod common;

use common::*;

fn inspect_encoder(artifact: &std::path::Path) -> serde_json::Value {
    let out = hcx_ok(&[
        "inspect",
        artifact.to_str().unwrap(),
        "--json",
        "--match",
        "encoder.layer.*.weight",
    ]);
    serde_json::from_str(&out).unwrap()
}

fn encoder_linear_totals(ins: &serde_json::Value) -> (f64, f64, u64) {
    // The 36 linear weights: `--match` also catches LayerNorm weights (exact, so they do
    // not enter the SQNR mean), so bits per weight are recomputed from the rows.
    let mut bytes = 0u64;
    let mut params = 0u64;
    let mut wsum = 0.0;
    let mut n = 0;
    for t in ins["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        if hcx_eval::is_encoder_linear_weight(name) {
            let p = t["params"].as_u64().unwrap();
            bytes += t["bytes"].as_u64().unwrap();
            params += p;
            wsum += t["sqnr_db"].as_f64().unwrap() * p as f64;
            n += 1;
        }
    }
    assert_eq!(n, 36);
    (
        8.0 * bytes as f64 / params as f64,
        wsum / params as f64,
        params,
    )
}

#[test]
fn minilm_4bit_meets_its_targets_and_is_deterministic() {
    let model = minilm();
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let b = t.path().join("b");
    let job = example_job(t.path(), "minilm-4bit", &model, &a);
    let summary = hcx_ok(&["run", job.to_str().unwrap()]);
    assert!(
        summary.contains("bits per weight") && summary.contains("| hadamard |"),
        "{summary}"
    );
    // The second run on one thread: rayon's split of the work must not
    // change a byte.
    let one_thread = std::process::Command::new(env!("CARGO_BIN_EXE_hcx-cluster"))
        .args([
            "run",
            job.to_str().unwrap(),
            "--output",
            b.to_str().unwrap(),
        ])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        one_thread.status.success(),
        "{}",
        String::from_utf8_lossy(&one_thread.stderr)
    );

    // Determinism: every artifact byte but run times, all cores against one.
    let fa = read_dir_bytes(&a);
    let fb = read_dir_bytes(&b);
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (name, bytes) in &fa {
        if name.starts_with("attribution") {
            continue;
        }
        assert!(bytes == &fb[name], "{name} differs between two runs");
    }
    let mut ja: serde_json::Value = serde_json::from_slice(&fa["attribution.json"]).unwrap();
    let mut jb: serde_json::Value = serde_json::from_slice(&fb["attribution.json"]).unwrap();
    without_times(&mut ja);
    without_times(&mut jb);
    assert_eq!(ja, jb);
    // The charts draw no times: the same bytes from both runs.
    assert!(fa["attribution.svg"].starts_with(b"<svg"));
    assert!(
        fa["attribution.svg"] == fb["attribution.svg"],
        "attribution.svg differs"
    );

    // Sizes and quality of the 36 encoder linear weights.
    let ins = inspect_encoder(&a);
    let (bpw, sqnr, params) = encoder_linear_totals(&ins);
    eprintln!(
        "minilm-4bit: {bpw:.3} bits per weight over {params} parameters, mean SQNR {sqnr:.2} dB, ratio {}",
        ins["ratio"]
    );
    assert!(bpw <= 4.5, "{bpw} bits per weight");
    assert!(sqnr >= 24.7, "{sqnr} dB");
    // The whole-model ratio counts every file byte.
    let on_disk: u64 = ["model.hcx.safetensors", "hcx-manifest.json"]
        .iter()
        .map(|f| std::fs::metadata(a.join(f)).unwrap().len())
        .sum();
    assert_eq!(ins["artifact_bytes"].as_u64().unwrap(), on_disk);
    let src = std::fs::metadata(model.join("model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(ins["source_bytes"].as_u64().unwrap(), src);

    // Decompress and compare with the original: tensor SQNR agrees with the
    // manifest, embeddings stay close.
    let dense = t.path().join("dense");
    hcx_ok(&[
        "decompress",
        a.to_str().unwrap(),
        "--output",
        dense.to_str().unwrap(),
    ]);
    assert!(dense.join("config.json").is_file() && dense.join("tokenizer.json").is_file());
    let cmp = hcx_eval::compare_tensors(&model, &dense).unwrap();
    let measured = cmp
        .weighted_mean_sqnr(hcx_eval::is_encoder_linear_weight)
        .unwrap();
    assert!(
        (measured - sqnr).abs() < 0.05,
        "decompressed {measured} dB vs manifest {sqnr} dB"
    );
    let cos = eval_cosine(&model, &a);
    eprintln!("minilm-4bit: mean embedding cosine {cos:.5}");
    assert!(cos >= 0.985, "{cos}");
}

#[test]
fn minilm_int8_keeps_embeddings() {
    let model = minilm();
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let job = example_job(t.path(), "minilm-int8", &model, &a);
    hcx_ok(&["run", job.to_str().unwrap()]);
    let (bpw, sqnr, _) = encoder_linear_totals(&inspect_encoder(&a));
    eprintln!("minilm-int8: {bpw:.3} bits per weight, {sqnr:.2} dB");
    assert!(bpw <= 8.04, "{bpw} bits per weight");
    assert!(sqnr >= 44.55, "{sqnr} dB");
    let dense = t.path().join("dense");
    hcx_ok(&[
        "decompress",
        a.to_str().unwrap(),
        "--output",
        dense.to_str().unwrap(),
    ]);
    let e = hcx_eval::embedding_cosine(&model, &dense, &hcx_eval::default_sentences()).unwrap();
    eprintln!("minilm-int8: mean embedding cosine {:.6}", e.mean_cosine);
    assert!(e.mean_cosine >= 0.9995, "{}", e.mean_cosine);
}

/// Runs `hcx-cluster ARGS` (stdout to a file) and returns the CPU seconds
/// (user and system) and the peak resident bytes of that process alone.
fn run_measured(args: &[&str], stdout: &std::path::Path) -> (f64, u64) {
    // Reaped by wait4 below, which also reports the child's own usage.
    #[allow(clippy::zombie_processes)]
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_hcx-cluster"))
        .args(args)
        .stdout(std::fs::File::create(stdout).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: a zeroed rusage for wait4 to fill, for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for the child spawned above, which std has not reaped.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{args:?} failed"
    );
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    (
        tv(usage.ru_utime) + tv(usage.ru_stime),
        usage.ru_maxrss as u64 * 1024,
    )
}

// Measured on the 4-bit example (2 cores): artifact 18.25 MB estimated
// within 0.3 %, bits per weight within 0.1 %, the run's 4.1 CPU-seconds
// estimated at 3.5 (−13 %); the dry run itself takes 0.8 s.
#[test]
fn a_dry_run_estimates_size_and_time_within_25_percent_and_runs_nothing() {
    let model = minilm();
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let job = example_job(t.path(), "minilm-4bit", &model, &a);
    let dry_run = || -> serde_json::Value {
        serde_json::from_str(&hcx_ok(&[
            "run",
            "--local",
            "--dry-run",
            "--json",
            job.to_str().unwrap(),
        ]))
        .unwrap()
    };
    let dry = dry_run();
    assert!(!a.exists(), "a dry run wrote {}", a.display());
    let est = &dry["estimate"];
    // The plan is the leader's: one shard per layer, embeddings and pooler
    // on their own, every tensor in one.
    let shards = dry["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 8, "{shards:?}");
    let placed: u64 = shards.iter().map(|s| s["tensors"].as_u64().unwrap()).sum();
    assert_eq!(placed as usize, est["tensors"].as_array().unwrap().len());
    assert!(
        shards
            .iter()
            .all(|s| s["node"] == "node-1" && s["peak_memory_bytes"].as_u64().unwrap() > 0)
    );

    let (cpu, rss) = run_measured(
        &["run", "--local", job.to_str().unwrap()],
        &t.path().join("run.out"),
    );
    // CPU time grows when the other test beside this one loads the
    // machine's caches and cores: each figure is the least of two, the
    // dry run and the run taken in turn, so that both meet the same load.
    let again = dry_run();
    let (cpu_again, _) = run_measured(
        &[
            "run",
            "--local",
            job.to_str().unwrap(),
            "--output",
            t.path().join("again").to_str().unwrap(),
        ],
        &t.path().join("again.out"),
    );
    eprintln!("peak resident {rss} bytes");
    assert_estimates_within_25_percent(&dry, &again, &a, cpu.min(cpu_again));
}

/// A dry run's artifact bytes, bits per weight and CPU-seconds (the least
/// of two dry runs, `dry` and `again`) lie within 25 % of the real run's
/// artifact at `artifact` and its least CPU-seconds `cpu`.
fn assert_estimates_within_25_percent(
    dry: &serde_json::Value,
    again: &serde_json::Value,
    artifact: &std::path::Path,
    cpu: f64,
) {
    let est = &dry["estimate"];
    let ins = inspect_encoder(artifact);
    let real_bytes = ins["artifact_bytes"].as_f64().unwrap();
    let real_bpw = ins["compressed"]["bits_per_weight"].as_f64().unwrap();
    let est_bytes = est["artifact_bytes"].as_f64().unwrap();
    let est_bpw = est["bits_per_weight"].as_f64().unwrap();
    let est_cpu = est["cpu_seconds"]
        .as_f64()
        .unwrap()
        .min(again["estimate"]["cpu_seconds"].as_f64().unwrap());
    eprintln!(
        "artifact {est_bytes} estimated, {real_bytes} real; {est_bpw:.3} / {real_bpw:.3} bits per weight; {est_cpu:.2} / {cpu:.2} CPU-seconds; walk {}",
        est["walk"]
    );
    let within = |est: f64, real: f64| (est / real - 1.0).abs() <= 0.25;
    assert!(within(est_bytes, real_bytes), "{est_bytes} vs {real_bytes}");
    assert!(within(est_bpw, real_bpw), "{est_bpw} vs {real_bpw}");
    assert!(
        within(est_cpu, cpu),
        "{est_cpu} CPU-seconds estimated, {cpu} real"
    );
}

/// A calibrated and distilled MiniLM job, small enough for the suite:
/// 2-bit GPTQ over 48 sentences, 24 distillation steps of the norms,
/// biases and per-row and per-column gains (corrections the estimate must
/// size too). `parallel` is the calibration's split.
fn small_distill_job(
    dir: &std::path::Path,
    output: &std::path::Path,
    parallel: &str,
) -> std::path::PathBuf {
    let sentences = common::root().join("configs/calibration/sentences.txt");
    let body = format!(
        "pipeline:\n  - hadamard: {{}}\n  - gptq: {{grid: {{uniform: {{bits: 2.52}}}}}}\n  - zstd: {{level: 19}}\nrules:\n  - match: [\"*LayerNorm*\", \"*.bias\"]\n    keep: source\n  - match: [\"embeddings.*\", \"pooler.*\"]\n    keep: int8\ncalibration:\n  sentences: {}\n  samples: 48\n  seq_len: 128\n  parallel: {parallel}\ndistill:\n  steps: 24\n  lr: 0.001\n  batch: 16\n  params: [norms, offsets, scales]\n",
        sentences.display()
    );
    common::write_job(
        dir,
        &format!("small-distill-{parallel}"),
        &minilm(),
        output,
        &body,
    )
}

// Measured (2 cores, debug profile with optimised kernels): 47.2
// CPU-seconds estimated for a run of 45.8 (48.0 for 47.6 beside another
// calibrated test), 15.86 MB for 15.87 MB, 5.538 bits per weight for
// 5.541; the walk is measured on block 0 over 44 of the 48 sentences
// (1,034 token rows); the dry run takes 6 s and the test 75 s.
#[test]
fn a_calibrated_dry_run_estimates_the_walk_within_25_percent() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let job = small_distill_job(t.path(), &a, "data");
    let dry_run = |nodes: &str, job: &std::path::Path| -> serde_json::Value {
        let mut args = vec!["run", "--dry-run", "--json", job.to_str().unwrap()];
        if nodes == "local" {
            args.push("--local");
        } else {
            args.extend(["--nodes", nodes]);
        }
        serde_json::from_str(&hcx_ok(&args)).unwrap()
    };
    let dry = dry_run("local", &job);
    assert!(!a.exists(), "a dry run wrote {}", a.display());
    let walk = &dry["estimate"]["walk"];
    assert_eq!(walk["blocks"], 6, "{walk}");
    assert_eq!(walk["micro_batches"], 48, "{walk}");
    assert_eq!(walk["plain_passes"], 2, "{walk}");
    for k in [
        "load_cpu_seconds",
        "forward_cpu_seconds",
        "encode_cpu_seconds",
        "distill_cpu_seconds",
        "distill_steps_cpu_seconds",
    ] {
        assert!(walk[k].as_f64().unwrap() > 0.0, "{k}: {walk}");
    }
    // Every weight of the blocks is GPTQ-encoded and corrected.
    let tensors = dry["estimate"]["tensors"].as_array().unwrap();
    let corrected = tensors
        .iter()
        .filter(|t| t["chain"] == "hadamard→gptq→zstd→correction")
        .count();
    assert_eq!(corrected, 36, "{tensors:?}");
    assert!(walk["correction_bytes"].as_u64().unwrap() > 36 * 2 * (384 + 384));

    let (cpu, _) = run_measured(
        &["run", "--local", job.to_str().unwrap()],
        &t.path().join("run.out"),
    );
    let again = dry_run("local", &job);
    let (cpu_again, _) = run_measured(
        &[
            "run",
            "--local",
            job.to_str().unwrap(),
            "--output",
            t.path().join("again").to_str().unwrap(),
        ],
        &t.path().join("again.out"),
    );
    assert_estimates_within_25_percent(&dry, &again, &a, cpu.min(cpu_again));

    // On three nodes the job is one group: three ranks, each walking a
    // third of the micro-batches and encoding every block, so each
    // rank's CPU-seconds lie between a third and the whole of one
    // process's walk; split by layer, each stage walks its own blocks and
    // the stages follow one another.
    let walk_cpu = |d: &serde_json::Value| {
        let w = &d["estimate"]["walk"];
        [
            "load_cpu_seconds",
            "forward_cpu_seconds",
            "encode_cpu_seconds",
            "distill_cpu_seconds",
            "end_to_end_cpu_seconds",
        ]
        .iter()
        .map(|k| w[k].as_f64().unwrap())
        .sum::<f64>()
    };
    for (parallel, split) in [("data", "data"), ("layers", "layers")] {
        let job = small_distill_job(t.path(), &t.path().join(parallel), parallel);
        let d = dry_run("3", &job);
        assert_eq!(d["group"]["split"], split, "{}", d["group"]);
        assert_eq!(d["group"]["members"].as_array().unwrap().len(), 3);
        let shards = d["shards"].as_array().unwrap();
        assert_eq!(shards.len(), 3, "{shards:?}");
        let placed: u64 = shards.iter().map(|s| s["tensors"].as_u64().unwrap()).sum();
        assert_eq!(placed as usize, tensors.len());
        let whole = walk_cpu(&d);
        let ranks: Vec<f64> = shards
            .iter()
            .map(|s| s["cpu_seconds"].as_f64().unwrap())
            .collect();
        let total: f64 = ranks.iter().sum();
        if split == "data" {
            assert!(
                ranks.iter().all(|&r| r > whole / 3.0 && r < whole),
                "{ranks:?} of {whole}"
            );
            assert!(total > whole, "{ranks:?} of {whole}");
        } else {
            assert!(ranks.iter().all(|&r| r < whole), "{ranks:?} of {whole}");
            let seconds: f64 = shards.iter().map(|s| s["seconds"].as_f64().unwrap()).sum();
            assert!((d["seconds"].as_f64().unwrap() - seconds).abs() < 1e-6);
        }
    }
}

/// The 36 encoder linear weights' subset of `inspect`: bits per weight
/// (parts, header and manifest entries) and pooled SQNR.
fn encoder_linears(artifact: &std::path::Path) -> (f64, f64) {
    let ins: serde_json::Value = serde_json::from_str(&hcx_ok(&[
        "inspect",
        artifact.to_str().unwrap(),
        "--json",
        "--match",
        "encoder.layer.*{query,key,value,dense}.weight",
    ]))
    .unwrap();
    let s = &ins["selected"];
    assert_eq!(s["tensors"], 36, "{s}");
    (
        s["bits_per_weight"].as_f64().unwrap(),
        s["pooled_sqnr_db"].as_f64().unwrap(),
    )
}

// Measured: the 3.0-bit target lands at 3.00x bits per weight over the 36
// encoder linears with a pooled SQNR above the even spread's at the same
// bytes (see the README's target section for the figures).
#[test]
fn a_bits_per_weight_target_lands_within_1_percent_and_beats_the_even_spread() {
    let model = minilm();
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("target");
    let job = example_job(t.path(), "minilm-target-3bpw", &model, &a);
    let dry: serde_json::Value = serde_json::from_str(&hcx_ok(&[
        "run",
        "--local",
        "--dry-run",
        "--json",
        job.to_str().unwrap(),
    ]))
    .unwrap();
    let alloc = &dry["allocation"];
    let rates: Vec<f64> = alloc["rates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_f64().unwrap())
        .collect();
    assert_eq!(rates.len(), 36, "{alloc}");
    // Not one rate for all: the tensors' curves differ.
    assert!(
        rates.iter().any(|r| (r - rates[0]).abs() >= 0.05),
        "{rates:?}"
    );
    let even = alloc["even_rate"].as_f64().unwrap();
    hcx_ok(&["run", "--local", job.to_str().unwrap()]);
    let (bpw, sqnr) = encoder_linears(&a);

    // The same job with one rate for every tensor, meeting the same budget.
    let text = std::fs::read_to_string(&job).unwrap();
    let even_job = t.path().join("even.yaml");
    let b = t.path().join("even");
    std::fs::write(
        &even_job,
        text.lines()
            .filter(|l| !l.starts_with("target:"))
            .map(|l| {
                if l.contains("uniform:") {
                    format!("  - uniform: {{bits: {even}}}")
                } else if l.starts_with("output:") {
                    format!("output: {}", b.display())
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    hcx_ok(&["run", "--local", even_job.to_str().unwrap()]);
    let (even_bpw, even_sqnr) = encoder_linears(&b);
    let cos = |x: &std::path::Path| eval_cosine(&model, x);
    let (c_target, c_even) = (cos(&a), cos(&b));
    eprintln!(
        "target: {bpw:.4} bits per weight, pooled SQNR {sqnr:.3} dB, cosine {c_target:.6}; even at {even} bits: {even_bpw:.4}, {even_sqnr:.3} dB, cosine {c_even:.6}"
    );
    assert!((bpw / 3.0 - 1.0).abs() <= 0.01, "{bpw} bits per weight");
    // A fair comparison: the even spread spends as many bytes.
    assert!((even_bpw / bpw - 1.0).abs() <= 0.01, "{even_bpw} vs {bpw}");
    assert!(
        sqnr > even_sqnr,
        "{sqnr} dB vs the even spread's {even_sqnr}"
    );
}

/// A calibrated job takes a size target: GPTQ (by a rule) on the attention
/// output projections, sized by its grid; the uniform rates of the other 30
/// linears chosen on their weights' error (the default) or on their output
/// error over the calibration sentences (`error: outputs`). Either way the
/// artifact lands within 1 % of the size; each model's cosine has a gate
/// just under what it measures (0.856 and 0.796: weighting by the outputs
/// gives the worse model, which is why it is not the default).
#[test]
fn a_calibrated_job_takes_a_size_target_by_either_error() {
    let model = minilm();
    let t = tempfile::tempdir().unwrap();
    let sentences = common::root().join("configs/calibration/sentences.txt");
    for (error, said_error, gate) in [
        ("", "(weight error)", 0.85),
        (
            ", error: outputs",
            "(output error on the calibration inputs)",
            0.79,
        ),
    ] {
        let a = t.path().join(format!("a{}", error.len()));
        let body = format!(
            "target: {{size: 16MB{error}}}\npipeline:\n  - hadamard: {{}}\n  - uniform: {{bits: 3.0}}\n  - zstd: {{level: 19}}\nrules:\n  - match: [\"*LayerNorm*\", \"*.bias\"]\n    keep: source\n  - match: [\"embeddings.*\", \"pooler.*\"]\n    keep: int8\n  - match: [\"*attention.output.dense.weight\"]\n    pipeline: [{{hadamard: {{}}}}, {{gptq: {{grid: {{uniform: {{bits: 3.0}}}}}}}}, {{zstd: {{level: 19}}}}]\ncalibration:\n  sentences: {}\n  samples: 64\n",
            sentences.display()
        );
        let job = common::write_job(t.path(), "calibrated-target", &model, &a, &body);
        let out = common::hcx(&["run", "--local", job.to_str().unwrap()]);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
        assert!(
            said.contains("target: 30 tensors") && said.contains(said_error),
            "{said}"
        );
        let on_disk: u64 = ["model.hcx.safetensors", "hcx-manifest.json"]
            .iter()
            .map(|f| std::fs::metadata(a.join(f)).unwrap().len())
            .sum();
        let ins: serde_json::Value = serde_json::from_str(&hcx_ok(&[
            "inspect",
            a.to_str().unwrap(),
            "--json",
            "--match",
            "*attention.output.dense.weight",
        ]))
        .unwrap();
        let gptq = ins["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                r["name"]
                    .as_str()
                    .unwrap()
                    .ends_with("attention.output.dense.weight")
                    && r["chain"].as_str().unwrap().contains("gptq")
            })
            .count();
        let cosine = eval_cosine(&model, &a);
        eprintln!(
            "calibrated size target{error}: {on_disk} bytes, {gptq} tensors by gptq, cosine {cosine:.4}"
        );
        assert_eq!(gptq, 6, "{ins}");
        assert!(
            (on_disk as f64 / 16e6 - 1.0).abs() <= 0.01,
            "{on_disk} bytes for a 16 MB target"
        );
        assert!(cosine >= gate, "mean embedding cosine {cosine}{error}");
    }
}

/// An int4 artifact exported as compressed-tensors unpacks, by the
/// documented layout, to exactly our weights; GGUF is refused for an
/// encoder, by name.
#[test]
fn minilm_int4_exports_as_compressed_tensors_code_for_code() {
    let model = minilm();
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let job = common::write_job(
        t.path(),
        "int4",
        &model,
        &a,
        "pipeline:\n  - rtn: {bits: 4, group: 32, symmetric: true}\n  - zstd: {level: 3}\nrules:\n  - match: [\"*embeddings*\", \"*LayerNorm*\", \"*.bias\"]\n    keep: source\n",
    );
    hcx_ok(&["run", "--local", job.to_str().unwrap()]);
    let q = common::compressed_tensors_equal_ours(&a, t.path(), &[]);
    let w = &q["config_groups"]["group_0"]["weights"];
    assert_eq!(w["num_bits"], 4);
    assert_eq!(w["group_size"], 32);
    assert_eq!(w["strategy"], "group");
    let out = common::hcx(&[
        "export",
        a.to_str().unwrap(),
        "--format",
        "gguf",
        "--output",
        t.path().join("gguf").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("config.json") && err.contains("bert"),
        "{err}"
    );
}

#[test]
fn minilm_3bit_and_2bit_meet_their_targets() {
    let model = minilm();
    let t = tempfile::tempdir().unwrap();
    for (job, max_bpw, min_db) in [("minilm-3bit", 3.5, 18.7), ("minilm-2bit", 2.625, 13.4)] {
        let a = t.path().join(job);
        let file = example_job(t.path(), job, &model, &a);
        hcx_ok(&["run", file.to_str().unwrap()]);
        let (bpw, sqnr, _) = encoder_linear_totals(&inspect_encoder(&a));
        eprintln!("{job}: {bpw:.3} bits per weight, {sqnr:.2} dB");
        assert!(bpw <= max_bpw, "{job}: {bpw}");
        assert!(sqnr >= min_db, "{job}: {sqnr}");
    }
}

/// Mean embedding cosine of an artifact against the source, from `eval --json`.
fn eval_cosine(model: &std::path::Path, artifact: &std::path::Path) -> f64 {
    let out = hcx_ok(&[
        "eval",
        "--reference",
        model.to_str().unwrap(),
        "--candidate",
        artifact.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["embeddings"]["mean_cosine"].as_f64().unwrap()
}

/// Runs an example job with `run --local` into `dir` and returns its bits
/// per weight and weight SQNR over the 36 encoder linear weights and its
/// mean embedding cosine against the source.
fn run_and_measure(dir: &std::path::Path, job: &str) -> (f64, f64, f64) {
    let model = minilm();
    let a = dir.join(job);
    let file = example_job(dir, job, &model, &a);
    hcx_ok(&["run", "--local", file.to_str().unwrap()]);
    let (bpw, sqnr, _) = encoder_linear_totals(&inspect_encoder(&a));
    let cos = eval_cosine(&model, &a);
    eprintln!("{job}: {bpw:.3} bits per weight, weight SQNR {sqnr:.2} dB, cosine {cos:.5}");
    (bpw, sqnr, cos)
}

#[test]
fn calibrated_jobs_meet_their_embedding_targets() {
    // GPTQ on the Hadamard-rotated uniform grid, calibrated on 128 sentences
    // of configs/calibration/sentences.txt (none of them an evaluation
    // sentence). Measured: cosine 0.99616, 0.98465, 0.94941 at 4.448, 3.440
    // and 2.564 bits per weight (0.98587, 0.94521, 0.82252 uncalibrated).
    let t = tempfile::tempdir().unwrap();
    for (job, max_bpw, min_cos) in [
        ("minilm-4bit-gptq", 4.5, 0.9958),
        ("minilm-3bit-gptq", 3.5, 0.9843),
        ("minilm-2bit-gptq", 2.625, 0.9480),
    ] {
        let (bpw, _, cos) = run_and_measure(t.path(), job);
        assert!(bpw <= max_bpw, "{job}: {bpw}");
        assert!(cos >= min_cos, "{job}: {cos}");
    }
}

#[test]
fn distilled_2bit_job_meets_its_embedding_target() {
    // The 2-bit GPTQ job plus block-wise distillation of the LayerNorms and
    // biases (no extra bits). Measured: cosine 0.95162 at 2.564 bits per
    // weight (rANS; with zstd 0.95134 at 2.615 on an AVX2 machine), against
    // 0.94941 for the same job undistilled; before the Hessian became one f64 product a micro-batch,
    // 0.95292 on one machine and 0.95161 on another: candle's matrix
    // kernels are chosen by CPU features, so the calibration activations
    // differ in the last bits between CPU types, and the tuned result with
    // them. The gate sits under the lowest figure.
    let t = tempfile::tempdir().unwrap();
    let job = "minilm-2bit-distill";
    let (bpw, _, cos) = run_and_measure(t.path(), job);
    assert!(bpw <= 2.625, "{job}: {bpw}");
    assert!(cos >= 0.9512, "{job}: {cos}");
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.path().join(job).join("attribution.json")).unwrap(),
    )
    .unwrap();
    let blocks = report["distill"]["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 6, "{report}");
    for b in blocks {
        let before = b["output_sqnr_db_before"].as_f64().unwrap();
        let after = b["output_sqnr_db_after"].as_f64().unwrap();
        assert!(after > before + 0.1, "block error did not fall: {b}");
    }
}

#[test]
fn end_to_end_tuning_of_an_encoder_is_refused() {
    // End-to-end tuning matches next-token distributions, which an encoder
    // does not have: the job stops before the walk, with no artifact.
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let job = common::example_job(t.path(), "minilm-2bit-distill", &minilm(), &out);
    let yaml = std::fs::read_to_string(&job).unwrap();
    std::fs::write(
        &job,
        yaml.replace("  steps: 200\n", "  steps: 200\n  end_to_end: {steps: 2}\n"),
    )
    .unwrap();
    let o = common::hcx(&["run", "--local", job.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("distill.end_to_end") && e.contains("encoder"),
        "{e}"
    );
    assert!(!out.exists(), "a refused job left an artifact");
}

#[test]
fn slow_codecs_run_on_a_subset() {
    // SeedLM's exhaustive seed search and k-means are slow in debug builds:
    // run those examples on two of the real weights.
    let model = minilm();
    let t = tempfile::tempdir().unwrap();
    let small = t.path().join("small");
    subset_model(
        &model,
        &small,
        &[
            "encoder.layer.2.attention.self.value.weight",
            "encoder.layer.2.attention.self.value.bias",
        ],
    );
    // Each gate sits just under what the codec measures on this tensor now
    // (bits per weight just above), so a regression fails.
    for (job, max_bpw, min_db) in [
        ("minilm-ternary", 1.79, 5.57),
        ("minilm-seedlm", 4.08, 16.38),
        ("minilm-vq", 4.01, 20.71),
        ("minilm-lowrank-sparse", 8.18, 8.1),
    ] {
        let a = t.path().join(job);
        let file = example_job(t.path(), job, &small, &a);
        hcx_ok(&["run", file.to_str().unwrap()]);
        let ins: serde_json::Value =
            serde_json::from_str(&hcx_ok(&["inspect", a.to_str().unwrap(), "--json"])).unwrap();
        let sel = &ins["selected"];
        eprintln!(
            "{job}: {} bits per weight, {} dB",
            sel["bits_per_weight"], sel["mean_sqnr_db"]
        );
        assert_eq!(sel["tensors"].as_u64(), Some(1));
        let bpw = sel["bits_per_weight"].as_f64().unwrap();
        let db = sel["mean_sqnr_db"].as_f64().unwrap();
        assert!(bpw <= max_bpw, "{job}: {bpw} bits per weight: {sel}");
        assert!(db >= min_db, "{job}: {db} dB: {sel}");
        let dense = t.path().join(format!("{job}-dense"));
        hcx_ok(&[
            "decompress",
            a.to_str().unwrap(),
            "--output",
            dense.to_str().unwrap(),
        ]);
        let cmp = hcx_eval::compare_tensors(&small, &dense).unwrap();
        let m = cmp
            .weighted_mean_sqnr(|n| n.ends_with("value.weight"))
            .unwrap();
        assert!(
            (m - sel["mean_sqnr_db"].as_f64().unwrap()).abs() < 0.05,
            "{job}: {m} vs {sel}"
        );
    }
}

#[test]
fn every_manifest_and_copied_byte_is_counted_and_checked() {
    let model = minilm();
    let t = tempfile::tempdir().unwrap();
    let small = t.path().join("small");
    subset_model(
        &model,
        &small,
        &[
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.0.attention.self.query.bias",
        ],
    );
    std::fs::copy(model.join("config.json"), small.join("config.json")).unwrap();
    std::fs::copy(model.join("tokenizer.json"), small.join("tokenizer.json")).unwrap();
    let a = t.path().join("a");
    let job = example_job(t.path(), "minilm-4bit", &small, &a);
    hcx_ok(&["run", job.to_str().unwrap()]);

    // A tensor's bytes: its parts, their safetensors header entries, and its
    // entry in the compact manifest with the comma after it.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("hcx-manifest.json")).unwrap()).unwrap();
    let ins: serde_json::Value =
        serde_json::from_str(&hcx_ok(&["inspect", a.to_str().unwrap(), "--json"])).unwrap();
    let mut entries_total = 0u64;
    for (entry, row) in manifest["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .zip(ins["tensors"].as_array().unwrap())
    {
        assert_eq!(entry["name"], row["name"]);
        let parts: u64 = entry["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["bytes"].as_u64().unwrap() + p["header_bytes"].as_u64().unwrap())
            .sum();
        let in_manifest = serde_json::to_string(entry).unwrap().len() as u64 + 1;
        entries_total += in_manifest;
        assert_eq!(
            row["bytes"].as_u64().unwrap(),
            parts + in_manifest,
            "{}",
            row["name"]
        );
    }
    let manifest_len = std::fs::metadata(a.join("hcx-manifest.json"))
        .unwrap()
        .len();
    assert!(entries_total < manifest_len);

    // The copied config and tokenizer are hashed in the manifest and checked
    // by decompress.
    let copied = manifest["source"]["copied"].as_array().unwrap();
    let names: Vec<&str> = copied.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["config.json", "tokenizer.json"]);
    assert!(
        copied
            .iter()
            .all(|c| c["sha256"].as_str().unwrap().len() == 64)
    );
    let mut tok = std::fs::read(a.join("tokenizer.json")).unwrap();
    let i = tok.len() / 2;
    tok[i] ^= 0x01;
    std::fs::write(a.join("tokenizer.json"), tok).unwrap();
    let out = hcx(&[
        "decompress",
        a.to_str().unwrap(),
        "--output",
        t.path().join("dense").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("tokenizer.json") && err.contains("SHA-256"),
        "{err}"
    );
    assert!(!t.path().join("dense").exists());
}

/// Runs a calibrated job as in-process stages of the model split by layer
/// (`calibration.parallel: layers`), rank r writing the shard of
/// `shards[r]`; merges the shards and returns the tensor file, or the first
/// rank's error.
fn run_staged(
    job: &std::path::Path,
    out: &std::path::Path,
    shards: Vec<Vec<String>>,
) -> Result<Vec<u8>, String> {
    let spec = hcx_protocol::JobSpec::load(job).unwrap();
    let dir = out.with_extension("shards");
    std::fs::create_dir_all(&dir).unwrap();
    let rings = hcx_kernels::collective::local::group(shards.len(), 1).unwrap();
    let handles: Vec<_> = rings
        .into_iter()
        .zip(shards)
        .enumerate()
        .map(|(r, (mut ring, tensors))| {
            let (spec, path) = (spec.clone(), dir.join(format!("{r}.bin")));
            std::thread::spawn(move || {
                hcx_pipeline::calibrate::encode_group_shard(&spec, &mut ring, &[], &tensors, &path)
                    .map(|_| path)
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let files = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect::<Result<Vec<_>, _>>()?;
    hcx_pipeline::shard::merge_shards(&spec, &files, out, &[]).map_err(|e| e.to_string())?;
    Ok(std::fs::read(out.join("model.hcx.safetensors")).unwrap())
}

/// MiniLM's tensors split into stages: stage r holds the blocks in
/// `blocks[r]`; the embeddings go to stage 0 and the pooler to the last.
fn stage_shards(model: &std::path::Path, blocks: &[std::ops::Range<usize>]) -> Vec<Vec<String>> {
    let m = hcx_pipeline::model::Model::open(model).unwrap();
    let mut shards = vec![Vec::new(); blocks.len()];
    for t in &m.tensors {
        let layer = t
            .name
            .strip_prefix("encoder.layer.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<usize>().ok());
        let stage = match layer {
            Some(l) => blocks.iter().position(|b| b.contains(&l)).unwrap(),
            None if t.name.starts_with("embeddings.") => 0,
            None => blocks.len() - 1,
        };
        shards[stage].push(t.name.clone());
    }
    shards
}

#[test]
fn layer_parallel_stages_give_the_local_artifact() {
    // Sequential GPTQ with distillation, so both the compressed and the
    // original model's activations travel from stage to stage, and each
    // stage writes its own blocks' tuned LayerNorms and biases.
    let model = minilm();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("local");
    let job = write_job(
        t.path(),
        "staged",
        &model,
        &out,
        &format!(
            "pipeline:\n  - hadamard: {{}}\n  - gptq: {{grid: {{uniform: {{bits: 2.5}}}}}}\n  - zstd: {{level: 3}}\nrules:\n  - match: [\"*LayerNorm*\", \"*.bias\"]\n    keep: source\n  - match: [\"embeddings.*\", \"pooler.*\"]\n    keep: int8\ncalibration:\n  sentences: {}\n  samples: 12\n  seq_len: 32\n  parallel: layers\ndistill:\n  steps: 2\n  lr: 0.001\n  batch: 4\n  params: [norms, offsets]\n",
            root().join("configs/calibration/sentences.txt").display()
        ),
    );
    hcx_ok(&["run", "--local", job.to_str().unwrap()]);
    let local = std::fs::read(out.join("model.hcx.safetensors")).unwrap();
    for (name, blocks) in [
        ("three", vec![0..2, 2..4, 4..6]),
        // A first stage that only embeds, and one that holds the rest.
        ("two", vec![0..0, 0..6]),
    ] {
        let staged = run_staged(&job, &t.path().join(name), stage_shards(&model, &blocks)).unwrap();
        assert!(staged == local, "{name} stages give another artifact");
        // The last stage's report covers every block.
        let report: serde_json::Value = serde_json::from_slice(
            &std::fs::read(t.path().join(name).join("attribution.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(report["distill"]["blocks"].as_array().unwrap().len(), 6);
        assert_eq!(report["calibration"]["samples"], 12, "{report}");
    }
    // Stages out of layer order are refused, naming the rank.
    let mut shuffled = stage_shards(&model, &[0..3, 3..6]);
    shuffled.swap(0, 1);
    let e = run_staged(&job, &t.path().join("shuffled"), shuffled).unwrap_err();
    assert!(e.contains("contiguous run of blocks in rank order"), "{e}");
}

/// The example 2-bit job with `extra` appended, writing to `out`.
fn gated_job(
    dir: &std::path::Path,
    name: &str,
    out: &std::path::Path,
    extra: &str,
) -> std::path::PathBuf {
    let job = example_job(dir, "minilm-2bit", &minilm(), out);
    let text = std::fs::read_to_string(&job).unwrap();
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, format!("{text}\n{extra}")).unwrap();
    p
}

/// The tensor files of an artifact (its safetensors parts), by name.
fn tensor_files(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    read_dir_bytes(dir)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".safetensors"))
        .collect()
}

#[test]
fn a_missed_quality_gate_fails_the_job_with_its_measured_value() {
    let t = tempfile::tempdir().unwrap();
    // The 2-bit job measures about 0.82 (README table): a 0.9 floor fails
    // it, locally and on the embedded cluster, and no artifact is left.
    for (how, extra) in [
        ("local", &["--local"][..]),
        ("cluster", &["--nodes", "2"][..]),
    ] {
        let out = t.path().join(format!("out-{how}"));
        let job = gated_job(t.path(), how, &out, "gates: {min_cosine: 0.9}\n");
        let mut args = vec!["run", job.to_str().unwrap()];
        args.extend_from_slice(extra);
        let r = hcx(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{how}: {err}");
        assert!(
            err.contains("mean embedding cosine 0.8") && err.contains("< gates.min_cosine 0.9"),
            "{how}: {err}"
        );
        assert!(!out.exists(), "{how}: a failed job left {}", out.display());
        if how == "cluster" {
            assert!(err.contains("at gate:"), "{err}");
        }
    }
}

#[test]
fn raise_rate_runs_again_a_bit_higher_until_the_gate_passes() {
    let t = tempfile::tempdir().unwrap();
    let gate = "gates: {min_cosine: 0.9, on_miss: raise_rate, max_raises: 2}\n";
    let local = t.path().join("local");
    let job = gated_job(t.path(), "raise", &local, gate);
    let said = hcx_ok(&["run", job.to_str().unwrap(), "--local"]);
    // 2.52 bits misses (about 0.82); 3.52 passes (about 0.95).
    assert!(
        said.contains("gate try 1 (as written): mean embedding cosine 0.8"),
        "{said}"
    );
    assert!(
        said.contains("gate try 2 (1 rate step(s) up): mean embedding cosine 0.9"),
        "{said}"
    );
    assert!(!said.contains("try 3"), "{said}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(local.join("hcx-manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["job"]["pipeline"][1]["uniform"]["bits"], 3.52);
    // The same tensors as the job written at 3.52 bits without a gate.
    let plain_out = t.path().join("plain");
    let plain = example_job(t.path(), "minilm-2bit", &minilm(), &plain_out);
    let text = std::fs::read_to_string(&plain)
        .unwrap()
        .replace("bits: 2.52", "bits: 3.52");
    std::fs::write(&plain, text).unwrap();
    hcx_ok(&["run", plain.to_str().unwrap(), "--local"]);
    assert_eq!(tensor_files(&local), tensor_files(&plain_out));
    // A cluster raises the same way and writes the same artifact.
    let cluster = t.path().join("cluster");
    let job = gated_job(t.path(), "raise-cluster", &cluster, gate);
    let said = hcx_ok(&["run", job.to_str().unwrap(), "--nodes", "2"]);
    assert!(said.contains("gate try 2 (1 rate step(s) up)"), "{said}");
    let (a, b) = (read_dir_bytes(&local), read_dir_bytes(&cluster));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, bytes) in &a {
        // The attribution holds run times; every other byte is the same.
        assert!(
            name.starts_with("attribution") || bytes == &b[name],
            "{name} differs"
        );
    }
}
