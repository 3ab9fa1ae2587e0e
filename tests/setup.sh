#!/usr/bin/env sh
# What the tests need beyond cargo, installed when missing: the Python packages of
# tests/requirements.txt (gRPC client, grpcurl, Prometheus parser, Playwright) and, from
# Debian's packages, Chromium (the dashboard test's browser) and tmux (agentctl top's test).
set -eu
cd "$(dirname "$0")"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r requirements.txt
# pyenv's Python puts new commands (grpcurl) on PATH only through its shims.
if command -v pyenv >/dev/null; then pyenv rehash || true; fi
missing=""
command -v chromium >/dev/null || missing="$missing chromium"
command -v tmux >/dev/null || missing="$missing tmux"
command -v curl >/dev/null || missing="$missing curl"
if [ -n "$missing" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "tests/setup.sh: the tests need$missing; install as root: apt-get install$missing" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# Debian's kernel and QEMU for tests/vm/run.sh (as root; CI runs it).
if [ "$(id -u)" -eq 0 ]; then
  vm/setup.sh
fi
