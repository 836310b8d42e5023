//! Shared helpers of the whole-system tests: the binary, the real model,
//! and small models written on the fly.
#![allow(dead_code)]

mod ports;
// Not every test binary starts processes on ports of its own.
#[allow(unused_imports)]
pub use ports::free_port;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The project root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// all-MiniLM-L6-v2, fetched by `scripts/fetch-model.sh` (run by `scripts/test.sh`).
pub fn minilm() -> PathBuf {
    let dir = std::env::var_os("HCX_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "the test model is missing at {}: run scripts/fetch-model.sh (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// SmolLM2-135M-Instruct as a GGUF file (llama.cpp's Q4_1), fetched by
/// `scripts/fetch-smollm2.sh` (run by `scripts/test.sh`).
pub fn smollm2() -> PathBuf {
    let dir = std::env::var_os("HCX_DECODER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/SmolLM2-135M-Instruct"));
    let file = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        file.is_file(),
        "the test decoder is missing at {}: run scripts/fetch-smollm2.sh (scripts/test.sh does)",
        file.display()
    );
    file
}

/// Runs the binary with arguments.
pub fn hcx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hcx-cluster"))
        .args(args)
        .output()
        .expect("cannot start hcx-cluster")
}

/// Runs the binary and insists on success; returns stdout.
pub fn hcx_ok(args: &[&str]) -> String {
    let out = hcx(args);
    assert!(
        out.status.success(),
        "hcx-cluster {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Writes a job file whose model and output are absolute paths.
pub fn write_job(dir: &Path, name: &str, model: &Path, output: &Path, body: &str) -> PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    let text = format!(
        "name: {name}\nseed: 1\nmodel: {}\noutput: {}\n{body}",
        model.display(),
        output.display()
    );
    std::fs::write(&p, text).expect("write job");
    p
}

/// A job file from configs/jobs with its model replaced and output set.
pub fn example_job(dir: &Path, example: &str, model: &Path, output: &Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join("configs/jobs").join(format!("{example}.yaml")))
        .expect("read example");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("model:") {
                format!("model: {}", model.display())
            } else if l.starts_with("output:") {
                format!("output: {}", output.display())
            } else if let Some((key, value)) = ["  sentences: ", "  text: "]
                .iter()
                .find_map(|k| l.strip_prefix(k).map(|v| (k, v)))
                && !value.starts_with('/')
                && !value.starts_with('[')
            {
                // Calibration files are relative to the example's folder.
                format!("{key}{}", root().join("configs/jobs").join(value).display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let p = dir.join(format!("{example}.yaml"));
    std::fs::write(&p, text).expect("write job");
    p
}

/// Writes a synthetic bf16 model (12 tensors of 1536 x 1024, seeded) to
/// `file`: slow enough under [`SLOW_PIPELINE`] that faults land mid-job.
pub fn write_slow_model(file: &Path) {
    let mut rng = 0x1234_5678_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        ((rng >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for l in 0..12 {
        let v: Vec<u8> = (0..1536 * 1024)
            .flat_map(|_| half::bf16::from_f32(next()).to_le_bytes())
            .collect();
        data.push((format!("blocks.{l}.mlp.weight"), vec![1536, 1024], v));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), d)
                    .expect("tensor view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, file).expect("write slow model");
}

/// The pipeline that makes [`write_slow_model`]'s model slow: a uniform
/// bit search and zstd at level 19 on every tensor.
pub const SLOW_PIPELINE: &str =
    "pipeline:\n  - hadamard: {}\n  - uniform: {bits: 4.4}\n  - zstd: {level: 19}\n";

/// Copies the named tensors of a safetensors model into a new folder
/// (with the source's config and tokenizer), for tests of slow codecs.
pub fn subset_model(src: &Path, dst: &Path, names: &[&str]) {
    let bytes = std::fs::read(src.join("model.safetensors")).expect("read model");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse model");
    let views: Vec<(String, safetensors::tensor::TensorView)> = names
        .iter()
        .map(|n| (n.to_string(), st.tensor(n).expect("tensor")))
        .collect();
    std::fs::create_dir_all(dst).expect("mkdir");
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors"))
        .expect("write subset");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dst.join(f)).expect("copy");
    }
}

/// Every file of a folder, name → bytes.
pub fn read_dir_bytes(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("list").flatten() {
        out.insert(
            e.file_name().to_string_lossy().to_string(),
            std::fs::read(e.path()).expect("read"),
        );
    }
    out
}

/// Removes run metadata from a JSON report: every time field (`seconds`,
/// `kernel_seconds`, …) and the per-node table (which nodes ran what, and
/// the bytes they moved, which include their timing records).
pub fn without_times(v: &mut serde_json::Value) {
    if let serde_json::Value::Object(m) = v {
        m.remove("nodes");
    }
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|k, _| !k.ends_with("seconds"));
            for x in m.values_mut() {
                without_times(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(without_times),
        _ => {}
    }
}

/// `GET /metrics` from the Prometheus endpoint at `addr`: the reply's status
/// line and headers, and its body.
pub fn get_metrics(addr: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "{addr}: {head}");
    (head.to_string(), body.to_string())
}

/// Where scripts/fetch-pyreaders.sh installed the Python readers (the
/// `gguf` and `safetensors` packages).
pub fn python_readers() -> PathBuf {
    let dir = std::env::var_os("HCX_PY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/python"));
    assert!(
        dir.join("gguf").is_dir() && dir.join("safetensors").is_dir(),
        "the Python readers are missing at {}: run scripts/fetch-pyreaders.sh (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// Exports `artifact` as compressed-tensors (`extra` flags added), unpacks
/// it with tests/python/ct_unpack.py (the documented layout read with the
/// `safetensors` package) and checks every weight equals the artifact's
/// decoded one exactly; returns the quantization_config it read.
pub fn compressed_tensors_equal_ours(
    artifact: &Path,
    dir: &Path,
    extra: &[&str],
) -> serde_json::Value {
    let out = dir.join("compressed-tensors");
    let mut args = vec![
        "export",
        artifact.to_str().unwrap(),
        "--format",
        "compressed-tensors",
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let printed = hcx_ok(&args);
    assert!(
        printed.contains("every tensor equals the artifact's"),
        "{printed}"
    );
    let read = dir.join("compressed-tensors-read");
    std::fs::create_dir_all(&read).unwrap();
    let py = Command::new("python3")
        .arg(root().join("tests/python/ct_unpack.py"))
        .arg(&out)
        .arg(&read)
        .env("PYTHONPATH", python_readers())
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "ct_unpack.py failed: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let bytes = std::fs::read(read.join("dense.safetensors")).unwrap();
    let theirs = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let m = hcx_pipeline::artifact::read_manifest(artifact).unwrap();
    assert_eq!(theirs.len(), m.tensors.len());
    for t in &m.tensors {
        let view = theirs.tensor(&t.name).unwrap();
        assert_eq!(view.shape(), t.shape.as_slice(), "{}", t.name);
        if !matches!(t.dtype.as_str(), "F32" | "F16" | "BF16") {
            // Integer tensors (BERT's position ids) pass through as stored.
            let ours = hcx_pipeline::artifact::decode_bytes(artifact, &m, &t.name).unwrap();
            assert_eq!(view.data(), ours.as_slice(), "{}", t.name);
            continue;
        }
        let ours = hcx_pipeline::artifact::decode_values(artifact, &m, &t.name).unwrap();
        let read: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert!(
            read == ours,
            "{}: unpacked weights differ from ours",
            t.name
        );
    }
    // The tokenizer and the rest travel beside the weights.
    for f in &m.source.copied {
        assert!(out.join(&f.name).is_file(), "{} was not copied", f.name);
    }
    serde_json::from_str(&std::fs::read_to_string(read.join("config.json")).unwrap()).unwrap()
}
