#!/usr/bin/env bash
# Builds the hcx-cluster image FROM scratch around the release binary (or
# $HCX_BIN) and the shared libraries `ldd` says it links, copied at the
# same paths. The image runs as uid 10001 with /data writable.
#
#   deploy/build-image.sh            # tag: $HCX_IMAGE, default hcx-cluster:dev
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="${HCX_IMAGE:-hcx-cluster:dev}"
bin="${HCX_BIN:-}"
if [ -z "$bin" ]; then
  (cd "$root" && cargo build --release --locked --bin hcx-cluster)
  bin="${CARGO_TARGET_DIR:-$root/target}/release/hcx-cluster"
fi
[ -x "$bin" ] || { echo "build-image: no executable at $bin" >&2; exit 1; }
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/tmp" "$ctx/data/data"
chmod 1777 "$ctx/rootfs/tmp"
# Debug information is of no use in the image and can be most of its size.
objcopy --strip-debug "$bin" "$ctx/rootfs/usr/local/bin/hcx-cluster" 2>/dev/null \
  || cp "$bin" "$ctx/rootfs/usr/local/bin/hcx-cluster"
libs="$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')"
[ -n "$libs" ] || { echo "build-image: ldd found no libraries for $bin (a static binary needs none; copy it alone)" >&2; }
for lib in $libs; do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
cp "$root/deploy/Dockerfile" "$ctx/Dockerfile"
docker build --quiet --tag "$tag" "$ctx" >/dev/null
echo "built $tag ($(du -sh "$ctx/rootfs" | cut -f1) of binary and libraries)"
