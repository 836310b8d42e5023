//! Every example job parses; bad job files and bad inputs fail clearly,
//! without a panic and without leaving anything that looks like an artifact.

mod common;

use common::*;
use hcx_protocol::JobSpec;

#[test]
fn every_example_job_parses() {
    let dir = root().join("configs/jobs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let spec = JobSpec::load(&p).unwrap_or_else(|e| panic!("{e}"));
            assert!(!spec.pipeline.is_empty(), "{}", p.display());
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("minilm") {
                // The 36 encoder linear weights take the default pipeline; LayerNorms and biases are kept.
                assert_eq!(
                    spec.stages_for("encoder.layer.5.output.dense.weight"),
                    spec.pipeline
                );
                assert!(
                    spec.stages_for("encoder.layer.5.output.LayerNorm.weight")
                        .is_empty()
                );
                assert!(
                    spec.stages_for("encoder.layer.5.output.dense.bias")
                        .is_empty()
                );
            } else {
                assert!(name.starts_with("smollm2"), "{name}");
                // The 210 linear weights take the default pipeline; RMSNorms are kept.
                assert_eq!(
                    spec.stages_for("model.layers.29.mlp.down_proj.weight"),
                    spec.pipeline
                );
                assert!(
                    spec.stages_for("model.layers.0.input_layernorm.weight")
                        .is_empty()
                );
                assert!(spec.stages_for("model.norm.weight").is_empty());
                assert_eq!(
                    spec.calibration.is_some(),
                    name.ends_with("-gptq.yaml") || name.ends_with("-distill.yaml"),
                    "{name}: calibrated exactly when it uses gptq (distilled jobs do)"
                );
            }
            // Distilled jobs are calibrated ones.
            assert_eq!(
                spec.distill.is_some(),
                name.contains("-distill"),
                "{name}: distilled exactly when its name says so"
            );
            if spec.distill.is_some() {
                assert!(spec.calibration.is_some(), "{name}");
            }
            hcx_ok(&["validate", p.to_str().unwrap()]);
            n += 1;
        }
    }
    assert_eq!(n, 22, "expected the twenty-two example jobs");
}

#[test]
fn schema_is_json() {
    let out = hcx_ok(&["schema"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(out.contains("pipeline") && out.contains("hadamard"), "{v}");
}

/// Runs a failing command and checks its message, exit code and leftovers.
fn fails(args: &[&str], expect: &[&str], out_dir: Option<&std::path::Path>) {
    let out = hcx(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for e in expect {
        assert!(err.contains(e), "{args:?}: `{e}` not in: {err}");
    }
    if let Some(d) = out_dir {
        assert!(
            !d.join("hcx-manifest.json").exists(),
            "a manifest was left at {}",
            d.display()
        );
        if let Some(parent) = d.parent() {
            for e in std::fs::read_dir(parent).unwrap().flatten() {
                assert!(
                    !e.file_name().to_string_lossy().contains(".partial"),
                    "partial output left: {:?}",
                    e.path()
                );
            }
        }
    }
}

#[test]
fn bad_job_files_name_the_place() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("bad.yaml");
    std::fs::write(
        &p,
        "name: x\nmodel: m\noutput: o\npipeline:\n  - rtn: {bits: 4\n",
    )
    .unwrap();
    fails(&["validate", p.to_str().unwrap()], &["bad.yaml:"], None);
    std::fs::write(&p, "name: x\nmodel: m\noutput: o\npipeline: []\nextra: 1\n").unwrap();
    fails(
        &["run", p.to_str().unwrap()],
        &["bad.yaml:5:", "extra"],
        None,
    );
    std::fs::write(
        &p,
        "name: x\nmodel: m\noutput: o\npipeline:\n  - rtn:\n      bits: 4\n      group: 0\n",
    )
    .unwrap();
    fails(
        &["validate", p.to_str().unwrap()],
        &["bad.yaml:7:", "pipeline[0].rtn.group"],
        None,
    );
    fails(
        &["validate", t.path().join("absent.yaml").to_str().unwrap()],
        &["absent.yaml", "cannot read"],
        None,
    );
}

#[test]
fn errors_say_each_cause_once_place_first() {
    let t = tempfile::tempdir().unwrap();
    let absent = t.path().join("absent.yaml");
    let out = hcx(&["validate", absent.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.starts_with(&format!(
            "error: {}: cannot read job file",
            absent.display()
        )),
        "{err}"
    );
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let p = t.path().join("bad.yaml");
    std::fs::write(
        &p,
        "name: x\nmodel: m\noutput: o\npipeline:\n  - nosuchstage: {}\n",
    )
    .unwrap();
    let out = hcx(&["validate", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:5:"), "{err}");
    assert!(err.contains("nosuchstage"), "{err}");
    assert!(!err.contains("line 5"), "{err}");
    assert_eq!(err.matches("error").count(), 1, "{err}");
}

#[test]
fn bad_inputs_fail_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    // Missing model.
    let job = write_job(
        t.path(),
        "missing",
        &t.path().join("nope"),
        &out,
        "pipeline:\n  - rtn: {bits: 4}\n",
    );
    fails(
        &["run", job.to_str().unwrap()],
        &["nope", "cannot open the model"],
        Some(&out),
    );

    // Unsupported dtype.
    let m = t.path().join("f64model");
    std::fs::create_dir(&m).unwrap();
    let data = vec![0u8; 8 * 4];
    let v =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![2, 2], &data).unwrap();
    safetensors::serialize_to_file(vec![("w", v)], None, &m.join("model.safetensors")).unwrap();
    let job = write_job(t.path(), "f64", &m, &out, "pipeline:\n  - rtn: {bits: 4}\n");
    fails(
        &["run", job.to_str().unwrap()],
        &["tensor `w`", "F64", "not supported"],
        Some(&out),
    );

    // A shape the codec cannot take: 384 columns in groups of 256.
    let small = t.path().join("small");
    subset_model(
        &minilm(),
        &small,
        &["encoder.layer.0.attention.self.query.weight"],
    );
    let job = write_job(
        t.path(),
        "shape",
        &small,
        &out,
        "pipeline:\n  - rtn: {bits: 4, group: 256}\n",
    );
    fails(
        &["run", job.to_str().unwrap()],
        &[
            "tensor `encoder.layer.0.attention.self.query.weight`",
            "[384, 384]",
            "not divisible by group 256",
        ],
        Some(&out),
    );

    // An output that cannot be written: its parent is a file.
    let file = t.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let bad_out = file.join("out");
    let job = write_job(
        t.path(),
        "unwritable",
        &small,
        &bad_out,
        "pipeline:\n  - rtn: {bits: 4}\n",
    );
    fails(
        &["run", job.to_str().unwrap()],
        &["plain-file", "cannot create the parent folder"],
        None,
    );

    // An output folder holding something else is not overwritten.
    let busy = t.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), "mine").unwrap();
    let job = write_job(
        t.path(),
        "busy",
        &small,
        &busy,
        "pipeline:\n  - rtn: {bits: 4}\n",
    );
    fails(
        &["run", job.to_str().unwrap()],
        &["not an hcx artifact"],
        None,
    );
    assert_eq!(
        std::fs::read_to_string(busy.join("keep.txt")).unwrap(),
        "mine"
    );

    // A corrupt artifact is refused by decompress.
    let job = write_job(
        t.path(),
        "ok",
        &small,
        &out,
        "pipeline:\n  - rtn: {bits: 4}\n  - zstd: {}\n",
    );
    hcx_ok(&["run", job.to_str().unwrap()]);
    let f = out.join("model.hcx.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x55;
    std::fs::write(&f, bytes).unwrap();
    let dense = t.path().join("dense");
    fails(
        &[
            "decompress",
            out.to_str().unwrap(),
            "--output",
            dense.to_str().unwrap(),
        ],
        &["SHA-256", "corrupt"],
        Some(&dense),
    );
    assert!(!dense.exists());
}

#[test]
fn sharded_half_precision_model_round_trips() {
    // Two shards listed by an index, F16 and BF16 tensors, an integer tensor.
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("sharded");
    std::fs::create_dir(&m).unwrap();
    let vals = hcx_kernels::rng::gaussian_vec(5, 64 * 128);
    let f16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::f16::from_f32(*v * 0.05).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v * 0.05).to_le_bytes())
        .collect();
    let ids: Vec<u8> = (0i64..16).flat_map(|v| v.to_le_bytes()).collect();
    let a =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![64, 128], &f16).unwrap();
    let ids_v =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![16], &ids).unwrap();
    safetensors::serialize_to_file(
        vec![("model.layers.0.mlp.weight", a), ("model.ids", ids_v)],
        None,
        &m.join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    let b = safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![64, 128], &bf16)
        .unwrap();
    safetensors::serialize_to_file(
        vec![("model.layers.1.mlp.weight", b)],
        None,
        &m.join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    std::fs::write(
        m.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"model.layers.0.mlp.weight": "model-00001-of-00002.safetensors", "model.ids": "model-00001-of-00002.safetensors", "model.layers.1.mlp.weight": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    std::fs::write(m.join("config.json"), "{}").unwrap();
    let out = t.path().join("out");
    let job = write_job(
        t.path(),
        "sharded",
        &m,
        &out,
        "pipeline:\n  - hadamard: {}\n  - rtn: {bits: 8, group: 64}\n  - zstd: {}\n",
    );
    hcx_ok(&["run", job.to_str().unwrap()]);
    let dense = t.path().join("dense");
    hcx_ok(&[
        "decompress",
        out.to_str().unwrap(),
        "--output",
        dense.to_str().unwrap(),
    ]);
    assert!(dense.join("config.json").is_file());
    let bytes = std::fs::read(dense.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("model.layers.0.mlp.weight").unwrap().dtype(),
        safetensors::Dtype::F16
    );
    assert_eq!(
        st.tensor("model.layers.1.mlp.weight").unwrap().dtype(),
        safetensors::Dtype::BF16
    );
    assert_eq!(st.tensor("model.ids").unwrap().data(), &ids[..]);
    let cmp = hcx_eval::compare_tensors(&m, &dense).unwrap();
    for row in &cmp.tensors {
        if row.name.ends_with("weight") {
            let s = row.sqnr_db.unwrap();
            assert!(s > 35.0, "{}: {s}", row.name);
        }
    }
    // Layers are attributed by index.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("attribution.json")).unwrap())
            .unwrap();
    let layers: Vec<&str> = report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["layer"].as_str().unwrap())
        .collect();
    assert_eq!(layers, vec!["model", "layer.0", "layer.1"]);
}
