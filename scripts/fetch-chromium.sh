#!/usr/bin/env bash
# Installs what the dashboard test drives and checks the dashboard with:
# Debian's `chromium` (headless) and `curl` (the HTTPS check), with a font
# for the screenshot. Idempotent: does nothing when both are on PATH. Needs
# root (or sudo) and Debian's package mirror; where neither is there it says
# so and the dashboard test skips with the same message.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v curl >/dev/null 2>&1; then
  echo "chromium present: $(command -v chromium)"
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    echo "chromium missing and no root to install it: the dashboard test will skip" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium missing and no apt-get to install it: the dashboard test will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends chromium curl fonts-dejavu-core >/dev/null
echo "chromium installed: $(command -v chromium)"
