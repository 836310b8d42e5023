//! Writes a generated, seeded Llama-shaped bf16 model (safetensors) for
//! scale tests, one tensor at a time, so the generator itself never holds
//! more than one tensor's worth of a buffer:
//!
//! ```text
//! cargo run --release --example gen_llama -- SHAPE SEED OUT_DIR [--zeros]
//! ```
//!
//! SHAPE is `3b` (Llama-3.2-3B: 28 blocks of 3072, 3.2 B parameters, 6.4 GB),
//! `7b` (Llama-2-7B: 32 blocks of 4096, 6.7 B parameters, 13.5 GB), `70b`
//! (Llama-3-70B: 80 blocks of 8192, 70.6 B parameters, 141 GB) or `tiny`
//! (2 blocks of 256, for trying the tool). With `--zeros` the file gets its
//! header and its full length but no values: a sparse file of zeros that
//! takes no disk, for plans and dry runs (`run --dry-run`) at sizes the
//! disk cannot hold. Values are Gaussian-like
//! (the sum of four uniforms) with a standard deviation of 0.02 for
//! matrices and 1 for norms, from a xorshift generator seeded by SEED and
//! the tensor's name, so the same arguments give the same bytes. The model
//! folder also gets a `config.json` with the shape.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

/// A Llama shape.
struct Shape {
    layers: u64,
    hidden: u64,
    kv: u64,
    inter: u64,
    vocab: u64,
    heads: u64,
    tied: bool,
}

fn shape(name: &str) -> Option<Shape> {
    Some(match name {
        "3b" => Shape {
            layers: 28,
            hidden: 3072,
            kv: 1024,
            inter: 8192,
            vocab: 128_256,
            heads: 24,
            tied: true,
        },
        "7b" => Shape {
            layers: 32,
            hidden: 4096,
            kv: 4096,
            inter: 11_008,
            vocab: 32_000,
            heads: 32,
            tied: false,
        },
        "70b" => Shape {
            layers: 80,
            hidden: 8192,
            kv: 1024,
            inter: 28_672,
            vocab: 128_256,
            heads: 64,
            tied: false,
        },
        "tiny" => Shape {
            layers: 2,
            hidden: 256,
            kv: 128,
            inter: 512,
            vocab: 1000,
            heads: 4,
            tied: true,
        },
        _ => return None,
    })
}

fn tensors(s: &Shape) -> Vec<(String, Vec<u64>)> {
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![s.vocab, s.hidden],
    )];
    for i in 0..s.layers {
        for (name, dims) in [
            ("input_layernorm.weight", vec![s.hidden]),
            ("mlp.down_proj.weight", vec![s.hidden, s.inter]),
            ("mlp.gate_proj.weight", vec![s.inter, s.hidden]),
            ("mlp.up_proj.weight", vec![s.inter, s.hidden]),
            ("post_attention_layernorm.weight", vec![s.hidden]),
            ("self_attn.k_proj.weight", vec![s.kv, s.hidden]),
            ("self_attn.o_proj.weight", vec![s.hidden, s.hidden]),
            ("self_attn.q_proj.weight", vec![s.hidden, s.hidden]),
            ("self_attn.v_proj.weight", vec![s.kv, s.hidden]),
        ] {
            t.push((format!("model.layers.{i}.{name}"), dims));
        }
    }
    t.push(("model.norm.weight".into(), vec![s.hidden]));
    if !s.tied {
        t.push(("lm_head.weight".into(), vec![s.vocab, s.hidden]));
    }
    t
}

/// FNV-1a of the seed and the name: each tensor's generator state.
fn seed_of(seed: u64, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h | 1
}

/// bf16 bits of an f32, rounded to nearest even.
fn bf16(v: f32) -> u16 {
    let b = v.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: gen_llama SHAPE(3b|7b|70b|tiny) SEED OUT_DIR [--zeros]";
    let (name, seed, out, zeros) = match args.as_slice() {
        [name, seed, out] => (name, seed, out, false),
        [name, seed, out, z] if z == "--zeros" => (name, seed, out, true),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let Some(s) = shape(name) else {
        eprintln!("unknown shape {name:?}; {usage}");
        std::process::exit(2);
    };
    let Ok(seed) = seed.parse::<u64>() else {
        eprintln!("SEED {seed:?} is not a whole number; {usage}");
        std::process::exit(2);
    };
    let dir = PathBuf::from(out);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let list = tensors(&s);
    let mut header = serde_json::Map::new();
    let mut at = 0u64;
    for (n, dims) in &list {
        let bytes = dims.iter().product::<u64>() * 2;
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": "BF16", "shape": dims, "data_offsets": [at, at + bytes]}),
        );
        at += bytes;
    }
    let mut text = serde_json::to_string(&header).expect("header");
    while !(text.len() + 8).is_multiple_of(8) {
        text.push(' ');
    }
    let path = dir.join("model.safetensors");
    let file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut w = BufWriter::with_capacity(8 << 20, file);
    let io = |e: std::io::Error| panic!("{}: {e}", path.display());
    w.write_all(&(text.len() as u64).to_le_bytes())
        .unwrap_or_else(io);
    w.write_all(text.as_bytes()).unwrap_or_else(io);
    let mut params = 0u64;
    let mut buf = Vec::new();
    if zeros {
        params = list.iter().map(|(_, d)| d.iter().product::<u64>()).sum();
        w.flush().unwrap_or_else(io);
        let file = w
            .into_inner()
            .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.error()));
        file.set_len(8 + text.len() as u64 + at).unwrap_or_else(io);
        w = BufWriter::new(file);
    }
    for (n, dims) in list.iter().filter(|_| !zeros) {
        let count = dims.iter().product::<u64>();
        params += count;
        let norm = dims.len() == 1;
        let mut x = seed_of(seed, n);
        buf.clear();
        buf.reserve(count as usize * 2);
        for _ in 0..count {
            // Sum of four uniforms in [0, 1): mean 2, variance 1/3.
            let mut sum = 0f32;
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                sum += (x >> 40) as f32 / (1u64 << 24) as f32;
            }
            let g = (sum - 2.0) * 3f32.sqrt();
            let v = if norm { 1.0 + 0.1 * g } else { 0.02 * g };
            buf.extend_from_slice(&bf16(v).to_le_bytes());
        }
        w.write_all(&buf).unwrap_or_else(io);
    }
    w.flush().unwrap_or_else(io);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.inter,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv / (s.hidden / s.heads),
        "vocab_size": s.vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": s.tied,
        "torch_dtype": "bfloat16",
    });
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, serde_json::to_string_pretty(&config).expect("config"))
        .unwrap_or_else(|e| panic!("{}: {e}", cfg.display()));
    println!(
        "{}: {} tensors, {:.2} B parameters, {:.2} GB",
        path.display(),
        list.len(),
        params as f64 / 1e9,
        (at + 8 + text.len() as u64) as f64 / 1e9
    );
}
