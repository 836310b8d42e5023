#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy, and all tests (fetching the
# test model first). Cargo's target folder may live outside the clone
# (CARGO_TARGET_DIR); the script passes with it empty too.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/fetch-model.sh
bash scripts/fetch-smollm2.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
