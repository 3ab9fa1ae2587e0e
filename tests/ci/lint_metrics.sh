#!/usr/bin/env bash
# Starts agentd with its HTTP API and an agent, and lints what /metrics serves with promtool
# (the classic text format, as curl and promtool ask for it).
set -euo pipefail
agentd=$1
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
"$agentd" --data-dir "$dir/data" --http-listen 127.0.0.1:0 --insecure-listen --metrics-per-agent >"$dir/out" 2>"$dir/log" &
pid=$!
# Up to a minute for the ready line (a loaded CI machine is slow to start it), unless agentd
# ends first.
address=
for _ in $(seq 600); do
  address=$(grep -o 'HTTP API on http://[^ ,]*' "$dir/out" | sed 's|.*http://||') && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$address" ]; then
  echo "lint_metrics: agentd never said it was ready; its log:" >&2
  cat "$dir/log" >&2
  exit 1
fi
python3 - "$address" <<'PY'
import json, sys, urllib.request
base = "http://" + sys.argv[1]
spawn = json.dumps({"agentId": "lint", "command": ["sleep", "5"]}).encode()
# A JSON body says so: agentd refuses a change whose body is not declared JSON.
headers = {"Content-Type": "application/json"}
urllib.request.urlopen(urllib.request.Request(base + "/v1/agents", spawn, headers, method="POST"))
PY
python3 - "$address" <<'PY' | promtool check metrics
import sys, urllib.request
sys.stdout.write(urllib.request.urlopen("http://" + sys.argv[1] + "/metrics").read().decode())
PY
echo "promtool: /metrics is clean"
