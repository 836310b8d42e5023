#!/usr/bin/env bash
# A local cluster on one machine: three coordinators (raft voters) on
# 127.0.0.1-3:7101-7103 and three worker nodes, each with its own certificate (`certs issue`).
#
#   configs/cluster/local.sh start [STATE_DIR]   # default STATE_DIR: .cluster
#   configs/cluster/local.sh stop  [STATE_DIR]
#
# start prints the two exports that point `submit`, `status`, `nodes`,
# `drain` and `cancel` at it. Logs go to STATE_DIR/*.log; the raft data in
# STATE_DIR/c1..c3 survives a stop, so a later start resumes unfinished jobs.
# Jobs may read models under $HCX_MODEL_ROOT (default ./models) and write
# artifacts inside $HCX_OUTPUT_ROOT (default ./out, created); anything else
# is refused at submit.
set -euo pipefail
cmd="${1:-start}"
state="${2:-.cluster}"
model_root="${HCX_MODEL_ROOT:-$PWD/models}"
output_root="${HCX_OUTPUT_ROOT:-$PWD/out}"
bin="${HCX_BIN:-$(command -v hcx-cluster || echo target/release/hcx-cluster)}"
coords="127.0.0.1:7101,127.0.0.2:7102,127.0.0.3:7103"
peers="1=127.0.0.1:7101,2=127.0.0.2:7102,3=127.0.0.3:7103"

case "$cmd" in
start)
  [ -x "$bin" ] || { echo "no hcx-cluster binary at $bin (build with cargo build --release, or set HCX_BIN)" >&2; exit 1; }
  mkdir -p "$state"
  mkdir -p "$output_root"
  # The CA stays in $state/ca; each machine gets its own folder with only
  # what `certs issue` writes (its key, its certificate, the CA certificate).
  if [ ! -f "$state/ca/ca.pem" ]; then
    "$bin" certs init --dir "$state/ca"
  fi
  issue() { # DIR ROLE NAME [FLAGS...]
    local dir="$1" role="$2" name="$3"
    shift 3
    if [ ! -f "$state/certs/$dir/cert.pem" ]; then
      "$bin" certs issue --ca "$state/ca" --dir "$state/certs/$dir" --role "$role" --name "$name" "$@"
    fi
  }
  issue operator client operator
  for i in 1 2 3; do
    issue "c$i" coordinator "c$i" --host "127.0.0.$i"
    # A node's certificate names it and its site: the coordinators then
    # serve a node only the tensors of the shards it holds.
    issue "node-$i" node "node-$i" --host "127.0.0.$i" --label site=local
  done
  for i in 1 2 3; do
    addr="$(echo "$coords" | cut -d, -f"$i")"
    nohup "$bin" coordinator --id "$i" --listen "$addr" --peers "$peers" \
      --data-dir "$state/c$i" --certs "$state/certs/c$i" \
      --model-root "$model_root" --model-root "$PWD/configs/calibration" \
      --output-root "$output_root" >>"$state/c$i.log" 2>&1 &
    echo $! >"$state/c$i.pid"
  done
  for i in 1 2 3; do
    nohup "$bin" node --coordinators "$coords" --listen "127.0.0.$i:0" \
      --work-dir "$state/n$i" --certs "$state/certs/node-$i" >>"$state/n$i.log" 2>&1 &
    echo $! >"$state/n$i.pid"
  done
  echo "started; now run:"
  echo "  export HCX_COORDINATORS=$coords HCX_CERTS=$state/certs/operator"
  ;;
stop)
  for f in "$state"/*.pid; do
    [ -f "$f" ] || continue
    kill "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  echo "stopped"
  ;;
*)
  echo "usage: $0 start|stop [STATE_DIR]" >&2
  exit 2
  ;;
esac
