#!/usr/bin/env bash
# Fetches the example model, builds hcx-cluster in release mode and runs the
# embedded example job (all-MiniLM-L6-v2 at ≤ 4.5 bits per weight) into
# out/minilm-4bit. Extra arguments go to `hcx-cluster run`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/fetch-model.sh
cargo build --release --locked
exec cargo run --release --locked --quiet -- run "$@"
