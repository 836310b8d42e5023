#!/usr/bin/env bash
# Runs the MiniLM example jobs (all-MiniLM-L6-v2) with a release build and prints
# the README's results table: bits per weight over the 36 encoder linear
# weights (every part, safetensors header entry and manifest entry counted),
# whole-model ratio against the source file, SQNR of those weights (the
# parameter-weighted mean of per-tensor dB, and pooled), and the mean cosine
# of sentence embeddings against the original model.
#
# With --write, also replaces the table in README.md (between the
# `results:begin` and `results:end` markers).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
write=false
[ "${1:-}" = "--write" ] && write=true
bash scripts/fetch-model.sh >&2
cargo build --release --locked --quiet
bin="${CARGO_TARGET_DIR:-$root/target}/release/hcx-cluster"
model="$root/models/all-MiniLM-L6-v2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
table="$work/table.md"
{
  echo "| job | bits per weight (36 encoder linear weights) | whole-model ratio | SQNR, mean of per-tensor (dB) | SQNR, pooled (dB) | mean embedding cosine | run time (s) |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
} >"$table"
for job in int8 4bit 4bit-gptq 3bit 3bit-gptq 2bit 2bit-gptq 2bit-distill target-3bpw ternary seedlm vq lowrank-sparse; do
  name="minilm-$job"
  out="$work/$name"
  start=$(date +%s.%N)
  "$bin" run "configs/jobs/$name.yaml" --output "$out" >/dev/null
  end=$(date +%s.%N)
  "$bin" inspect "$out" --json >"$work/inspect.json"
  "$bin" eval --reference "$model" --candidate "$out" --json >"$work/eval.json"
  python3 - "$name" "$work/inspect.json" "$work/eval.json" "$start" "$end" >>"$table" <<'PY'
import json, re, sys
name, ins, ev, start, end = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3])), float(sys.argv[4]), float(sys.argv[5])
lin = re.compile(r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)\.weight$")
ts = [t for t in ins["tensors"] if lin.match(t["name"])]
assert len(ts) == 36, len(ts)
params = sum(t["params"] for t in ts)
bpw = 8 * sum(t["bytes"] for t in ts) / params
sqnr = sum(t["sqnr_db"] * t["params"] for t in ts) / params
# The decompressed model, measured independently of the manifest's figures.
mean_eval = ev["encoder_linear_mean_sqnr_db"]
assert abs(mean_eval - sqnr) < 0.05, (mean_eval, sqnr)
pooled = ev["encoder_linear_pooled_sqnr_db"]
cos = ev["embeddings"]["mean_cosine"]
print(f"| `{name}` | {bpw:.3f} | {ins['ratio']:.2f}× | {sqnr:.2f} | {pooled:.2f} | {cos:.5f} | {end - start:.1f} |")
PY
done
cat "$table"
if $write; then
  python3 - README.md "$table" <<'PY'
import sys
readme, table = sys.argv[1], open(sys.argv[2]).read()
text = open(readme).read()
begin, end = "<!-- results:begin -->\n", "<!-- results:end -->"
i, j = text.index(begin) + len(begin), text.index(end)
open(readme, "w").write(text[:i] + table + text[j:])
PY
  echo "README.md updated" >&2
fi
