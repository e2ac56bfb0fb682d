#!/usr/bin/env bash
# Headless Chromium for the dashboard test (tests/test_dashboard.py opens the HTML in a real browser).
# Debian's `chromium` package: no browser download of its own, so it works where only the package
# registries are reachable. Idempotent: returns at once when chromium is already on PATH.
# Best effort: a machine where apt-get is unavailable (not root, no Debian) keeps going and the test
# skips with the reason instead of failing the setup.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: apt-get not found; the dashboard browser test will be skipped" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install_chromium: not root and no sudo; the dashboard browser test will be skipped" >&2
    exit 0
  fi
fi
echo "install_chromium: installing Debian's chromium (first run only)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null \
  || echo "install_chromium: apt-get install chromium failed; the dashboard browser test will be skipped" >&2
command -v chromium >/dev/null 2>&1 && echo "install_chromium: $(chromium --version 2>/dev/null)"
exit 0
