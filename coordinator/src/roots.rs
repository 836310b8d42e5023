//! Where submitted jobs may read and write: a coordinator reads models only
//! under its `--model-root` folders and writes artifacts only under its
//! `--output-root` folders, so a client cannot make it create folders or
//! replace files anywhere else it can write.
//!
//! Paths are compared after resolving symbolic links and `..`: the longest
//! part of a path that exists is canonicalized and the rest (folders the
//! job will create) may hold only plain names. A path that is a dangling
//! symbolic link is refused, since writing through it could land anywhere.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

/// Why a root or a job's path was refused.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// A `--model-root` or `--output-root` folder is unusable.
    #[error("--{flag} {}: {why}", path.display())]
    BadRoot {
        /// The flag (`model-root`, `output-root`).
        flag: &'static str,
        /// The folder as given.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// No root of a kind was given, so nothing of that kind is read or
    /// written in place.
    #[error("{what} {}: this coordinator has no --{flag}, so it {does}", path.display())]
    NoRoot {
        /// `model`, `calibration file` or `output`.
        what: &'static str,
        /// The path as submitted.
        path: PathBuf,
        /// The flag.
        flag: &'static str,
        /// What it therefore does not do.
        does: &'static str,
    },
    /// A job's path cannot be resolved.
    #[error("{what} {}: {why}", path.display())]
    Unresolvable {
        /// `model` or `output`.
        what: &'static str,
        /// The path as submitted.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A job's path resolves outside every root of its kind.
    #[error(
        "{what} {} is outside the {} {plural} of this coordinator: it resolves to {}, which is not {inside} {} (--{flag})",
        path.display(),
        flag.trim_end_matches("-root"),
        resolved.display(),
        roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(" or "),
        plural = if roots.len() == 1 { "root" } else { "roots" },
        inside = if *what == "output" { "inside" } else { "in" },
    )]
    Outside {
        /// `model`, `calibration file` or `output`.
        what: &'static str,
        /// The path as submitted.
        path: PathBuf,
        /// What it resolves to.
        resolved: PathBuf,
        /// The roots (canonical).
        roots: Vec<PathBuf>,
        /// The flag that sets them.
        flag: &'static str,
    },
}

/// The folders a coordinator reads models from and writes artifacts to,
/// canonicalized once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    models: Vec<PathBuf>,
    outputs: Vec<PathBuf>,
}

impl Roots {
    /// Resolves the roots; each must be an existing folder (a model root may
    /// also be a single model file). Either list may be empty: with no model
    /// root every model is sent by `submit`, with no output root every
    /// artifact stays in the cluster.
    pub fn new(models: &[PathBuf], outputs: &[PathBuf]) -> Result<Roots, RootError> {
        let canon = |flag: &'static str, list: &[PathBuf], folder: bool| {
            list.iter()
                .map(|p| {
                    let bad = |why: String| RootError::BadRoot {
                        flag,
                        path: p.clone(),
                        why,
                    };
                    let c = std::fs::canonicalize(p).map_err(|e| bad(e.to_string()))?;
                    if folder && !c.is_dir() {
                        return Err(bad("is not a folder".into()));
                    }
                    Ok(c)
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Roots {
            models: canon("model-root", models, false)?,
            outputs: canon("output-root", outputs, true)?,
        })
    }

    /// The model at `path`, resolved, if it lies in (or is) a model root.
    pub fn model(&self, path: &Path) -> Result<PathBuf, RootError> {
        self.input("model", path)
    }

    /// A calibration file at `path`, resolved, if it lies in a model root
    /// (the nodes of the job's group read it, as they read the model).
    pub fn calibration(&self, path: &Path) -> Result<PathBuf, RootError> {
        self.input("calibration file", path)
    }

    /// Whether artifacts may be written to output folders at all.
    pub fn writes_outputs(&self) -> bool {
        !self.outputs.is_empty()
    }

    fn input(&self, what: &'static str, path: &Path) -> Result<PathBuf, RootError> {
        if self.models.is_empty() {
            return Err(RootError::NoRoot {
                what,
                path: path.to_path_buf(),
                flag: "model-root",
                does: "reads no file in place (send the model with `submit`)",
            });
        }
        let resolved = resolve(what, path)?;
        if self.models.iter().any(|r| resolved.starts_with(r)) {
            return Ok(resolved);
        }
        Err(RootError::Outside {
            what,
            path: path.to_path_buf(),
            resolved,
            roots: self.models.clone(),
            flag: "model-root",
        })
    }

    /// The artifact folder at `path`, resolved, if it lies strictly inside
    /// an output root (its shard files wait beside it, in its parent).
    pub fn output(&self, path: &Path) -> Result<PathBuf, RootError> {
        if self.outputs.is_empty() {
            return Err(RootError::NoRoot {
                what: "output",
                path: path.to_path_buf(),
                flag: "output-root",
                does: "keeps artifacts in the cluster (fetch them with `hcx-cluster fetch`)",
            });
        }
        let resolved = resolve("output", path)?;
        if self
            .outputs
            .iter()
            .any(|r| resolved.starts_with(r) && resolved != *r)
        {
            return Ok(resolved);
        }
        Err(RootError::Outside {
            what: "output",
            path: path.to_path_buf(),
            resolved,
            roots: self.outputs.clone(),
            flag: "output-root",
        })
    }
}

/// Canonicalizes the longest existing prefix of an absolute `path` and
/// appends the rest, which may hold only plain names.
fn resolve(what: &'static str, path: &Path) -> Result<PathBuf, RootError> {
    let bad = |why: String| RootError::Unresolvable {
        what,
        path: path.to_path_buf(),
        why,
    };
    if !path.is_absolute() {
        return Err(bad("is not an absolute path".into()));
    }
    let mut rest: Vec<&std::ffi::OsStr> = Vec::new();
    let mut cur = path;
    loop {
        match std::fs::canonicalize(cur) {
            Ok(mut out) => {
                out.extend(rest.iter().rev());
                return Ok(out);
            }
            // Missing, or under a file: the rest is taken as it is written
            // (creating it fails later, with its own message).
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                if std::fs::symlink_metadata(cur).is_ok() {
                    return Err(bad(format!(
                        "{} is a symbolic link to something that does not exist",
                        cur.display()
                    )));
                }
                match cur.components().next_back() {
                    Some(Component::Normal(name)) => rest.push(name),
                    _ => {
                        return Err(bad(format!(
                            "{} does not exist, so `..` after it cannot be resolved",
                            cur.display()
                        )));
                    }
                }
                cur = cur
                    .parent()
                    .ok_or_else(|| bad("no part of it exists".into()))?;
            }
            Err(e) => return Err(bad(format!("{}: {e}", cur.display()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _tmp: tempfile::TempDir,
        base: PathBuf,
        roots: Roots,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        for d in ["models/m", "out/done", "elsewhere"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        std::fs::write(base.join("models/m/model.safetensors"), b"x").unwrap();
        std::fs::write(base.join("elsewhere/model.safetensors"), b"x").unwrap();
        let roots = Roots::new(&[base.join("models")], &[base.join("out")]).unwrap();
        Fixture {
            _tmp: tmp,
            base,
            roots,
        }
    }

    #[test]
    fn paths_inside_the_roots_resolve() {
        let f = fixture();
        let b = &f.base;
        assert_eq!(
            f.roots.model(&b.join("models/m")).unwrap(),
            b.join("models/m")
        );
        assert_eq!(
            f.roots.model(&b.join("models/./m/../m")).unwrap(),
            b.join("models/m")
        );
        // Outputs that do not exist yet, several folders deep.
        assert_eq!(
            f.roots.output(&b.join("out/new/deeper/a")).unwrap(),
            b.join("out/new/deeper/a")
        );
        assert_eq!(
            f.roots.output(&b.join("out/done")).unwrap(),
            b.join("out/done")
        );
        // Under a file: resolved as written; writing there fails later.
        std::fs::write(b.join("out/file"), b"x").unwrap();
        assert_eq!(
            f.roots.output(&b.join("out/file/a")).unwrap(),
            b.join("out/file/a")
        );
    }

    #[test]
    fn escapes_are_refused_with_the_path_and_the_root() {
        let f = fixture();
        let b = &f.base;
        let e = f.roots.output(&b.join("elsewhere/a")).unwrap_err();
        let want = format!(
            "output {} is outside the output root of this coordinator: it resolves to {}, which is not inside {} (--output-root)",
            b.join("elsewhere/a").display(),
            b.join("elsewhere/a").display(),
            b.join("out").display()
        );
        assert_eq!(e.to_string(), want);
        // `..` through existing folders, and after missing ones.
        let e = f
            .roots
            .output(&b.join("out/done/../../elsewhere/a"))
            .unwrap_err();
        assert!(matches!(e, RootError::Outside { .. }), "{e}");
        let e = f
            .roots
            .output(&b.join("out/new/../../elsewhere"))
            .unwrap_err();
        assert!(e.to_string().contains("cannot be resolved"), "{e}");
        // The root itself: its shard files would go beside it, outside.
        let e = f.roots.output(&b.join("out")).unwrap_err();
        assert!(matches!(e, RootError::Outside { .. }), "{e}");
        // Relative paths mean nothing to a coordinator.
        let e = f.roots.output(Path::new("out/a")).unwrap_err();
        assert!(e.to_string().contains("not an absolute path"), "{e}");
        // Models.
        let e = f
            .roots
            .model(&b.join("elsewhere/model.safetensors"))
            .unwrap_err();
        assert!(e.to_string().contains("outside the model root"), "{e}");
        assert!(e.to_string().contains("--model-root"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn symlink_escapes_are_refused() {
        let f = fixture();
        let b = &f.base;
        std::os::unix::fs::symlink(b.join("elsewhere"), b.join("out/link")).unwrap();
        std::os::unix::fs::symlink(b.join("elsewhere"), b.join("models/link")).unwrap();
        std::os::unix::fs::symlink(b.join("nowhere/x"), b.join("out/dangling")).unwrap();
        let e = f.roots.output(&b.join("out/link/a")).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("resolves to {}", b.join("elsewhere/a").display())),
            "{e}"
        );
        let e = f.roots.output(&b.join("out/link")).unwrap_err();
        assert!(matches!(e, RootError::Outside { .. }), "{e}");
        let e = f.roots.output(&b.join("out/dangling")).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = f
            .roots
            .model(&b.join("models/link/model.safetensors"))
            .unwrap_err();
        assert!(matches!(e, RootError::Outside { .. }), "{e}");
        // A root given through a link is resolved once, at start.
        std::os::unix::fs::symlink(b.join("out"), b.join("out-link")).unwrap();
        let via = Roots::new(&[b.join("models")], &[b.join("out-link")]).unwrap();
        assert_eq!(via.output(&b.join("out/x")).unwrap(), b.join("out/x"));
    }

    #[test]
    fn roots_must_exist() {
        let f = fixture();
        let b = &f.base;
        let e = Roots::new(&[b.join("models")], &[b.join("missing")]).unwrap_err();
        assert!(e.to_string().starts_with("--output-root"), "{e}");
        // No root of a kind: nothing of that kind in place, and a clear why.
        let none = Roots::new(&[], &[]).unwrap();
        assert!(!none.writes_outputs());
        let e = none.model(&b.join("models/m")).unwrap_err();
        assert!(e.to_string().contains("has no --model-root"), "{e}");
        let e = none.output(&b.join("out/x")).unwrap_err();
        assert!(
            e.to_string().contains("keeps artifacts in the cluster"),
            "{e}"
        );
        let e =
            Roots::new(&[b.join("models")], &[b.join("models/m/model.safetensors")]).unwrap_err();
        assert!(e.to_string().contains("not a folder"), "{e}");
    }
}
