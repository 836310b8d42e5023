//! Writing a dense model folder in Hugging Face's layout: one
//! `model.safetensors`, or, past a size limit, shards
//! `model-00001-of-0000N.safetensors` listed by `model.safetensors.index.json`
//! (`metadata.total_size` and a `weight_map` from tensor to file), as
//! `transformers` writes and reads them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::PipelineError;
use crate::writer::TensorFileWriter;

/// The default shard limit, as `--max-shard-size` takes it: 5 GB.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Which file each tensor goes to: tensors in order, a new file started when
/// the next tensor would take the current one past `max_bytes` (a tensor
/// larger than the limit gets a file of its own).
pub fn plan_shards(bytes: &[u64], max_bytes: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut shard = 0usize;
    let mut used = 0u64;
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 && used > 0 && used + b > max_bytes {
            shard += 1;
            used = 0;
        }
        used += b;
        out.push(shard);
    }
    out
}

/// The file name of shard `i` of `n` (`model.safetensors` when `n` is 1).
pub fn shard_name(i: usize, n: usize) -> String {
    if n <= 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// Writes tensors, in a fixed order, into the shards a plan gives.
pub struct DenseWriter {
    dir: PathBuf,
    names: Vec<String>,
    plan: Vec<usize>,
    shards: usize,
    next: usize,
    current: Option<TensorFileWriter>,
    total: u64,
}

impl DenseWriter {
    /// Plans the files for `tensors` (name and data bytes, in the order
    /// they will be added) under `dir`.
    pub fn new(dir: &Path, tensors: &[(String, u64)], max_shard_bytes: u64) -> DenseWriter {
        let bytes: Vec<u64> = tensors.iter().map(|t| t.1).collect();
        let plan = plan_shards(&bytes, max_shard_bytes.max(1));
        let shards = plan.last().map_or(1, |s| s + 1);
        DenseWriter {
            dir: dir.to_path_buf(),
            names: tensors.iter().map(|t| t.0.clone()).collect(),
            plan,
            shards,
            next: 0,
            current: None,
            total: bytes.iter().sum(),
        }
    }

    /// Number of files the model is split into.
    pub fn shards(&self) -> usize {
        self.shards
    }

    fn close(&mut self) -> Result<(), PipelineError> {
        if let Some(w) = self.current.take() {
            let mut meta = BTreeMap::new();
            meta.insert("format".to_string(), "pt".to_string());
            w.finish(&meta)?;
        }
        Ok(())
    }

    /// Adds the next tensor; names must come in the planned order.
    pub fn add(
        &mut self,
        name: &str,
        dtype: &str,
        shape: &[usize],
        data: &[u8],
    ) -> Result<(), PipelineError> {
        self.add_with(name, dtype, shape, data.len() as u64, |write| write(data))
    }

    /// [`DenseWriter::add`] for a tensor of `len` bytes written in pieces
    /// (see [`TensorFileWriter::add_with`]).
    pub fn add_with(
        &mut self,
        name: &str,
        dtype: &str,
        shape: &[usize],
        len: u64,
        fill: impl FnOnce(
            &mut dyn FnMut(&[u8]) -> Result<(), PipelineError>,
        ) -> Result<(), PipelineError>,
    ) -> Result<(), PipelineError> {
        let i = self.next;
        if self.names.get(i).map(String::as_str) != Some(name) {
            return Err(PipelineError::Output {
                path: self.dir.clone(),
                why: format!("tensor `{name}` written out of the planned order"),
            });
        }
        let shard = self.plan[i];
        if i == 0 || self.plan[i - 1] != shard {
            self.close()?;
            self.current = Some(TensorFileWriter::create(
                &self.dir.join(shard_name(shard, self.shards)),
            )?);
        }
        if let Some(w) = self.current.as_mut() {
            w.add_with(name, dtype, shape, len, fill)?;
        }
        self.next += 1;
        Ok(())
    }

    /// Closes the last file and, for a sharded model, writes the index.
    pub fn finish(mut self) -> Result<(), PipelineError> {
        if self.next != self.names.len() {
            return Err(PipelineError::Output {
                path: self.dir.clone(),
                why: format!("{} of {} tensors written", self.next, self.names.len()),
            });
        }
        self.close()?;
        if self.shards > 1 {
            let map: BTreeMap<&str, String> = self
                .names
                .iter()
                .zip(&self.plan)
                .map(|(n, s)| (n.as_str(), shard_name(*s, self.shards)))
                .collect();
            let index = serde_json::json!({
                "metadata": {"total_size": self.total},
                "weight_map": map,
            });
            let path = self.dir.join("model.safetensors.index.json");
            let text = serde_json::to_string_pretty(&index).unwrap_or_default() + "\n";
            std::fs::write(&path, text).map_err(|e| PipelineError::io(&path, "cannot write", e))?;
        }
        Ok(())
    }
}

/// Parses a size such as `5GB`, `500MB`, `2GiB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    hcx_protocol::job::parse_size(s)
}

/// Writes a source model as a dense HF folder at `output` (which must not
/// exist yet): its tensors as the source gives them (a GGUF's dequantized to
/// f32) and its config and tokenizer files. This is how a GGUF becomes the
/// reference folder evaluation compares against.
pub fn write_model(
    model: &crate::model::Model,
    output: &Path,
    max_shard_bytes: u64,
) -> Result<(), PipelineError> {
    if output.exists() {
        return Err(PipelineError::Output {
            path: output.to_path_buf(),
            why: "exists already".into(),
        });
    }
    std::fs::create_dir_all(output).map_err(|e| PipelineError::io(output, "cannot create", e))?;
    let planned: Vec<(String, u64)> = model
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.bytes() as u64))
        .collect();
    let mut w = DenseWriter::new(output, &planned, max_shard_bytes);
    for t in &model.tensors {
        w.add(
            &t.name,
            &crate::model::dtype_str(t.dtype),
            &t.shape,
            model.raw(t),
        )?;
    }
    w.finish()?;
    for (name, data) in &model.generated {
        let p = output.join(name);
        std::fs::write(&p, data).map_err(|e| PipelineError::io(&p, "cannot write", e))?;
    }
    if !model.is_gguf() {
        for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            let from = model.dir.join(name);
            if from.is_file() {
                let to = output.join(name);
                std::fs::copy(&from, &to)
                    .map_err(|e| PipelineError::io(&from, "cannot copy", e))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_fill_up_to_the_limit() {
        assert_eq!(plan_shards(&[4, 4, 4, 10, 1], 8), vec![0, 0, 1, 2, 3]);
        assert_eq!(plan_shards(&[1, 2, 3], 100), vec![0, 0, 0]);
        assert_eq!(shard_name(0, 1), "model.safetensors");
        assert_eq!(shard_name(1, 3), "model-00002-of-00003.safetensors");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("5XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("0").is_err());
    }
}
