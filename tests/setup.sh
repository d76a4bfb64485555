#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian/Ubuntu machine: the Python packages
# (runtime + pytest, Playwright, ruff) and Debian's Chromium for the browser tests.
# Playwright's own browser download is not used: the tests drive /usr/bin/chromium.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq chromium >/dev/null
fi
python -m pip install -q --disable-pip-version-check -r tests/requirements.txt
