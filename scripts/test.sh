#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy, and all tests (fetching the
# test model first). Cargo's target folder may live outside the clone
# (CARGO_TARGET_DIR); the script passes with it empty too.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/fetch-model.sh
bash scripts/fetch-smollm2.sh
bash scripts/fetch-pyreaders.sh
bash scripts/fetch-chromium.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The GPU code (NCCL through cudarc, opened at run time) must build without a
# CUDA toolkit; its tests skip where there is no device.
cargo clippy -p hcx-kernels -p hcx-node --features hcx-node/cuda --all-targets --locked -- -D warnings
# With that feature, the device tests skip and say why on a machine without
# a device; the kernels' source is still checked on the host (gpu::host_check).
cargo test -p hcx-kernels --features cuda --locked --lib -- gpu:: collective::nccl
# cargo-nextest, where the machine has it, runs every test in its own
# process, two at a time with the slowest first (.config/nextest.toml), which
# keeps the 2-core CI machines busy; plain cargo test runs the same tests.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked
fi
