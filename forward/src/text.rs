//! Text as a decoder sees it: UTF-8 files read and joined, tokenized with
//! the model's `tokenizer.json`, and cut into non-overlapping windows of a
//! fixed number of tokens (the remainder that does not fill a window is
//! dropped).

use std::path::{Path, PathBuf};

use crate::ForwardError;

/// English prose every Debian machine has: the license texts under
/// /usr/share/common-licenses, split in two. Evaluation reads the held-out
/// part, calibration the rest; no file is in both.
pub const HELD_OUT_TEXT: &[&str] = &[
    "/usr/share/common-licenses/GPL-3",
    "/usr/share/common-licenses/Apache-2.0",
];

/// The calibration part of the license texts (see [`HELD_OUT_TEXT`]).
pub const CALIBRATION_TEXT: &[&str] = &[
    "/usr/share/common-licenses/GPL-2",
    "/usr/share/common-licenses/LGPL-2.1",
    "/usr/share/common-licenses/GFDL-1.3",
    "/usr/share/common-licenses/MPL-2.0",
    "/usr/share/common-licenses/MPL-1.1",
    "/usr/share/common-licenses/GPL-1",
    "/usr/share/common-licenses/LGPL-3",
    "/usr/share/common-licenses/Artistic",
    "/usr/share/common-licenses/CC0-1.0",
    "/usr/share/common-licenses/BSD",
    "/usr/share/common-licenses/GFDL-1.2",
    "/usr/share/common-licenses/LGPL-2",
];

/// Reads text files (UTF-8) and joins them with a blank line between.
/// An empty result, an unreadable file or one that is not UTF-8 is an error
/// naming the file.
pub fn read_texts(paths: &[PathBuf]) -> Result<String, ForwardError> {
    let mut out = String::new();
    for p in paths {
        let bytes = std::fs::read(p).map_err(|e| ForwardError::Text {
            path: p.clone(),
            why: format!("cannot read: {e}"),
        })?;
        let text = String::from_utf8(bytes).map_err(|e| ForwardError::Text {
            path: p.clone(),
            why: format!(
                "not UTF-8 text (first bad byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        })?;
        if text.trim().is_empty() {
            return Err(ForwardError::Text {
                path: p.clone(),
                why: "the file holds no text".into(),
            });
        }
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str(&text);
    }
    if out.is_empty() {
        return Err(ForwardError::Text {
            path: PathBuf::from("<text>"),
            why: "no text files given".into(),
        });
    }
    Ok(out)
}

/// A model's tokenizer, loaded from its `tokenizer.json`.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json`.
    pub fn load(dir: &Path) -> Result<TextTokenizer, ForwardError> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|e| ForwardError::Text {
            path: path.clone(),
            why: format!("cannot read: {e}"),
        })?;
        TextTokenizer::from_bytes(&bytes, &path)
    }

    /// Loads a `tokenizer.json` held in memory (`path` names it in messages).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<TextTokenizer, ForwardError> {
        let mut inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| ForwardError::Text {
                path: path.to_path_buf(),
                why: format!("cannot load the tokenizer: {e}"),
            })?;
        // Samples are cut to length by the caller and never padded (a
        // tokenizer.json may ask for fixed padding, as MiniLM's does).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| ForwardError::Text {
                path: path.to_path_buf(),
                why: format!("cannot turn truncation off: {e}"),
            })?;
        Ok(TextTokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Token ids of `text` with the tokenizer's special tokens (an
    /// encoder's `[CLS] … [SEP]`).
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>, ForwardError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ForwardError::Text {
                path: self.path.clone(),
                why: format!("cannot tokenize: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ForwardError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ForwardError::Text {
                path: self.path.clone(),
                why: format!("cannot tokenize: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }
}

/// Cuts `tokens` into at most `max_windows` windows of `len` tokens, back
/// to back; returns the tokens of the whole windows. Fewer tokens than one
/// window is an error that says how many there are (`source` names the
/// text in the message).
pub fn token_windows(
    tokens: &[u32],
    len: usize,
    max_windows: usize,
    source: &Path,
) -> Result<Vec<u32>, ForwardError> {
    if len == 0 {
        return Err(ForwardError::Text {
            path: source.to_path_buf(),
            why: "the window length is 0".into(),
        });
    }
    let whole = (tokens.len() / len).min(max_windows);
    if whole == 0 {
        return Err(ForwardError::Text {
            path: source.to_path_buf(),
            why: format!("{} tokens, fewer than one window of {len}", tokens.len()),
        });
    }
    Ok(tokens[..whole * len].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_whole_and_bounded() {
        let t: Vec<u32> = (0..10).collect();
        assert_eq!(token_windows(&t, 3, 10, Path::new("x")).unwrap().len(), 9);
        assert_eq!(token_windows(&t, 3, 2, Path::new("x")).unwrap().len(), 6);
        let e = token_windows(&t, 11, 2, Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("10 tokens, fewer than one window of 11"), "{e}");
    }

    #[test]
    fn bad_text_files_are_named() {
        let dir = std::env::temp_dir().join(format!("hcx-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.txt");
        std::fs::write(&empty, "  \n").unwrap();
        let e = read_texts(std::slice::from_ref(&empty))
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty.txt") && e.contains("no text"), "{e}");
        let bin = dir.join("bin.txt");
        std::fs::write(&bin, [b'a', 0xff, 0xfe]).unwrap();
        let e = read_texts(std::slice::from_ref(&bin))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bin.txt") && e.contains("not UTF-8") && e.contains("offset 1"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
