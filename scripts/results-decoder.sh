#!/usr/bin/env bash
# Runs the SmolLM2-135M-Instruct example jobs with a release build and prints
# the README's decoder table: bits per weight over the 210 linear weights of
# the blocks (every part, safetensors header entry and manifest entry
# counted), their weight SQNR (parameter-weighted mean of per-tensor dB),
# and, on held-out text (GPL-3 and Apache-2.0 from /usr/share/common-licenses,
# 32 windows of 256 tokens, second half of each window scored), perplexity,
# mean KL(reference ‖ candidate) and top-1 agreement against the GGUF's
# weights dequantized to f32; run time and peak resident memory of the run.
#
# With --write, also replaces the table in README.md (between the
# `decoder:begin` and `decoder:end` markers). Jobs named after the options
# (`4bit-gptq 2bit-gptq`, without the `smollm2-` prefix) run only those;
# --write then replaces only their rows.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
write=false
if [ "${1:-}" = "--write" ]; then
  write=true
  shift
fi
all_jobs=(int8 4bit 4bit-gptq 3bit 3bit-gptq 2bit 2bit-gptq 2bit-distill target-60mb)
jobs=("$@")
[ ${#jobs[@]} -eq 0 ] && jobs=("${all_jobs[@]}")
for job in "${jobs[@]}"; do
  [ -f "configs/jobs/smollm2-$job.yaml" ] || { echo "no job configs/jobs/smollm2-$job.yaml" >&2; exit 2; }
done
bash scripts/fetch-smollm2.sh >&2
cargo build --release --locked --quiet
bin="${CARGO_TARGET_DIR:-$root/target}/release/hcx-cluster"
model="$root/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
table="$work/table.md"
{
  echo "| job | bits per weight (210 linear weights) | weight SQNR, mean (dB) | perplexity (reference {ref}) | KL divergence (nats) | top-1 agreement | run time (s) | peak memory (GB) |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
} >"$table"
for job in "${jobs[@]}"; do
  name="smollm2-$job"
  out="$work/$name"
  /usr/bin/time -f "%e %M" -o "$work/time" "$bin" run --local "configs/jobs/$name.yaml" --output "$out" >/dev/null
  "$bin" inspect "$out" --json >"$work/inspect.json"
  "$bin" eval --reference "$model" --candidate "$out" --json >"$work/eval.json"
  python3 - "$name" "$work/inspect.json" "$work/eval.json" "$work/time" "$table" <<'PY'
import json, re, sys
name, ins, ev = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
secs, kb = open(sys.argv[4]).read().split()
lin = re.compile(r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
ts = [t for t in ins["tensors"] if lin.match(t["name"])]
assert len(ts) == 210, len(ts)
params = sum(t["params"] for t in ts)
bpw = 8 * sum(t["bytes"] for t in ts) / params
sqnr = sum(t["sqnr_db"] * t["params"] for t in ts) / params
d = ev["decoder"]
table = open(sys.argv[5]).read().replace("{ref}", f"{d['reference_perplexity']:.2f}")
row = f"| `{name}` | {bpw:.3f} | {sqnr:.2f} | {d['candidate_perplexity']:.2f} | {d['mean_kl']:.4f} | {d['top1_agreement']:.4f} | {float(secs):.0f} | {int(kb) / 1e6:.2f} |\n"
open(sys.argv[5], "w").write(table + row)
PY
done
cat "$table"
if $write; then
  python3 - README.md "$table" "$#" <<'PY'
import sys
readme, table, subset = sys.argv[1], open(sys.argv[2]).read(), sys.argv[3] != "0"
text = open(readme).read()
begin, end = "<!-- decoder:begin -->\n", "<!-- decoder:end -->"
i, j = text.index(begin) + len(begin), text.index(end)
if subset:
    # Replace only the rows of the jobs that ran (and the header, which
    # carries the reference perplexity).
    old = text[i:j].splitlines(keepends=True)
    new = table.splitlines(keepends=True)
    rows = {l.split("|")[1].strip(): l for l in new[2:]}
    lines = [new[0]] + [rows.get(l.split("|")[1].strip(), l) for l in old[1:]]
    table = "".join(lines)
open(readme, "w").write(text[:i] + table + text[j:])
PY
  echo "README.md updated" >&2
fi
