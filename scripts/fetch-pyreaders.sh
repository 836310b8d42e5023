#!/usr/bin/env bash
# Installs the Python readers the export tests check our files with — the
# `gguf` package (llama.cpp's own reader) and `safetensors` with numpy —
# into models/python (or $HCX_PY_DIR), pinned by version. Idempotent: does
# nothing when that folder holds these versions.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${HCX_PY_DIR:-$root/models/python}"
packages=(gguf==0.17.1 numpy==2.2.6 pyyaml==6.0.4 tqdm==4.70.1 safetensors==0.6.2)
stamp="$dest/.installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${packages[*]}" ]; then
  echo "python readers present: $dest"
  exit 0
fi
rm -rf "$dest.partial"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --only-binary=:all: \
  --target "$dest.partial" "${packages[@]}"
echo "${packages[*]}" > "$dest.partial/.installed"
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "python readers installed: $dest"
