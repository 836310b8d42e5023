//! Writes a safetensors file tensor by tensor with bounded memory: data goes
//! to a spill file as it comes, and [`TensorFileWriter::finish`] writes the
//! header and copies the data behind it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::PipelineError;

/// A safetensors file being written.
pub struct TensorFileWriter {
    path: PathBuf,
    spill_path: PathBuf,
    spill: BufWriter<File>,
    entries: Vec<(String, String, Vec<usize>, u64, u64)>,
    offset: u64,
}

/// What [`TensorFileWriter::finish`] reports.
#[derive(Debug, Clone)]
pub struct WrittenFile {
    /// Size of the file.
    pub bytes: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// Header bytes each tensor's entry takes, by name.
    pub header_bytes: BTreeMap<String, u64>,
}

impl TensorFileWriter {
    /// Starts a file at `path` (its spill file sits beside it).
    pub fn create(path: &Path) -> Result<TensorFileWriter, PipelineError> {
        let spill_path = path.with_extension("data.partial");
        let f = File::create(&spill_path)
            .map_err(|e| PipelineError::io(&spill_path, "cannot create", e))?;
        Ok(TensorFileWriter {
            path: path.to_path_buf(),
            spill_path,
            spill: BufWriter::new(f),
            entries: Vec::new(),
            offset: 0,
        })
    }

    /// Appends a tensor.
    pub fn add(
        &mut self,
        name: &str,
        dtype: &str,
        shape: &[usize],
        data: &[u8],
    ) -> Result<(), PipelineError> {
        self.add_with(name, dtype, shape, data.len() as u64, |write| write(data))
    }

    /// Appends a tensor of `len` bytes written in pieces: `fill` gets a
    /// function that appends bytes, and must append exactly `len` of them.
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
        let start = self.offset;
        let (spill, spill_path, offset) = (&mut self.spill, &self.spill_path, &mut self.offset);
        fill(&mut |data: &[u8]| {
            spill
                .write_all(data)
                .map_err(|e| PipelineError::io(spill_path, "cannot write", e))?;
            *offset += data.len() as u64;
            Ok(())
        })?;
        if self.offset - start != len {
            return Err(PipelineError::Output {
                path: self.path.clone(),
                why: format!(
                    "tensor `{name}`: {} bytes written, {len} expected",
                    self.offset - start
                ),
            });
        }
        self.entries.push((
            name.to_string(),
            dtype.to_string(),
            shape.to_vec(),
            start,
            self.offset,
        ));
        Ok(())
    }

    /// Writes the header and the data; removes the spill file.
    pub fn finish(
        mut self,
        metadata: &BTreeMap<String, String>,
    ) -> Result<WrittenFile, PipelineError> {
        self.spill
            .flush()
            .map_err(|e| PipelineError::io(&self.spill_path, "cannot write", e))?;
        drop(self.spill);
        let mut header = String::from("{");
        if !metadata.is_empty() {
            header.push_str("\"__metadata__\":");
            header.push_str(&serde_json::to_string(metadata).unwrap_or_else(|_| "{}".into()));
        }
        let mut header_bytes = BTreeMap::new();
        for (name, dtype, shape, a, b) in &self.entries {
            let sep = if header.len() > 1 { "," } else { "" };
            let shape_s: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            let entry = format!(
                "{sep}{}:{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{a},{b}]}}",
                serde_json::to_string(name).unwrap_or_default(),
                shape_s.join(",")
            );
            header_bytes.insert(name.clone(), entry.len() as u64);
            header.push_str(&entry);
        }
        header.push('}');
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let out = File::create(&self.path)
            .map_err(|e| PipelineError::io(&self.path, "cannot create", e))?;
        let mut w = BufWriter::new(out);
        let mut hash = Sha256::new();
        let len = (header.len() as u64).to_le_bytes();
        for chunk in [&len[..], header.as_bytes()] {
            w.write_all(chunk)
                .map_err(|e| PipelineError::io(&self.path, "cannot write", e))?;
            hash.update(chunk);
        }
        let spill = File::open(&self.spill_path)
            .map_err(|e| PipelineError::io(&self.spill_path, "cannot reopen", e))?;
        let mut r = BufReader::new(spill);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r
                .read(&mut buf)
                .map_err(|e| PipelineError::io(&self.spill_path, "cannot read", e))?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n])
                .map_err(|e| PipelineError::io(&self.path, "cannot write", e))?;
            hash.update(&buf[..n]);
        }
        let file = w
            .into_inner()
            .map_err(|e| PipelineError::io(&self.path, "cannot write", e.into_error()))?;
        file.sync_all()
            .map_err(|e| PipelineError::io(&self.path, "cannot sync", e))?;
        std::fs::remove_file(&self.spill_path)
            .map_err(|e| PipelineError::io(&self.spill_path, "cannot remove", e))?;
        Ok(WrittenFile {
            bytes: 8 + header.len() as u64 + self.offset,
            sha256: hex::encode(hash.finalize()),
            header_bytes,
        })
    }
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, PipelineError> {
    let f = File::open(path).map_err(|e| PipelineError::io(path, "cannot open", e))?;
    let mut r = BufReader::new(f);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| PipelineError::io(path, "cannot read", e))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(hex::encode(hash.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_file_loads_with_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let mut w = TensorFileWriter::create(&p).unwrap();
        w.add("a.codes", "U8", &[3], &[1, 2, 3]).unwrap();
        w.add("b", "F32", &[2], &[0, 0, 128, 63, 0, 0, 0, 64])
            .unwrap();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "x".to_string());
        let out = w.finish(&meta).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(out.bytes, bytes.len() as u64);
        assert_eq!(out.sha256, sha256_file(&p).unwrap());
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a.codes").unwrap().data(), &[1, 2, 3]);
        assert_eq!(st.tensor("b").unwrap().shape(), &[2]);
        assert!(!p.with_extension("data.partial").exists());
    }
}
