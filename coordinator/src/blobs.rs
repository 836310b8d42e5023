//! Content-addressed files in a coordinator's data dir: the models `submit`
//! sends, the shard files nodes upload and the artifacts the leader merges,
//! each named by the SHA-256 of its bytes.
//!
//! A blob arrives in pieces into `partial/<sha>` (so an interrupted transfer
//! resumes where it stopped), and moves to `<sha>` only once its length and
//! hash are checked and its bytes synced: a complete blob is always whole.
//! Two jobs sending the same file share one blob.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use hcx_protocol::job::is_sha256_hex;
use sha2::{Digest, Sha256};

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The name is not a SHA-256 in lowercase hex.
    #[error("{0:?} is not a SHA-256 in lowercase hex")]
    BadDigest(String),
    /// A file operation failed.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A piece does not continue what is held.
    #[error("blob {sha}: a piece at byte {offset} does not continue the {have} bytes held")]
    Gap {
        /// The blob.
        sha: String,
        /// Where the piece starts.
        offset: u64,
        /// Bytes held.
        have: u64,
    },
    /// More bytes than the blob's announced length.
    #[error("blob {sha}: {got} bytes is more than its announced {total}")]
    TooLong {
        /// The blob.
        sha: String,
        /// Announced length.
        total: u64,
        /// Bytes it would have.
        got: u64,
    },
    /// The bytes do not hash to the blob's name.
    #[error("blob {sha}: the {bytes} bytes received hash to {got}; the piece is dropped")]
    Mismatch {
        /// The blob.
        sha: String,
        /// What they hash to.
        got: String,
        /// How many bytes.
        bytes: u64,
    },
}

/// A folder of blobs.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> BlobError {
    let path = path.to_path_buf();
    move |source| BlobError::Io { path, what, source }
}

/// SHA-256 of a file's bytes, lowercase hex, and its length.
pub fn hash_file(path: &Path) -> Result<(String, u64), BlobError> {
    let mut f = File::open(path).map_err(io(path, "cannot open"))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io(path, "cannot read"))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

impl BlobStore {
    /// Opens (creating) the store in `dir`; pieces of earlier transfers stay
    /// to be resumed.
    pub fn open(dir: &Path) -> Result<BlobStore, BlobError> {
        let partial = dir.join("partial");
        std::fs::create_dir_all(&partial).map_err(io(&partial, "cannot create"))?;
        Ok(BlobStore {
            dir: dir.to_path_buf(),
        })
    }

    fn checked(sha: &str) -> Result<(), BlobError> {
        if is_sha256_hex(sha) {
            Ok(())
        } else {
            Err(BlobError::BadDigest(sha.to_string()))
        }
    }

    /// Where the complete blob `sha` lies (whether or not it is held).
    pub fn path(&self, sha: &str) -> Result<PathBuf, BlobError> {
        Self::checked(sha)?;
        Ok(self.dir.join(sha))
    }

    fn partial(&self, sha: &str) -> PathBuf {
        self.dir.join("partial").join(sha)
    }

    /// The complete blob's length, if it is held.
    pub fn has(&self, sha: &str) -> Result<Option<u64>, BlobError> {
        let p = self.path(sha)?;
        match std::fs::metadata(&p) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p, "cannot stat")(e)),
        }
    }

    /// Bytes held of `sha`: its length when complete, else what the
    /// interrupted transfer left (where the next piece starts).
    pub fn held(&self, sha: &str) -> Result<(u64, bool), BlobError> {
        if let Some(n) = self.has(sha)? {
            return Ok((n, true));
        }
        let p = self.partial(sha);
        match std::fs::metadata(&p) {
            Ok(m) => Ok((m.len(), false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((0, false)),
            Err(e) => Err(io(&p, "cannot stat")(e)),
        }
    }

    /// Writes a piece of `sha` (announced `total` bytes long) at `offset`,
    /// which must not pass what is held; a piece that starts earlier
    /// replaces the bytes from there on. Returns the bytes now held.
    pub fn write(&self, sha: &str, total: u64, offset: u64, data: &[u8]) -> Result<u64, BlobError> {
        Self::checked(sha)?;
        let p = self.partial(sha);
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&p)
            .map_err(io(&p, "cannot open"))?;
        let have = f.metadata().map_err(io(&p, "cannot stat"))?.len();
        if offset > have {
            return Err(BlobError::Gap {
                sha: sha.to_string(),
                offset,
                have,
            });
        }
        let end = offset + data.len() as u64;
        if end > total {
            return Err(BlobError::TooLong {
                sha: sha.to_string(),
                total,
                got: end,
            });
        }
        if offset < have {
            f.set_len(offset).map_err(io(&p, "cannot truncate"))?;
        }
        f.seek(SeekFrom::Start(offset))
            .map_err(io(&p, "cannot seek"))?;
        f.write_all(data).map_err(io(&p, "cannot write"))?;
        Ok(end)
    }

    /// Checks a fully received `sha` (`total` bytes) against its name and
    /// makes it complete; bytes that hash wrong are dropped. Two transfers
    /// of the same blob finishing at once both succeed.
    pub fn finish(&self, sha: &str, total: u64) -> Result<(), BlobError> {
        match self.finish_once(sha, total) {
            Err(_) if self.has(sha)?.is_some() => {
                self.touch(sha);
                Ok(())
            }
            r => r,
        }
    }

    fn finish_once(&self, sha: &str, total: u64) -> Result<(), BlobError> {
        if self.has(sha)?.is_some() {
            let _ = std::fs::remove_file(self.partial(sha));
            self.touch(sha);
            return Ok(());
        }
        let p = self.partial(sha);
        let (got, bytes) = hash_file(&p)?;
        if bytes != total || got != sha {
            let _ = std::fs::remove_file(&p);
            if bytes != total {
                return Err(BlobError::TooLong {
                    sha: sha.to_string(),
                    total,
                    got: bytes,
                });
            }
            return Err(BlobError::Mismatch {
                sha: sha.to_string(),
                got,
                bytes,
            });
        }
        self.commit(&p, sha)
    }

    /// Syncs a whole, checked file and renames it to blob `sha`.
    fn commit(&self, file: &Path, sha: &str) -> Result<(), BlobError> {
        File::open(file)
            .and_then(|f| f.sync_all())
            .map_err(io(file, "cannot sync"))?;
        let to = self.path(sha)?;
        std::fs::rename(file, &to).map_err(io(file, "cannot rename"))?;
        sync_dir(&self.dir);
        Ok(())
    }

    /// Takes a finished file of this machine into the store under its hash
    /// (moving it when it lies on the same file system, else copying);
    /// returns its SHA-256 and length. Files of the same bytes adopted at
    /// once (two jobs' identical reports) end as the one blob.
    pub fn adopt(&self, file: &Path) -> Result<(String, u64), BlobError> {
        let (sha, bytes) = hash_file(file)?;
        self.adopt_hashed(file, &sha)?;
        Ok((sha, bytes))
    }

    /// [`BlobStore::adopt`] for a file whose SHA-256 the caller has just
    /// computed from its bytes (a received upload it checked while
    /// streaming), so it is not read again.
    pub fn adopt_hashed(&self, file: &Path, sha: &str) -> Result<(), BlobError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        if self.has(sha)?.is_some() {
            self.touch(sha);
            return Ok(());
        }
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .dir
            .join("partial")
            .join(format!("{sha}.adopt-{}-{n}", std::process::id()));
        if std::fs::rename(file, &tmp).is_err() {
            std::fs::copy(file, &tmp).map_err(io(file, "cannot copy"))?;
        }
        // Renaming over a blob another adopter just made replaces the same
        // bytes with the same bytes.
        self.commit(&tmp, sha)
    }

    /// Marks a held blob as just stored (its modification time), so that a
    /// sweep does not take a blob a job is about to name again.
    pub fn touch(&self, sha: &str) {
        if let Ok(p) = self.path(sha)
            && let Ok(f) = OpenOptions::new().write(true).open(p)
        {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// How long ago the held blob `sha` was last stored or touched.
    pub fn age(&self, sha: &str) -> Option<std::time::Duration> {
        let p = self.path(sha).ok()?;
        std::fs::metadata(p).ok()?.modified().ok()?.elapsed().ok()
    }

    /// Drops `sha` and any piece of it.
    pub fn remove(&self, sha: &str) -> Result<(), BlobError> {
        let p = self.path(sha)?;
        for f in [p, self.partial(sha)] {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&f, "cannot remove")(e)),
            }
        }
        Ok(())
    }

    /// Removes pieces of transfers left untouched for `age` (a sender that
    /// never came back).
    pub fn drop_stale_pieces(&self, age: std::time::Duration) {
        let dir = self.dir.join("partial");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a > age);
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Every complete blob: its SHA-256 and length.
    pub fn list(&self) -> Result<Vec<(String, u64)>, BlobError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(io(&self.dir, "cannot list"))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if is_sha256_hex(&name)
                && let Ok(m) = e.metadata()
                && m.is_file()
            {
                out.push((name, m.len()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Bytes of every complete blob together.
    pub fn bytes(&self) -> Result<u64, BlobError> {
        Ok(self.list()?.iter().map(|(_, n)| n).sum())
    }

    /// Lays `files` (name, SHA-256) out as a folder `dir` of hard links to
    /// the held blobs (copies where links fail), so that code reading a model
    /// folder reads them; a folder already laid out is left as it is.
    pub fn lay_out(&self, dir: &Path, files: &[(String, String)]) -> Result<(), BlobError> {
        if dir.join(".complete").is_file() {
            return Ok(());
        }
        let tmp = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp, "cannot create"))?;
        for (name, sha) in files {
            let from = self.path(sha)?;
            let to = tmp.join(name);
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).map_err(io(&from, "cannot copy"))?;
            }
        }
        std::fs::write(tmp.join(".complete"), b"").map_err(io(&tmp, "cannot write"))?;
        let _ = std::fs::remove_dir_all(dir);
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent, "cannot create"))?;
        }
        std::fs::rename(&tmp, dir).map_err(io(&tmp, "cannot rename"))?;
        Ok(())
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    #[test]
    fn pieces_resume_and_finish_only_when_the_hash_matches() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path()).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let h = sha(&data);
        assert_eq!(s.held(&h).unwrap(), (0, false));
        assert_eq!(s.write(&h, 10_000, 0, &data[..4000]).unwrap(), 4000);
        // A restarted store sees where to resume.
        let s = BlobStore::open(t.path()).unwrap();
        assert_eq!(s.held(&h).unwrap(), (4000, false));
        let e = s.write(&h, 10_000, 5000, &data[5000..]).unwrap_err();
        assert!(
            e.to_string().contains("does not continue the 4000 bytes"),
            "{e}"
        );
        // Resent from an earlier point: replaces.
        s.write(&h, 10_000, 3000, &data[3000..]).unwrap();
        s.finish(&h, 10_000).unwrap();
        assert_eq!(s.held(&h).unwrap(), (10_000, true));
        assert_eq!(std::fs::read(s.path(&h).unwrap()).unwrap(), data);
        assert_eq!(s.list().unwrap(), vec![(h.clone(), 10_000)]);

        // Wrong bytes are dropped, never made complete.
        let other = sha(b"other");
        s.write(&other, 5, 0, b"othex").unwrap();
        let e = s.finish(&other, 5).unwrap_err();
        assert!(matches!(e, BlobError::Mismatch { .. }), "{e}");
        assert_eq!(s.held(&other).unwrap(), (0, false));
        let e = s.write(&other, 3, 0, b"other").unwrap_err();
        assert!(e.to_string().contains("more than its announced 3"), "{e}");
    }

    #[test]
    fn names_that_are_not_digests_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(t.path()).unwrap();
        for bad in ["../etc/passwd", "", &"A".repeat(64), &"a".repeat(63)] {
            assert!(matches!(s.has(bad), Err(BlobError::BadDigest(_))), "{bad}");
            assert!(s.write(bad, 1, 0, b"x").is_err());
        }
    }

    #[test]
    fn adopted_files_are_laid_out_as_folders() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(&t.path().join("blobs")).unwrap();
        let f = t.path().join("shard.bin");
        std::fs::write(&f, b"shard bytes").unwrap();
        let (h, n) = s.adopt(&f).unwrap();
        assert_eq!((h.as_str(), n), (sha(b"shard bytes").as_str(), 11));
        let dir = t.path().join("models/x");
        s.lay_out(&dir, &[("model.safetensors".into(), h.clone())])
            .unwrap();
        assert_eq!(
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            b"shard bytes"
        );
        s.lay_out(&dir, &[("model.safetensors".into(), h.clone())])
            .unwrap();
        s.remove(&h).unwrap();
        assert_eq!(s.has(&h).unwrap(), None);
    }

    #[test]
    fn the_same_bytes_adopted_at_once_become_one_blob() {
        let t = tempfile::tempdir().unwrap();
        let s = BlobStore::open(&t.path().join("blobs")).unwrap();
        let files: Vec<PathBuf> = (0..8)
            .map(|i| {
                let f = t.path().join(format!("report-{i}.md"));
                std::fs::write(&f, b"the same report").unwrap();
                f
            })
            .collect();
        let got: Vec<_> = std::thread::scope(|sc| {
            let hs: Vec<_> = files.iter().map(|f| sc.spawn(|| s.adopt(f))).collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        assert!(got.iter().all(|g| g == &got[0]));
        assert_eq!(s.list().unwrap().len(), 1);
        assert_eq!(s.held(&got[0].0).unwrap(), (15, true));
    }

    proptest! {
        #[test]
        fn any_split_into_pieces_reassembles(data in proptest::collection::vec(any::<u8>(), 0..4000), cuts in proptest::collection::vec(0usize..4000, 0..6)) {
            let t = tempfile::tempdir().unwrap();
            let s = BlobStore::open(t.path()).unwrap();
            let h = sha(&data);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.push(0);
            cuts.push(data.len());
            cuts.sort();
            for w in cuts.windows(2) {
                s.write(&h, data.len() as u64, w[0] as u64, &data[w[0]..w[1]]).unwrap();
            }
            s.finish(&h, data.len() as u64).unwrap();
            prop_assert_eq!(std::fs::read(s.path(&h).unwrap()).unwrap(), data);
        }
    }
}
