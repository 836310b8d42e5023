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
    hcx_ok(&[
        "run",
        job.to_str().unwrap(),
        "--output",
        b.to_str().unwrap(),
    ]);

    // Determinism: every artifact byte but run times.
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

    // Sizes and quality of the 36 encoder linear weights.
    let ins = inspect_encoder(&a);
    let (bpw, sqnr, params) = encoder_linear_totals(&ins);
    eprintln!(
        "minilm-4bit: {bpw:.3} bits per weight over {params} parameters, mean SQNR {sqnr:.2} dB, ratio {}",
        ins["ratio"]
    );
    assert!(bpw <= 4.5, "{bpw} bits per weight");
    assert!(sqnr >= 23.6, "{sqnr} dB");
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
    let out = hcx_ok(&[
        "eval",
        "--reference",
        model.to_str().unwrap(),
        "--candidate",
        a.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let cos = v["embeddings"]["mean_cosine"].as_f64().unwrap();
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
    assert!(bpw <= 8.5 && sqnr > 40.0);
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

#[test]
fn minilm_3bit_and_2bit_meet_their_targets() {
    let model = minilm();
    let t = tempfile::tempdir().unwrap();
    for (job, max_bpw, min_db) in [("minilm-3bit", 3.5, 17.1), ("minilm-2bit", 2.625, 11.3)] {
        let a = t.path().join(job);
        let file = example_job(t.path(), job, &model, &a);
        hcx_ok(&["run", file.to_str().unwrap()]);
        let (bpw, sqnr, _) = encoder_linear_totals(&inspect_encoder(&a));
        eprintln!("{job}: {bpw:.3} bits per weight, {sqnr:.2} dB");
        assert!(bpw <= max_bpw, "{job}: {bpw}");
        assert!(sqnr >= min_db, "{job}: {sqnr}");
    }
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
    for job in [
        "minilm-ternary",
        "minilm-seedlm",
        "minilm-vq",
        "minilm-lowrank-sparse",
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
        assert!(sel["mean_sqnr_db"].as_f64().unwrap() > 3.0, "{job}: {sel}");
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
