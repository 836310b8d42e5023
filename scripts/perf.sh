#!/usr/bin/env bash
# Takes every figure of docs/PERFORMANCE.md on this machine, with the
# commands the document names: criterion benches (`cargo bench`) and
# hyperfine (Debian's package, installed here when missing) for whole runs.
# Run it on an otherwise idle machine; it prints the machine first.
#
#   bash scripts/perf.sh [codecs] [cluster] [scale] [collectives] [e2e] [group] [large]
#
# (default: the first six; `large` generates a 13.5 GB model and takes about
# an hour on 2 cores, so it runs only when named).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(codecs cluster scale collectives e2e group)
echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB"
bash scripts/fetch-model.sh >&2
target="${CARGO_TARGET_DIR:-$root/target}"
for part in "${parts[@]}"; do
  case "$part" in
    codecs)
      # Criterion, release profile; then the table of mean throughput in
      # MB/s (10^6 bytes of f32 input a second) from criterion's estimates.
      cargo bench --locked --bench codecs >/dev/null 2>&1
      python3 - "$target/criterion" <<'PY'
import json, os, sys
root = sys.argv[1]
rows = {}
for group in sorted(os.listdir(root)):
    if not os.path.isdir(os.path.join(root, group)) or group == "report":
        continue
    for op in sorted(os.listdir(os.path.join(root, group))):
        est = os.path.join(root, group, op, "new", "estimates.json")
        bench = os.path.join(root, group, op, "new", "benchmark.json")
        if not os.path.exists(est):
            continue
        b = json.load(open(bench))
        name, label = b["group_id"].rsplit("/", 1)
        ns = json.load(open(est))["mean"]["point_estimate"]
        nbytes = b["throughput"]["Bytes"]
        rows.setdefault((name, b["function_id"]), {})[label] = nbytes / (ns * 1e-9) / 1e6
print("| codec | operation | 1 thread (MB/s) | all cores (MB/s) |")
print("|---|---|---:|---:|")
def fmt(v):
    return "—" if v is None else (f"{v:,.0f}" if v >= 10 else f"{v:.2f}")
for (name, op), r in rows.items():
    print(f"| `{name}` | {op} | {fmt(r.get('1-thread'))} | {fmt(r.get('all-cores'))} |")
PY
      ;;
    cluster)
      cargo bench --locked --profile dev --bench cluster 2>&1 | grep -vE '^\s*(Compiling|Finished|Running)' ;;
    scale)
      cargo bench --locked --bench coordinator_scale 2>&1 | grep -vE '^\s*(Compiling|Finished|Running)' ;;
    collectives)
      cargo bench --locked --bench collectives 2>&1 | grep -vE '^\s*(Compiling|Finished|Running)' ;;
    e2e)
      if ! command -v hyperfine >/dev/null; then
        apt-get install -y hyperfine >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y hyperfine >/dev/null; }
      fi
      cargo build --locked --quiet
      bin="$target/debug/hcx-cluster"
      out="$(mktemp -d)"
      trap 'rm -rf "$out"' EXIT
      hyperfine --warmup 1 --runs 5 --export-markdown "$out/e2e.md" \
        -n 'run --local' "$bin run --local --output $out/a" \
        -n 'run --nodes 1' "$bin run --nodes 1 --output $out/a" \
        -n 'run --nodes 2' "$bin run --nodes 2 --output $out/a" \
        -n 'run --nodes 3' "$bin run --nodes 3 --output $out/a" >&2
      cat "$out/e2e.md"
      # Kernel seconds per run, summed over the nodes, from the artifact's report.
      for n in 1 2 3; do
        "$bin" run --nodes "$n" --output "$out/k$n" >/dev/null 2>&1
        python3 -c 'import json,sys; a=json.load(open(sys.argv[1])); print(f"--nodes {sys.argv[2]}: kernel seconds {sum(x[\"kernel_seconds\"] for x in a[\"nodes\"]):.2f}")' "$out/k$n/attribution.json" "$n"
      done ;;
    group)
      # The calibrated and distilled MiniLM job as a collective group of 1,
      # 2 and 3 embedded nodes (one run each: it takes minutes), and split
      # by layer over 3 nodes (`parallel: layers`), beside the local
      # pipeline; then where each run's time went, from its report.
      if ! command -v hyperfine >/dev/null; then
        apt-get install -y hyperfine >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y hyperfine >/dev/null; }
      fi
      cargo build --locked --quiet
      bin="$target/debug/hcx-cluster"
      job=configs/jobs/minilm-2bit-distill.yaml
      out="$(mktemp -d)"
      trap 'rm -rf "$out"' EXIT
      # The same job split by layer (paths made absolute for the copy).
      staged="$out/staged.yaml"
      sed -e "s#\.\./\.\./#$root/#g" -e "s#\.\./#$root/configs/#g" -e 's/^  seq_len: 128$/  seq_len: 128\n  parallel: layers/' "$job" >"$staged"
      grep -q 'parallel: layers' "$staged"
      hyperfine --runs 1 --export-markdown "$out/group.md" \
        -n 'run --local' "$bin run --local $job --output $out/local" \
        -n 'run --nodes 1' "$bin run $job --nodes 1 --output $out/g1" \
        -n 'run --nodes 2' "$bin run $job --nodes 2 --output $out/g2" \
        -n 'run --nodes 3' "$bin run $job --nodes 3 --output $out/g3" \
        -n 'run --nodes 3, parallel: layers' "$bin run $staged --nodes 3 --output $out/s3" >&2
      cat "$out/group.md"
      for d in local g1 g2 g3 s3; do
        python3 - "$out/$d/attribution.json" "$d" <<'PY'
import json, sys
a = json.load(open(sys.argv[1]))
cal, dist = a["calibration"], a["distill"]
spent = sum(b["seconds"] for b in dist["blocks"])
print(f"{sys.argv[2]}: forward passes {cal['forward_seconds']:.1f} s, blocks in all {cal['seconds']:.1f} s, of which distillation {spent:.1f} s")
PY
        cmp -s "$out/local/model.hcx.safetensors" "$out/$d/model.hcx.safetensors" || echo "$d: the tensor file differs from the local run's" >&2
      done ;;
    large)
      # A generated Llama-2-7B-shaped bf16 model (seeded, 13.5 GB; made once
      # into models/llama-7b-gen) compressed by the local pipeline and by
      # the embedded cluster with 2 nodes, then decompressed: wall time, CPU
      # and peak resident memory of each from /usr/bin/time -v. The two
      # tensor files must be the same bytes.
      cargo build --locked --quiet --release --bin hcx-cluster --example gen_llama
      bin="$target/release/hcx-cluster"
      model="$root/models/llama-7b-gen"
      [ -f "$model/config.json" ] || "$target/release/examples/gen_llama" 7b 1 "$model" >&2
      out="$(mktemp -d -p "$root/models")"
      trap 'rm -rf "$out"' EXIT
      job=configs/scale/llama-7b-gen-int4.yaml
      measure() {
        local label="$1"; shift
        /usr/bin/time -v "$@" >"$out/$label.out" 2>"$out/$label.time" || { cat "$out/$label.time" >&2; exit 1; }
        python3 - "$out/$label.time" "$label" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
get = lambda k: re.search(re.escape(k) + r": (.*)", t).group(1).strip()
print(f"| {sys.argv[2]} | {get('Elapsed (wall clock) time (h:mm:ss or m:ss)')} | "
      f"{float(get('User time (seconds)')):.0f} + {float(get('System time (seconds)')):.0f} | "
      f"{int(get('Maximum resident set size (kbytes)')) / 1e6:.2f} |")
PY
      }
      echo "| step | wall | user + system CPU (s) | peak resident (GB) |"
      echo "|---|---:|---:|---:|"
      measure 'run --local' "$bin" run --local "$job" --output "$out/local"
      measure 'run --nodes 2' "$bin" run "$job" --nodes 2 --output "$out/nodes2"
      measure 'decompress' "$bin" decompress "$out/local" --output "$out/dense"
      cmp "$out/local/model.hcx.safetensors" "$out/nodes2/model.hcx.safetensors"
      echo "artifact: $(stat -c %s "$out/local/model.hcx.safetensors") bytes of tensors; the same bytes from both runs" ;;
    *) echo "unknown part $part (codecs, cluster, scale, collectives, e2e, group, large)" >&2; exit 2 ;;
  esac
done
