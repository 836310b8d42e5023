//! Decoder sources: GGUF files read as Hugging Face models (names, the q/k
//! row permutation undone, config and tokenizer rebuilt), checked on a small
//! GGUF written here and on SmolLM2-135M-Instruct, whose forward pass is
//! checked against candle's own GGUF Llama.

mod common;

use std::io::Write;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use hcx_forward::llama::{Llama, LlamaConfig};
use hcx_forward::text::TextTokenizer;
use hcx_pipeline::gguf::permute_rows;
use hcx_pipeline::model::Model;

/// HF-layout values of a small test tensor: row r, column c → r·100 + c.
fn ramp(rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| ((i / cols) * 100 + i % cols) as f32)
        .collect()
}

fn qt(values: Vec<f32>, shape: &[usize]) -> QTensor {
    let t = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
    QTensor::quantize(&t, GgmlDType::F32).unwrap()
}

/// Small seeded values in [-0.3, 0.3), row-major.
fn noise(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..rows * cols)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6
        })
        .collect()
}

/// Writes a one-block Llama GGUF: hidden 8, 2 query heads and 1 key/value
/// head of width 4, MLP 12, vocabulary 6, a byte-level BPE tokenizer. The
/// weights are [`ramp`]s (easy to follow through the permutation).
fn write_tiny_gguf(path: &Path) {
    write_gguf(path, &|r, c, _| ramp(r, c));
}

/// [`write_tiny_gguf`] with the weights `values(rows, cols, seed)` gives.
fn write_gguf(path: &Path, values: &dyn Fn(usize, usize, u64) -> Vec<f32>) {
    let ramp = |r: usize, c: usize| values(r, c, (r * 131 + c) as u64);
    let (h, f, v) = (8usize, 12usize, 6usize);
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), qt(ramp(v, h), &[v, h])),
        ("output_norm.weight".into(), qt(vec![1.0; h], &[h])),
        ("blk.0.attn_norm.weight".into(), qt(vec![1.0; h], &[h])),
        ("blk.0.ffn_norm.weight".into(), qt(vec![1.0; h], &[h])),
        // What llama.cpp's converter writes: HF rows permuted per head.
        (
            "blk.0.attn_q.weight".into(),
            qt(permute_rows(&ramp(8, h), 8, h, 2), &[8, h]),
        ),
        (
            "blk.0.attn_k.weight".into(),
            qt(permute_rows(&ramp(4, h), 4, h, 1), &[4, h]),
        ),
        ("blk.0.attn_v.weight".into(), qt(ramp(4, h), &[4, h])),
        ("blk.0.attn_output.weight".into(), qt(ramp(h, 8), &[h, 8])),
        ("blk.0.ffn_gate.weight".into(), qt(ramp(f, h), &[f, h])),
        ("blk.0.ffn_up.weight".into(), qt(ramp(f, h), &[f, h])),
        ("blk.0.ffn_down.weight".into(), qt(ramp(h, f), &[h, f])),
    ];
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let s = |x: &str| Value::String(x.into());
    let strings = |xs: &[&str]| Value::Array(xs.iter().map(|x| s(x)).collect());
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("llama.embedding_length", Value::U32(h as u32)),
        ("llama.feed_forward_length", Value::U32(f as u32)),
        ("llama.block_count", Value::U32(1)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.context_length", Value::U32(64)),
        ("tokenizer.ggml.model", s("gpt2")),
        (
            "tokenizer.ggml.tokens",
            strings(&["a", "b", "ab", "Ġ", "<|endoftext|>", "c"]),
        ),
        ("tokenizer.ggml.merges", strings(&["a b"])),
        (
            "tokenizer.ggml.token_type",
            Value::Array([1, 1, 1, 1, 3, 1].iter().map(|t| Value::I32(*t)).collect()),
        ),
        ("tokenizer.ggml.eos_token_id", Value::U32(4)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &md_refs, &t_refs).unwrap();
}

#[test]
fn a_small_gguf_reads_as_the_hf_model_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path);
    let m = Model::open(&path).unwrap();
    assert!(m.is_gguf());
    let names: Vec<&str> = m.tensors.iter().map(|t| t.name.as_str()).collect();
    assert!(
        names.contains(&"model.layers.0.self_attn.q_proj.weight"),
        "{names:?}"
    );
    assert!(names.contains(&"model.norm.weight"));
    assert!(!names.contains(&"lm_head.weight"));
    let get = |n: &str| m.read_f32(m.tensors.iter().find(|t| t.name == n).unwrap());
    // The permutation is undone: q and k read back in HF row order.
    assert_eq!(get("model.layers.0.self_attn.q_proj.weight"), ramp(8, 8));
    assert_eq!(get("model.layers.0.self_attn.k_proj.weight"), ramp(4, 8));
    assert_eq!(get("model.layers.0.mlp.down_proj.weight"), ramp(8, 12));
    let q = m
        .tensors
        .iter()
        .find(|t| t.name == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.shape, vec![8, 8]);
    assert_eq!(q.stored_bytes, 8 * 8 * 4);
    // config.json describes the model for an HF loader and our forward pass.
    let cfg_text = String::from_utf8(m.generated[0].1.clone()).unwrap();
    assert_eq!(m.generated[0].0, "config.json");
    let cfg = LlamaConfig::parse(Path::new("config.json"), &cfg_text).unwrap();
    assert_eq!(
        (cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim),
        (8, 2, 1, 4)
    );
    assert_eq!((cfg.intermediate, cfg.layers, cfg.vocab), (12, 1, 6));
    assert!(cfg.tied, "no output.weight means a tied head");
    let v: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    assert_eq!(v["eos_token_id"], 4);
    // tokenizer.json is a working byte-level BPE tokenizer.
    let (name, tok) = &m.generated[1];
    assert_eq!(name, "tokenizer.json");
    let tok = TextTokenizer::from_bytes(tok, Path::new("tokenizer.json")).unwrap();
    assert_eq!(tok.encode("ab").unwrap(), vec![2]);
    assert_eq!(tok.encode("ba").unwrap(), vec![1, 0]);
    // `convert` writes it as an HF folder.
    let out = dir.path().join("hf");
    common::hcx_ok(&[
        "convert",
        path.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(out.join("model.safetensors").is_file());
    assert!(out.join("config.json").is_file() && out.join("tokenizer.json").is_file());
}

#[test]
fn a_gguf_with_an_unknown_tensor_type_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.gguf");
    let mut b: Vec<u8> = Vec::new();
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    string(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    string(&mut b, "llama");
    string(&mut b, "token_embd.weight");
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&32u64.to_le_bytes());
    b.extend_from_slice(&99u32.to_le_bytes()); // no such ggml type
    b.extend_from_slice(&0u64.to_le_bytes());
    b.resize(b.len().div_ceil(32) * 32 + 256, 0);
    std::fs::File::create(&path).unwrap().write_all(&b).unwrap();
    let e = Model::open(&path).err().expect("refused").to_string();
    assert!(e.contains("odd.gguf") && e.contains("unknown dtype"), "{e}");
    let out = common::hcx(&[
        "convert",
        path.to_str().unwrap(),
        "--output",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown dtype"));
}

#[test]
fn smollm2_reads_as_hf_and_runs_like_candles_gguf_llama() {
    let gguf = common::smollm2();
    let m = Model::open(&gguf).unwrap();
    let linear = m
        .tensors
        .iter()
        .filter(|t| hcx_forward::llama::Site::of_weight(&t.name).is_some())
        .count();
    assert_eq!(linear, 210, "30 blocks × 7 linear weights");
    let cfg_text = String::from_utf8(m.generated[0].1.clone()).unwrap();
    let cfg = LlamaConfig::parse(Path::new("config.json"), &cfg_text).unwrap();
    assert_eq!(
        (cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads),
        (576, 30, 9, 3)
    );
    let tok = TextTokenizer::from_bytes(&m.generated[1].1, Path::new("tokenizer.json")).unwrap();
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").unwrap();
    let ids = tok.encode(&text[..2000]).unwrap();
    let ids = &ids[..48];
    // Our forward pass over the unpermuted HF weights…
    let by_name: std::collections::HashMap<&str, &hcx_pipeline::model::TensorInfo> =
        m.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut src = |n: &str| -> Result<hcx_forward::llama::Weight, hcx_forward::ForwardError> {
        Ok(by_name.get(n).map(|t| (m.read_f32(t), t.shape.clone())))
    };
    let ours = Llama::load(cfg, &mut src, 64).unwrap();
    let logits = ours.forward(ids, 1, ids.len()).unwrap();
    let last_ours = logits.get(ids.len() - 1).unwrap();
    // …against candle's Llama running the GGUF as llama.cpp lays it out.
    let mut f = std::fs::File::open(&gguf).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut theirs = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        &mut f,
        &Device::Cpu,
    )
    .unwrap();
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let last_theirs = theirs.forward(&input, 0).unwrap().squeeze(0).unwrap();
    let p = candle_nn::ops::softmax_last_dim(&last_theirs).unwrap();
    let lp = candle_nn::ops::log_softmax(&last_theirs, 0).unwrap();
    let lq = candle_nn::ops::log_softmax(&last_ours, 0).unwrap();
    let kl: f32 = (p * (lp - &lq).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let top_theirs = last_theirs.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    let top_ours = last_ours.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    println!(
        "KL(candle GGUF ‖ ours) at the last of 48 tokens: {kl:.6}; top-1 {top_theirs} vs {top_ours}"
    );
    assert_eq!(top_theirs, top_ours);
    // candle's GGUF path quantizes activations to 8 bits for its matmuls;
    // the two passes differ by that rounding only.
    assert!(kl < 0.01, "KL {kl}");
}

/// Runs a job locally (on `threads` rayon threads when given) and returns
/// its artifact's tensor file.
fn run_tensor_file(job: &Path, out: &Path, threads: Option<&str>) -> Vec<u8> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hcx-cluster"));
    cmd.args(["run", "--local", job.to_str().unwrap()]);
    if let Some(t) = threads {
        cmd.env("RAYON_NUM_THREADS", t);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out.join("model.hcx.safetensors")).unwrap()
}

/// Writes a calibration text of `words` words the tiny tokenizer knows.
fn tiny_text(path: &Path, words: usize) {
    let w = ["ab", "ba", "c", "abc", "a", "cab"];
    let text: Vec<&str> = (0..words).map(|i| w[(i * 7 + i / 3) % w.len()]).collect();
    std::fs::write(path, text.join(" ")).unwrap();
}

fn tiny_job(dir: &Path, name: &str, model: &Path, text: &Path, extra: &str) -> std::path::PathBuf {
    common::write_job(
        dir,
        name,
        model,
        &dir.join(format!("out-{name}")),
        &format!(
            "pipeline:\n  - hadamard: {{}}\n  - gptq: {{grid: {{uniform: {{bits: 3}}}}}}\n  - zstd: {{level: 3}}\nrules:\n  - match: [\"*norm.weight\"]\n    keep: source\n  - match: [\"model.embed_tokens.weight\"]\n    keep: int8\ncalibration:\n  text: {}\n  samples: 4\n  seq_len: 8\n{extra}",
            text.display()
        ),
    )
}

#[test]
fn calibrated_jobs_are_deterministic_and_report_output_error() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, &noise);
    let text = dir.path().join("calib.txt");
    tiny_text(&text, 200);
    let job = tiny_job(dir.path(), "cal", &gguf, &text, "");
    let out = dir.path().join("out-cal");
    let run = |threads: Option<&str>| run_tensor_file(&job, &out, threads);
    let first = run(None);
    assert_eq!(first, run(None), "the same calibrated job twice");
    assert_eq!(first, run(Some("1")), "one thread and all cores");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("hcx-manifest.json")).unwrap()).unwrap();
    let q = manifest["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert!(q["output_sqnr_db"].as_f64().is_some(), "{q}");
    let report = std::fs::read_to_string(out.join("attribution.md")).unwrap();
    assert!(
        report.contains("## Calibration") && report.contains("output SQNR"),
        "{report}"
    );
    // The decompressed artifact is an HF folder our decoder eval runs on.
    let dense = dir.path().join("dense");
    common::hcx_ok(&[
        "decompress",
        out.to_str().unwrap(),
        "--output",
        dense.to_str().unwrap(),
    ]);
    let eval = common::hcx_ok(&[
        "eval",
        "--reference",
        gguf.to_str().unwrap(),
        "--candidate",
        dense.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "8",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&eval).unwrap();
    let kl = v["decoder"]["mean_kl"].as_f64().unwrap();
    assert!(kl.is_finite() && kl >= 0.0, "{v}");
}

/// Runs a calibrated job as `world` in-process data-parallel ranks (one
/// thread each, linked by the in-process collective) and returns the tensor
/// file rank 0 wrote.
fn run_ranked(job: &Path, out: &Path, world: usize) -> Vec<u8> {
    let spec = hcx_protocol::JobSpec::load(job).unwrap();
    let rings = hcx_kernels::collective::local::group(world, 1).unwrap();
    let handles: Vec<_> = rings
        .into_iter()
        .map(|mut ring| {
            let (spec, out) = (spec.clone(), out.to_path_buf());
            std::thread::spawn(move || {
                hcx_pipeline::calibrate::run_job_ranked(&spec, Some(&out), &mut ring, &[])
                    .map(|o| o.is_some())
            })
        })
        .collect();
    let wrote: Vec<bool> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert_eq!(wrote.iter().filter(|w| **w).count(), 1, "{wrote:?}");
    assert!(wrote[0], "rank 0 writes the artifact");
    std::fs::read(out.join("model.hcx.safetensors")).unwrap()
}

#[test]
fn calibrated_artifact_is_the_same_bits_on_1_2_and_3_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, &noise);
    let text = dir.path().join("calib.txt");
    // 5 micro-batches of 8 windows: ranks get unequal shares (and with 3
    // ranks, rank 2 gets one micro-batch fewer than rank 0).
    tiny_text(&text, 600);
    let job = tiny_job(dir.path(), "ranks", &gguf, &text, "");
    let yaml = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, yaml.replace("samples: 4\n", "samples: 40\n")).unwrap();
    let one = run_tensor_file(&job, &dir.path().join("out-ranks"), None);
    for world in [1, 2, 3] {
        let out = dir.path().join(format!("ranked-{world}"));
        assert!(
            run_ranked(&job, &out, world) == one,
            "{world} ranks give another artifact than the local run"
        );
    }
    // The statistics really are split: a job whose calibration text differs
    // gives other bits, so the comparison above can fail.
    let words = std::fs::read_to_string(&text).unwrap();
    let reversed: Vec<&str> = words.split(' ').rev().collect();
    std::fs::write(&text, reversed.join(" ")).unwrap();
    let other = run_ranked(&job, &dir.path().join("ranked-other"), 2);
    assert!(other != one);
}

/// A link that keeps a copy of every frame it sends: it watches what one
/// rank sends to its right neighbour.
struct Tap {
    inner: hcx_kernels::collective::local::LocalLink,
    sent: std::sync::Arc<std::sync::Mutex<Vec<hcx_kernels::collective::Frame>>>,
}

impl hcx_kernels::collective::Link for Tap {
    fn send(
        &mut self,
        frame: hcx_kernels::collective::Frame,
    ) -> Result<(), hcx_kernels::collective::LinkError> {
        self.sent.lock().unwrap().push(frame.clone());
        self.inner.send(frame)
    }
    fn recv(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<hcx_kernels::collective::Frame, hcx_kernels::collective::LinkError> {
        self.inner.recv(timeout)
    }
    fn abort(&mut self, reason: &str) {
        self.inner.abort(reason)
    }
}

/// Runs a federated job as in-process ranks at the given sites (by rank)
/// and returns rank 0's tensor file and every frame each rank sent.
fn run_at_sites(
    job: &Path,
    out: &Path,
    sites: &[&str],
) -> (Vec<u8>, Vec<Vec<hcx_kernels::collective::Frame>>) {
    let spec = hcx_protocol::JobSpec::load(job).unwrap();
    let world = sites.len();
    let sites: Vec<String> = sites.iter().map(|s| s.to_string()).collect();
    let logs: Vec<_> = (0..world).map(|_| std::sync::Arc::default()).collect();
    let links = hcx_kernels::collective::local::links(world).unwrap();
    let handles: Vec<_> = links
        .into_iter()
        .zip(&logs)
        .enumerate()
        .map(|(rank, (inner, log))| {
            let tap = Tap {
                inner,
                sent: std::sync::Arc::clone(log),
            };
            let mut ring = hcx_kernels::collective::Ring::new(rank, world, 1, tap).unwrap();
            let (spec, out, sites) = (spec.clone(), out.to_path_buf(), sites.clone());
            std::thread::spawn(move || {
                hcx_pipeline::calibrate::run_job_ranked(&spec, Some(&out), &mut ring, &sites)
                    .map(|o| o.is_some())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    let frames = logs
        .iter()
        .map(|l| std::mem::take(&mut *l.lock().unwrap()))
        .collect();
    (
        std::fs::read(out.join("model.hcx.safetensors")).unwrap(),
        frames,
    )
}

/// Checks that every frame `from` sent to the next site holds only what may
/// leave a site: exact integer sums (Hessian sums with their row counts,
/// distillation gradients, output error totals) and all-gathered counts
/// (micro-batch sizes, which statistics a rank holds with their
/// dimensions and bounds). Returns how many frames of each were seen.
fn check_crossing(frames: &[hcx_kernels::collective::Frame]) -> (usize, usize) {
    use hcx_kernels::collective::Op;
    let (mut sums, mut gathered) = (0, 0);
    // All-gather blocks, rebuilt from their frames (chunk 0 is the length).
    let mut blocks: std::collections::BTreeMap<(u64, u32), Vec<u8>> = Default::default();
    for f in frames {
        let h = &f.header;
        match h.op {
            Op::Hello => {}
            Op::AllReduce => {
                assert_eq!(
                    h.kind, 4,
                    "only exact i128 sums are all-reduced across sites: {h:?}"
                );
                sums += 1;
            }
            Op::AllGather if h.chunk > 0 => {
                blocks
                    .entry((h.seq, h.part))
                    .or_default()
                    .extend(&f.payload);
            }
            Op::AllGather => {}
            other => panic!("a {other} frame crossed between sites: {h:?}"),
        }
    }
    for ((seq, _), b) in &blocks {
        // Micro-batch sizes: a site name, a count and three u64 per micro-batch.
        let sizes = b.len() >= 10 && {
            let n = usize::from(u16::from_le_bytes([b[0], b[1]]));
            b.len() >= 10 + n
                && ["a", "b"].contains(&std::str::from_utf8(&b[2..2 + n]).unwrap_or(""))
                && 10 + n + 24 * u64::from_le_bytes(b[2 + n..10 + n].try_into().unwrap()) as usize
                    == b.len()
        };
        // Which statistics a rank holds: (site code, dim, bound) records.
        let meta = b.len() % 25 == 0 && b.chunks(25).all(|r| r[0] < 16);
        assert!(
            sizes || meta,
            "call {seq}: an all-gathered block of {} bytes is neither sizes nor statistics metadata",
            b.len()
        );
        gathered += 1;
    }
    (sums, gathered)
}

#[test]
fn a_federated_job_equals_one_site_holding_all_the_data_and_only_sums_cross_sites() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, &noise);
    let (a, b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));
    tiny_text(&a, 600);
    tiny_text(&b, 400);
    let words = std::fs::read_to_string(&b).unwrap();
    std::fs::write(&b, words.split(' ').rev().collect::<Vec<_>>().join(" ")).unwrap();
    let job = tiny_job(
        dir.path(),
        "fed",
        &gguf,
        &a,
        "distill: {steps: 6, lr: 0.01, batch: 16, params: [norms]}\n",
    );
    let yaml = std::fs::read_to_string(&job).unwrap().replace(
        &format!("  text: {}\n  samples: 4\n", a.display()),
        &format!(
            "  sites:\n    a: {}\n    b: {}\n  samples: 20\n",
            a.display(),
            b.display()
        ),
    );
    assert!(yaml.contains("sites:"), "{yaml}");
    std::fs::write(&job, &yaml).unwrap();
    // One process reading both sites' files: the reference.
    let one = run_tensor_file(&job, &dir.path().join("out-fed"), None);
    // Site a's 3 micro-batches over two ranks, site b's over one; then one
    // rank a site.
    let (three, frames) = run_at_sites(&job, &dir.path().join("fed-3"), &["a", "a", "b"]);
    assert!(three == one, "3 ranks at 2 sites give another artifact");
    let (two, _) = run_at_sites(&job, &dir.path().join("fed-2"), &["a", "b"]);
    assert!(two == one, "2 ranks at 2 sites give another artifact");
    // What crossed from site a to b (rank 1 → 2) and back (rank 2 → 0):
    // sums and counts only, and both kinds did cross.
    for from in [1, 2] {
        let (sums, gathered) = check_crossing(&frames[from]);
        assert!(
            sums > 0 && gathered > 0,
            "rank {from}: {sums} sums, {gathered} blocks"
        );
    }
    // Inside site a rank 0 sent rank 1 the same kinds only, too.
    check_crossing(&frames[0]);
    // The site's data is really used: other text at site b, other bits.
    std::fs::write(&b, words).unwrap();
    let (other, _) = run_at_sites(&job, &dir.path().join("fed-other"), &["a", "b"]);
    assert!(other != one);
    // A group that lacks a site, or whose site's ranks are not side by
    // side, is refused by name.
    let spec = hcx_protocol::JobSpec::load(&job).unwrap();
    let mut alone = hcx_kernels::collective::local::group(1, 1)
        .unwrap()
        .remove(0);
    let e = hcx_pipeline::calibrate::run_job_ranked(
        &spec,
        Some(&dir.path().join("fed-a")),
        &mut alone,
        &["a".to_string()],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no node of site `b`"), "{e}");
    // A site with fewer token rows than the widest layer input (12, the
    // MLP's) is refused unless the job allows it.
    std::fs::write(&job, yaml.replace("samples: 20", "samples: 1")).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hcx-cluster"))
        .args(["run", "--local", job.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("site `a` calibrates on 8 token rows")
            && err.contains("allow_small_sites"),
        "{err}"
    );
    std::fs::write(
        &job,
        yaml.replace("samples: 20", "samples: 1\n  allow_small_sites: true"),
    )
    .unwrap();
    run_tensor_file(&job, &dir.path().join("out-fed"), None);
}

#[test]
fn distilled_artifact_is_the_same_bits_on_1_2_and_3_ranks_and_lowers_block_error() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, &noise);
    let text = dir.path().join("calib.txt");
    tiny_text(&text, 600);
    let plain = tiny_job(dir.path(), "plain", &gguf, &text, "");
    let job = tiny_job(
        dir.path(),
        "distill",
        &gguf,
        &text,
        "distill: {steps: 12, lr: 0.01, batch: 16, params: [norms]}\n",
    );
    for j in [&plain, &job] {
        let yaml = std::fs::read_to_string(j).unwrap();
        std::fs::write(j, yaml.replace("samples: 4\n", "samples: 40\n")).unwrap();
    }
    let out = dir.path().join("out-distill");
    let one = run_tensor_file(&job, &out, None);
    // Every step draws 2 of the 5 micro-batches, so with 2 and 3 ranks some
    // steps' gradients come from one rank and some from several.
    for world in [1, 2, 3] {
        let o = dir.path().join(format!("distilled-{world}"));
        assert!(
            run_ranked(&job, &o, world) == one,
            "{world} ranks give another distilled artifact than the local run"
        );
    }
    let undistilled = run_tensor_file(&plain, &dir.path().join("out-plain"), None);
    assert!(undistilled != one, "distillation changed nothing");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("attribution.json")).unwrap()).unwrap();
    let blocks = report["distill"]["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 1, "{report}");
    for b in blocks {
        let (before, after) = (
            b["output_sqnr_db_before"].as_f64().unwrap(),
            b["output_sqnr_db_after"].as_f64().unwrap(),
        );
        assert!(
            after > before + 0.05,
            "block output error did not fall: {b}"
        );
        assert_eq!(b["tuned_scalars"], 2 * 8, "{b}");
    }
    let md = std::fs::read_to_string(out.join("attribution.md")).unwrap();
    assert!(md.contains("## Distillation"), "{md}");
}

#[test]
fn end_to_end_tuning_is_the_same_bits_on_1_2_and_3_ranks_and_lowers_the_kl() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, &noise);
    let text = dir.path().join("calib.txt");
    tiny_text(&text, 600);
    let blockwise = "distill: {steps: 12, lr: 0.01, batch: 16, params: [norms]";
    let plain = tiny_job(
        dir.path(),
        "blockwise",
        &gguf,
        &text,
        &format!("{blockwise}}}\n"),
    );
    let job = tiny_job(
        dir.path(),
        "e2e",
        &gguf,
        &text,
        &format!("{blockwise}, end_to_end: {{steps: 12, lr: 0.01, batch: 16}}}}\n"),
    );
    for j in [&plain, &job] {
        let yaml = std::fs::read_to_string(j).unwrap();
        std::fs::write(j, yaml.replace("samples: 4\n", "samples: 40\n")).unwrap();
    }
    let out = dir.path().join("out-e2e");
    let one = run_tensor_file(&job, &out, None);
    // Each step takes 2 of the 5 micro-batches: with 2 and 3 ranks some
    // steps' gradients come from one rank and some from several.
    for world in [1, 2, 3] {
        let o = dir.path().join(format!("e2e-{world}"));
        assert!(
            run_ranked(&job, &o, world) == one,
            "{world} ranks give another artifact than the local run"
        );
    }
    let blockwise_only = run_tensor_file(&plain, &dir.path().join("out-blockwise"), None);
    assert!(blockwise_only != one, "end-to-end tuning changed nothing");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("attribution.json")).unwrap()).unwrap();
    let e = &report["distill"]["end_to_end"];
    let (before, after) = (
        e["kl_before"].as_f64().unwrap(),
        e["kl_after"].as_f64().unwrap(),
    );
    // Measured: 3.12e-4 → 1.86e-4 (0.59 of it) on the calibration windows.
    assert!(after < 0.65 * before, "KL did not fall: {e}");
    // Two gains of the one block and the final norm's, 8 wide.
    assert_eq!(e["tuned_scalars"], 3 * 8, "{e}");
    let blockwise_report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("out-blockwise/attribution.json")).unwrap(),
    )
    .unwrap();
    assert!(blockwise_report["distill"]["end_to_end"].is_null());
    let md = std::fs::read_to_string(out.join("attribution.md")).unwrap();
    assert!(md.contains("Then end to end"), "{md}");
    // The dry run costs the tuning too.
    let dry: serde_json::Value = serde_json::from_str(&common::hcx_ok(&[
        "run",
        "--dry-run",
        "--json",
        job.to_str().unwrap(),
        "--local",
    ]))
    .unwrap();
    let walk = &dry["estimate"]["walk"];
    let (all, steps) = (
        walk["end_to_end_cpu_seconds"].as_f64().unwrap(),
        walk["end_to_end_steps_cpu_seconds"].as_f64().unwrap(),
    );
    assert!(all > steps && steps > 0.0, "{walk}");
    assert_eq!(walk["end_to_end_micro_batches_per_step"], 2, "{walk}");
}

#[test]
fn tuning_weights_before_they_are_encoded_is_the_same_bits_on_1_and_3_ranks_and_beats_calibration_alone()
 {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, &noise);
    let text = dir.path().join("calib.txt");
    tiny_text(&text, 600);
    let plain = tiny_job(dir.path(), "plain", &gguf, &text, "");
    let job = tiny_job(
        dir.path(),
        "weights",
        &gguf,
        &text,
        "distill: {steps: 12, weights_lr: 0.001, batch: 16, params: [weights]}\n",
    );
    for j in [&plain, &job] {
        let yaml = std::fs::read_to_string(j).unwrap();
        std::fs::write(j, yaml.replace("samples: 4\n", "samples: 40\n")).unwrap();
    }
    let out = dir.path().join("out-weights");
    let one = run_tensor_file(&job, &out, None);
    for world in [1, 3] {
        let o = dir.path().join(format!("weights-{world}"));
        assert!(
            run_ranked(&job, &o, world) == one,
            "{world} ranks give another artifact than the local run"
        );
    }
    // The same bytes a weight as calibration alone gives (no parameter is
    // stored), other codes.
    let plain_out = dir.path().join("out-plain");
    assert!(run_tensor_file(&plain, &plain_out, None) != one);
    let size = |d: &std::path::Path| {
        let m = hcx_pipeline::artifact::read_manifest(d).unwrap();
        m.tensors
            .iter()
            .filter(|t| t.name.ends_with("_proj.weight"))
            .map(|t| t.parts.len())
            .sum::<usize>()
    };
    assert_eq!(size(&out), size(&plain_out));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("attribution.json")).unwrap()).unwrap();
    let b = &report["distill"]["blocks"][0];
    // o (8 × 8), gate and up (12 × 8), down (8 × 12): every weight after
    // q, k and v.
    assert_eq!(b["tuned_scalars"], 64 + 3 * 96, "{b}");
    // "Before" is the block with every weight encoded by calibration
    // alone. Measured: 21.95 dB before, 25.66 after; taking each site's
    // statistics after the sites before it are encoded, without the
    // tuning, gives 22.55.
    let (before, after) = (
        b["output_sqnr_db_before"].as_f64().unwrap(),
        b["output_sqnr_db_after"].as_f64().unwrap(),
    );
    assert!(
        after > before + 3.5,
        "tuning the weights did not lower the block's output error enough: {b}"
    );
    // Each weight's recorded error is against the source, not the tuned
    // values it was coded from.
    let m = hcx_pipeline::artifact::read_manifest(&out).unwrap();
    let src = Model::open(&gguf).unwrap();
    for t in m
        .tensors
        .iter()
        .filter(|t| t.name.ends_with("_proj.weight"))
    {
        let w = hcx_pipeline::artifact::decode_values(&out, &m, &t.name).unwrap();
        let source = src.read_f32(src.tensors.iter().find(|s| s.name == t.name).unwrap());
        let err: f64 = w
            .iter()
            .zip(&source)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        let energy: f64 = source.iter().map(|&v| f64::from(v).powi(2)).sum();
        let sqnr = 10.0 * (energy / err).log10();
        assert!(
            (t.sqnr_db.unwrap() - sqnr).abs() < 1e-6,
            "{}: recorded {:?}, measured {sqnr}",
            t.name,
            t.sqnr_db
        );
    }
}

#[test]
fn distilled_corrections_are_stored_decoded_and_the_same_bits_on_1_2_and_3_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, &noise);
    let text = dir.path().join("calib.txt");
    tiny_text(&text, 600);
    let job = tiny_job(
        dir.path(),
        "corrected",
        &gguf,
        &text,
        "distill: {steps: 12, lr: 0.01, batch: 16, params: [scales, lowrank_correction], rank: 2}\n",
    );
    let yaml = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, yaml.replace("samples: 4\n", "samples: 40\n")).unwrap();
    let out = dir.path().join("out-corrected");
    let one = run_tensor_file(&job, &out, None);
    for world in [1, 2, 3] {
        let o = dir.path().join(format!("corrected-{world}"));
        assert!(
            run_ranked(&job, &o, world) == one,
            "{world} ranks give another corrected artifact than the local run"
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("attribution.json")).unwrap()).unwrap();
    let b = &report["distill"]["blocks"][0];
    // Gains for the 56 rows and 60 columns of the 7 linear weights, and
    // rank-2 factors of 2 × (56 + 60) values.
    assert_eq!(b["tuned_scalars"], 116 + 2 * 116, "{b}");
    assert_eq!(b["corrected_weights"].as_array().unwrap().len(), 7, "{b}");
    let (before, after) = (
        b["output_sqnr_db_before"].as_f64().unwrap(),
        b["output_sqnr_db_after"].as_f64().unwrap(),
    );
    assert!(
        after > before + 0.05,
        "block output error did not fall: {b}"
    );
    // Every linear weight decodes as diag(r)·Ŵ·diag(c) + A·B, with Ŵ its
    // chain's decoding and the four factors its stored f16 parts.
    let m = hcx_pipeline::artifact::read_manifest(&out).unwrap();
    let file = std::fs::read(out.join("model.hcx.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    let f16s = |name: &str| -> Vec<f32> {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F16, "{name}");
        t.data()
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    };
    let mut corrected = 0;
    for t in m
        .tensors
        .iter()
        .filter(|t| t.name.ends_with("_proj.weight"))
    {
        let last = t.steps.last().unwrap();
        assert_eq!(last.spec.kind(), "correction", "{}", t.name);
        let bytes: u64 = t
            .parts
            .iter()
            .filter(|p| p.name.contains(".correction."))
            .map(|p| p.bytes)
            .sum();
        assert_eq!(last.bytes_out - last.bytes_in, bytes, "{}", t.name);
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let w = hcx_pipeline::artifact::decode_values(&out, &m, &t.name).unwrap();
        let mut chain_only = m.clone();
        let e = chain_only
            .tensors
            .iter_mut()
            .find(|e| e.name == t.name)
            .unwrap();
        e.steps.pop();
        let w_hat = hcx_pipeline::artifact::decode_values(&out, &chain_only, &t.name).unwrap();
        let p = |s: &str| f16s(&format!("{}.correction.{s}", t.name));
        let (r, c, a, bb) = (p("rows"), p("cols"), p("a"), p("b"));
        assert_eq!(
            (r.len(), c.len(), a.len(), bb.len()),
            (rows, cols, 2 * rows, 2 * cols)
        );
        for i in 0..rows {
            for j in 0..cols {
                let ab = a[2 * i] * bb[j] + a[2 * i + 1] * bb[cols + j];
                let want = r[i] * w_hat[i * cols + j] * c[j] + ab;
                assert!(
                    (w[i * cols + j] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{} [{i}, {j}]",
                    t.name
                );
            }
        }
        corrected += 1;
    }
    assert_eq!(corrected, 7);
    let md = std::fs::read_to_string(out.join("attribution.md")).unwrap();
    assert!(md.contains("| correction | 7 |"), "{md}");
    // The decompressed model holds the corrected weights.
    let dense = dir.path().join("dense");
    common::hcx_ok(&[
        "decompress",
        out.to_str().unwrap(),
        "--output",
        dense.to_str().unwrap(),
    ]);
}

#[test]
fn bad_calibration_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, &noise);
    let fails = |name: &str, text: &Path, extra: &str| -> String {
        let job = tiny_job(dir.path(), name, &gguf, text, extra);
        let o = common::hcx(&["run", "--local", job.to_str().unwrap()]);
        assert!(!o.status.success(), "{name} should fail");
        assert!(
            !dir.path().join(format!("out-{name}")).exists(),
            "{name} left an artifact"
        );
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let e = fails("empty", &empty, "");
    assert!(e.contains("empty.txt") && e.contains("no text"), "{e}");
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "ab ba").unwrap();
    let e = fails("short", &short, "");
    assert!(
        e.contains("short.txt") && e.contains("fewer than one window of 8"),
        "{e}"
    );
    let binary = dir.path().join("binary.txt");
    std::fs::write(&binary, [b'a', b'b', 0xc3, 0x28]).unwrap();
    let e = fails("binary", &binary, "");
    assert!(e.contains("binary.txt") && e.contains("not UTF-8"), "{e}");
    let few = dir.path().join("few.txt");
    tiny_text(&few, 8);
    let e = fails("few", &few, "");
    assert!(
        e.contains("windows of 8") && e.contains("calibration.samples"),
        "{e}"
    );
    // A decoder calibrated on sentences is told what it needs.
    let text = dir.path().join("ok.txt");
    tiny_text(&text, 200);
    let job = common::write_job(
        dir.path(),
        "sentences",
        &gguf,
        &dir.path().join("out-sentences"),
        &format!(
            "pipeline:\n  - gptq: {{grid: {{rtn: {{bits: 4}}}}}}\nrules:\n  - match: [\"*norm.weight\", \"model.embed_tokens.weight\"]\n    keep: source\ncalibration:\n  sentences: {}\n  samples: 2\n",
            text.display()
        ),
    );
    let o = common::hcx(&["run", "--local", job.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("decoder") && e.contains("`text:`"),
        "{e}"
    );
    // gptq on a tensor calibration has no statistics for is refused by name.
    let job = common::write_job(
        dir.path(),
        "embed",
        &gguf,
        &dir.path().join("out-embed"),
        &format!(
            "pipeline:\n  - gptq: {{grid: {{rtn: {{bits: 4}}}}}}\nrules:\n  - match: [\"*norm.weight\"]\n    keep: source\ncalibration:\n  text: {}\n  samples: 2\n  seq_len: 8\n",
            text.display()
        ),
    );
    let o = common::hcx(&["run", "--local", job.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && e.contains("model.embed_tokens.weight")
            && e.contains("linear weights only"),
        "{e}"
    );
}

#[test]
fn an_architecture_without_a_forward_pass_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("neox");
    common::subset_model(
        &common::minilm(),
        &model,
        &["encoder.layer.0.attention.self.query.weight"],
    );
    std::fs::write(
        model.join("config.json"),
        r#"{"architectures": ["GPTNeoXForCausalLM"], "hidden_size": 8}"#,
    )
    .unwrap();
    let text = dir.path().join("t.txt");
    tiny_text(&text, 200);
    let job = common::write_job(
        dir.path(),
        "neox",
        &model,
        &dir.path().join("out"),
        &format!(
            "pipeline:\n  - gptq: {{grid: {{rtn: {{bits: 4}}}}}}\ncalibration:\n  text: {}\n  samples: 2\n  seq_len: 8\n",
            text.display()
        ),
    );
    let o = common::hcx(&["run", "--local", job.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("GPTNeoXForCausalLM") && e.contains("no forward pass"),
        "{e}"
    );
}

#[test]
fn smollm2_calibrated_run_is_deterministic_and_decompresses_sharded() {
    let gguf = common::smollm2();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let job = common::write_job(
        dir.path(),
        "smol",
        &gguf,
        &out,
        "pipeline:\n  - rtn: {bits: 8, group: 32}\n  - zstd: {level: 3}\nrules:\n  - match: [\"*norm.weight\"]\n    keep: source\n  - match: [\"model.embed_tokens.weight\"]\n    keep: int8\n  - match: [\"model.layers.0.*\", \"model.layers.29.*\"]\n    pipeline:\n      - hadamard: {}\n      - gptq: {grid: {uniform: {bits: 3.4}}}\n      - zstd: {level: 3}\ncalibration:\n  text: [/usr/share/common-licenses/GPL-2, /usr/share/common-licenses/MPL-2.0]\n  samples: 4\n  seq_len: 64\n",
    );
    let run = |threads: Option<&str>| run_tensor_file(&job, &out, threads);
    let first = run(None);
    assert_eq!(first, run(Some("1")), "one thread and all cores");
    assert_eq!(first, run(None), "the same calibrated job twice");
    // Decompressed past a 200 MB limit: shards and an HF index.
    let dense = dir.path().join("dense");
    common::hcx_ok(&[
        "decompress",
        out.to_str().unwrap(),
        "--output",
        dense.to_str().unwrap(),
        "--max-shard-size",
        "200MB",
    ]);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dense.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), 272, "every tensor is in the index");
    assert_eq!(
        map["model.layers.0.self_attn.q_proj.weight"],
        "model-00001-of-00003.safetensors"
    );
    for i in 1..=3 {
        let f = dense.join(format!("model-0000{i}-of-00003.safetensors"));
        assert!(
            std::fs::metadata(&f).unwrap().len() <= 200_000_000,
            "{}",
            f.display()
        );
    }
    assert!(Model::open(&dense).unwrap().tensors.len() == 272);
    let eval = common::hcx_ok(&[
        "eval",
        "--reference",
        gguf.to_str().unwrap(),
        "--candidate",
        dense.to_str().unwrap(),
        "--ctx",
        "64",
        "--max-tokens",
        "512",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&eval).unwrap();
    let d = &v["decoder"];
    println!("{d}");
    // int8 everywhere but two 3.4-bit blocks: a small drift, not none.
    let kl = d["mean_kl"].as_f64().unwrap();
    assert!(kl > 0.0 && kl < 0.1, "{d}");
    assert!(d["top1_agreement"].as_f64().unwrap() > 0.85, "{d}");
}

/// Bits per weight over the 210 linear weights of an artifact, from `inspect`.
fn linear_bits(artifact: &Path) -> f64 {
    let out = common::hcx_ok(&[
        "inspect",
        artifact.to_str().unwrap(),
        "--match",
        "model.layers.*_proj.weight",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["selected"]["tensors"], 210);
    v["selected"]["bits_per_weight"].as_f64().unwrap()
}

fn decoder_eval(gguf: &Path, artifact: &Path) -> serde_json::Value {
    let out = common::hcx_ok(&[
        "eval",
        "--reference",
        gguf.to_str().unwrap(),
        "--candidate",
        artifact.to_str().unwrap(),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["decoder"].clone()
}

/// Runs an example SmolLM2 job, its text changed by `edit`, and returns its
/// KL divergence from the source on the evaluation text, checking its bits
/// per weight.
fn smollm2_kl(name: &str, edit: &dyn Fn(String) -> String) -> f64 {
    let gguf = common::smollm2();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(name);
    let job = common::example_job(dir.path(), name, &gguf, &out);
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, edit(text)).unwrap();
    common::hcx_ok(&["run", "--local", job.to_str().unwrap()]);
    let bits = linear_bits(&out);
    let d = decoder_eval(&gguf, &out);
    println!("{name}: {bits:.3} bits per weight, {d}");
    assert!(bits <= 4.5, "{name}: {bits}");
    assert_eq!(
        d["scored"], 4064,
        "32 windows, the second half of each scored"
    );
    d["mean_kl"].as_f64().unwrap()
}

// Measured: KL 0.368 without calibration; with calibration (sequential
// GPTQ on the Hadamard-rotated uniform grid) 0.0314 on the example's 128
// windows of 256 tokens (its README row), 0.0321 on the first 64 of them
// and 0.0333 on the first 32, which the test runs to keep the suite's time
// in bounds (169 s on 2 cores, against about 300 s with 64), on a 2-core
// Intel Xeon. The forward passes' matrix products are chosen by CPU
// features, so the calibrated bits differ between CPU kinds: the same 32
// windows measure 0.0356 on the 2-core AMD EPYC machines CI also runs on.
// Each job is its own test, with its gate just above its figure (the
// higher of the two machines'), so the two can run side by side.

#[test]
fn smollm2_4bit_meets_its_kl_gate() {
    let kl = smollm2_kl("smollm2-4bit", &|t| t);
    assert!(kl <= 0.38, "uncalibrated KL {kl}");
}

#[test]
fn smollm2_4bit_gptq_meets_its_kl_gate() {
    let kl = smollm2_kl("smollm2-4bit-gptq", &|t| {
        assert!(t.contains("  samples: 128\n"));
        t.replace("  samples: 128\n", "  samples: 32\n")
    });
    assert!(kl <= 0.036, "calibrated KL {kl}");
}

/// Exports `artifact` as GGUF in `block`, dumps the file with llama.cpp's
/// own reader, and checks every tensor against our reader's and the
/// artifact's values; returns the dump's metadata and the export's path.
fn export_and_read_back(
    artifact: &Path,
    dir: &Path,
    block: &str,
) -> (serde_json::Value, std::path::PathBuf) {
    let out = dir.join(format!("gguf-{block}"));
    let report: serde_json::Value = serde_json::from_str(&common::hcx_ok(&[
        "export",
        artifact.to_str().unwrap(),
        "--format",
        "gguf",
        "--gguf-type",
        block,
        "--output",
        out.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let file = out.join("model.gguf");
    assert_eq!(
        report["bytes"].as_u64().unwrap(),
        std::fs::metadata(&file).unwrap().len()
    );
    let dump = dir.join(format!("dump-{block}"));
    std::fs::create_dir_all(&dump).unwrap();
    let py = std::process::Command::new("python3")
        .arg(common::root().join("tests/python/gguf_dump.py"))
        .arg(&file)
        .arg(&dump)
        .env("PYTHONPATH", common::python_readers())
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "gguf_dump.py failed: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dump.join("meta.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dump.join("tensors.safetensors")).unwrap();
    let theirs = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // Our reader reads the exported file back under HF names.
    let ours = hcx_pipeline::gguf::read(&file).unwrap();
    let m = hcx_pipeline::artifact::read_manifest(artifact).unwrap();
    assert_eq!(theirs.len(), m.tensors.len());
    assert_eq!(ours.tensors.len(), m.tensors.len());
    let heads = 9; // SmolLM2-135M: 9 query heads, 3 key/value heads.
    for t in &ours.tensors {
        let g = hcx_pipeline::gguf::gguf_name(&t.name).unwrap();
        let view = theirs.tensor(&g).unwrap();
        assert_eq!(view.shape(), t.shape.as_slice(), "{g}");
        let read: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (rows, cols) = (t.shape[0], t.values.len() / t.shape[0]);
        let h = if g.contains(".attn_q.") {
            Some(heads)
        } else if g.contains(".attn_k.") {
            Some(3)
        } else {
            None
        };
        let to_gguf = |v: &[f32]| match h {
            Some(h) => permute_rows(v, rows, cols, h),
            None => v.to_vec(),
        };
        // llama.cpp's reader and ours decode the same blocks to the same
        // bits.
        assert!(
            to_gguf(&t.values)
                .iter()
                .zip(&read)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{g}: the gguf package and our reader disagree"
        );
        // Q8_0 blocks stay within one step (the block's largest magnitude
        // over 127) of the artifact's weights.
        let artifact_values = hcx_pipeline::artifact::decode_values(artifact, &m, &t.name).unwrap();
        let want = to_gguf(&artifact_values);
        match meta["types"][&g].as_str().unwrap() {
            "F32" => assert_eq!(read, want, "{g}"),
            "Q8_0" => {
                for (a, b) in want.chunks(32).zip(read.chunks(32)) {
                    let step = a.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                    for (x, y) in a.iter().zip(b) {
                        assert!((x - y).abs() <= step * 1.001 + 1e-7, "{g}: {x} vs {y}");
                    }
                }
            }
            _ => {}
        }
    }
    // The hyperparameters and the vocabulary survive: our reader rebuilds
    // the artifact's config.json and tokenizer.json from the metadata.
    let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    let file_json = |n: &str| json(&std::fs::read_to_string(artifact.join(n)).unwrap());
    assert_eq!(json(&ours.config_json), file_json("config.json"));
    assert_eq!(
        json(ours.tokenizer_json.as_deref().unwrap()),
        file_json("tokenizer.json")
    );
    (meta, file)
}

// Measured on SmolLM2's int8 example exported as Q8_0: mean KL 0.00295
// from the source over the first 2,048 evaluation tokens (the artifact
// itself: 0.00302).
#[test]
fn exports_read_back_in_readers_we_did_not_write_with_our_weights() {
    let gguf = common::smollm2();
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("int8");
    let job = common::example_job(dir.path(), "smollm2-int8", &gguf, &artifact);
    common::hcx_ok(&["run", "--local", job.to_str().unwrap()]);

    let (meta, file) = export_and_read_back(&artifact, dir.path(), "q8_0");
    let md = &meta["metadata"];
    assert_eq!(md["general.architecture"], "llama");
    assert_eq!(md["general.file_type"], 7);
    assert_eq!(md["llama.block_count"], 30);
    assert_eq!(md["llama.attention.head_count_kv"], 3);
    assert_eq!(md["tokenizer.ggml.pre"], "smollm");
    assert_eq!(md["tokenizer.ggml.tokens"]["len"], 49152);
    let types = meta["types"].as_object().unwrap();
    assert_eq!(types.values().filter(|t| *t == "Q8_0").count(), 211);
    assert_eq!(types.values().filter(|t| *t == "F32").count(), 61);

    // The exported model runs: measured at its output against the source.
    let out = common::hcx_ok(&[
        "eval",
        "--reference",
        gguf.to_str().unwrap(),
        "--candidate",
        file.to_str().unwrap(),
        "--max-tokens",
        "2048",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kl = v["decoder"]["mean_kl"].as_f64().unwrap();
    println!("exported Q8_0: mean KL {kl}");
    assert!(kl <= 0.0031, "exported Q8_0: mean KL {kl}");

    // Q6_K where rows split into super-blocks of 256 (the MLP's down
    // projection, 1,536 wide), Q8_0 for the 576-wide rest.
    let (meta, _) = export_and_read_back(&artifact, dir.path(), "q6_k");
    assert_eq!(meta["metadata"]["general.file_type"], 18);
    let types = meta["types"].as_object().unwrap();
    let down = types
        .iter()
        .filter(|(k, _)| k.ends_with("ffn_down.weight"))
        .all(|(_, t)| t == "Q6_K");
    assert!(down, "{types:?}");
    assert_eq!(types.values().filter(|t| *t == "Q6_K").count(), 30);

    // The same artifact as compressed-tensors: its own int8 groups of 32,
    // code for code.
    let q = common::compressed_tensors_equal_ours(&artifact, dir.path(), &[]);
    let w = &q["config_groups"]["group_0"]["weights"];
    assert_eq!(
        (w["num_bits"].as_u64(), w["group_size"].as_u64()),
        (Some(8), Some(32))
    );
}

// Measured: the 60 MB target lands at 60,102,913 bytes (+0.17 %), the 210
// linear weights at 1.00–3.24 bits; the allocation has 0.17 dB less
// squared weight error than 2.26 bits for all, yet a higher KL at the
// output (4.72 against 3.95 on the first 2,048 evaluation tokens): weight
// error alone is not what the model's output feels (see the README).
#[test]
fn a_size_target_lands_within_1_percent() {
    let gguf = common::smollm2();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("target");
    let job = common::example_job(dir.path(), "smollm2-target-60mb", &gguf, &out);
    common::hcx_ok(&["run", "--local", job.to_str().unwrap()]);
    let ins: serde_json::Value = serde_json::from_str(&common::hcx_ok(&[
        "inspect",
        out.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let bytes = ins["artifact_bytes"].as_f64().unwrap();
    println!("smollm2-target-60mb: {bytes} bytes");
    assert!((bytes / 60e6 - 1.0).abs() <= 0.01, "{bytes} bytes");
    // The manifest records what ran: one rule per linear weight with its
    // rate, and no target left to resolve.
    let m = hcx_pipeline::artifact::read_manifest(&out).unwrap();
    assert!(m.job.target.is_none());
    assert!(m.job.rules.len() >= 210, "{}", m.job.rules.len());
}
