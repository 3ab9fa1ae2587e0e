#!/usr/bin/env bash
# Checks deploy/agentd.service with `systemd-analyze verify`, where the machine has it, against
# the agentd just built (the unit names /usr/local/bin/agentd, which CI does not install).
set -euo pipefail
agentd=$(realpath "$1")
if ! command -v systemd-analyze >/dev/null; then
  echo "systemd-analyze is not on this machine: deploy/agentd.service not verified"
  exit 0
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
sed "s|/usr/local/bin/agentd|$agentd|" deploy/agentd.service >"$dir/agentd.service"
out=$(systemd-analyze verify "$dir/agentd.service" 2>&1 || true)
if [ -n "$out" ]; then
  echo "$out"
  echo "deploy/agentd.service: systemd-analyze verify has findings"
  exit 1
fi
echo "systemd-analyze verify: deploy/agentd.service is clean"
