#!/usr/bin/env bash
# Starts (or stops) the compose cluster of deploy/compose.yaml: builds the
# image FROM scratch, makes a CA in $HCX_STATE/ca (it never enters a
# container), issues one certificate folder per container, and starts three
# coordinators and three nodes on a private network.
#
#   deploy/compose-up.sh [up|down]
#
# HCX_STATE   where the CA and the certificates live (default deploy/.state)
# HCX_BIN     the host's hcx-cluster, for `certs` and for the image (default: cargo build --release)
# HCX_IMAGE, HCX_SUBNET, HCX_PROJECT  image tag, network /24 prefix (172.28.0), compose project (hcx)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd="${1:-up}"
export HCX_STATE="$(mkdir -p "${HCX_STATE:-$root/deploy/.state}" && cd "${HCX_STATE:-$root/deploy/.state}" && pwd)"
export HCX_IMAGE="${HCX_IMAGE:-hcx-cluster:dev}"
export HCX_SUBNET="${HCX_SUBNET:-172.28.0}"
project="${HCX_PROJECT:-hcx}"
compose=(docker-compose --project-name "$project" --file "$root/deploy/compose.yaml")

if [ "$cmd" = down ]; then
  COMPOSE_PROFILES=spare "${compose[@]}" down --volumes --remove-orphans --timeout 5
  exit 0
fi
[ "$cmd" = up ] || { echo "usage: $0 [up|down]" >&2; exit 2; }

if [ -z "${HCX_BIN:-}" ]; then
  (cd "$root" && cargo build --release --locked --bin hcx-cluster)
  export HCX_BIN="${CARGO_TARGET_DIR:-$root/target}/release/hcx-cluster"
fi
bash "$root/deploy/build-image.sh"

state="$HCX_STATE"
if [ ! -f "$state/ca/ca.pem" ]; then
  "$HCX_BIN" certs init --dir "$state/ca"
fi
issue() { # FOLDER ROLE [FLAGS...]: one machine's certificate, named after its folder
  local name="$1" role="$2"
  shift 2
  if [ ! -f "$state/certs/$name/cert.pem" ]; then
    "$HCX_BIN" certs issue --ca "$state/ca" --dir "$state/certs/$name" --role "$role" --name "$name" "$@" >/dev/null
  fi
}
for i in 1 2 3 4; do # c4 is the spare (compose profile `spare`)
  issue "c$i" coordinator --host "c$i" --host "$HCX_SUBNET.1$i"
done
sites=(a b b)
for i in 1 2 3; do
  issue "n$i" node --host "n$i" --host "$HCX_SUBNET.2$i" --label "site=${sites[$((i - 1))]}"
done
issue operator client
# The containers run as uid 10001; their keys are theirs.
for d in c1 c2 c3 c4 n1 n2 n3; do
  chown -R 10001:10001 "$state/certs/$d" 2>/dev/null || chmod -R a+rX "$state/certs/$d"
done

"${compose[@]}" up --detach
echo "started; from this machine:"
echo "  export HCX_COORDINATORS=$HCX_SUBNET.11:7101,$HCX_SUBNET.12:7101,$HCX_SUBNET.13:7101 HCX_CERTS=$state/certs/operator"
echo "  hcx-cluster submit JOB.yaml --output DIR   # sends the job's model, downloads the artifact into DIR"
