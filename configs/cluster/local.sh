#!/usr/bin/env bash
# A local cluster on one machine: three coordinators (raft voters) on
# 127.0.0.1-3:7101-7103 and three worker nodes, with TLS from `certs init`.
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
  if [ ! -f "$state/certs/ca.pem" ]; then
    "$bin" certs init --dir "$state/certs" --host 127.0.0.2 --host 127.0.0.3
  fi
  for i in 1 2 3; do
    # Each node gets a certificate naming it: the coordinators then serve a
    # node only the tensors of the shards it holds.
    if [ ! -f "$state/certs/node-node-$i.pem" ]; then
      "$bin" certs issue --dir "$state/certs" --node "node-$i" --host "127.0.0.$i" --site local
    fi
  done
  for i in 1 2 3; do
    addr="$(echo "$coords" | cut -d, -f"$i")"
    nohup "$bin" coordinator --id "$i" --listen "$addr" --peers "$peers" \
      --data-dir "$state/c$i" --certs "$state/certs" \
      --model-root "$model_root" --model-root "$PWD/configs/calibration" \
      --output-root "$output_root" >>"$state/c$i.log" 2>&1 &
    echo $! >"$state/c$i.pid"
  done
  for i in 1 2 3; do
    nohup "$bin" node --coordinators "$coords" --listen "127.0.0.$i:0" --name "node-$i" \
      --work-dir "$state/n$i" --certs "$state/certs" >>"$state/n$i.log" 2>&1 &
    echo $! >"$state/n$i.pid"
  done
  echo "started; now run:"
  echo "  export HCX_COORDINATORS=$coords HCX_CERTS=$state/certs"
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
