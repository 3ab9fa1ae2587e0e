#!/usr/bin/env bash
# agentd on the hosts users run: boots Debian's kernel with systemd as PID 1 on a pure cgroup
# v2 hierarchy (tests/vm/boot.sh; provisioned by tests/vm/setup.sh) and runs there, one boot
# each:
#   1. tests/vm/systemd.sh: agentd installed from deploy/agentd.service, started by systemd;
#   2. the containment and lifecycle end-to-end tests, each daemon in a systemd scope of its
#      own with Delegate=yes (AGENTD_TEST_SCOPE=1), as the unit gives agentd one;
#   3. an older kernel's features: the sandbox tests on 6.1's Landlock ABI 2 (signals scoped
#      by a PID namespace per agent instead of Landlock), and the containment tests with
#      agentd acting as before Linux 5.14 (AGENTD_TEST_NO_CGROUP_KILL: SIGKILL to each member
#      in turn instead of `cgroup.kill`).
# Prints each stage's summary lines and wall time; fails when either fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
"$repo/tests/vm/setup.sh"
# The test binary, built if needed (cargo names it on stderr).
e2e=$(cargo test -p agentd-server --test e2e --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[ -n "$e2e" ] || { echo "tests/vm/run.sh: no e2e test binary" >&2; exit 1; }
e2e=$(realpath "$e2e")
bin=$(dirname "$(dirname "$e2e")")
[ -x "$bin/agentd" ] && [ -x "$bin/agentctl" ] || { echo "no agentd or agentctl in $bin" >&2; exit 1; }

status=0
start=$SECONDS
echo "--- vm 1/3: deploy/agentd.service under systemd"
tests/vm/boot.sh -- sh "$repo/tests/vm/systemd.sh" "$repo" "$bin" 2>&1 \
  | grep -E '^(ok|FAILED|not checked|vm):|^    ' || status=1
echo "--- vm 1/3: $((SECONDS - start)) s"

# Left out, said here: a load test whose 30 s bound is for real hardware (TCG runs the guest
# several times slower); it runs on the host with the rest.
skip=(--skip lifecycle::many_spawns_in_flight_on_one_connection_all_answer)
echo "skipped in the VM: ${skip[1]}"
start=$SECONDS
echo "--- vm 2/3: containment and lifecycle tests"
tests/vm/boot.sh -C "$repo/crates/server" -- env AGENTD_TEST_SCOPE=1 AGENTD_TEST_ALL=1 \
  "$e2e" containment:: lifecycle:: "${skip[@]}" --test-threads 2 2>&1 \
  | grep -vE '^test .* \.\.\. ok$' || status=1
echo "--- vm 2/3: $((SECONDS - start)) s"

start=$SECONDS
echo "--- vm 3/3: an older kernel's features: Landlock ABI 2 (sandbox tests), no cgroup.kill (containment tests)"
tests/vm/boot.sh -C "$repo/crates/server" -- env AGENTD_TEST_SCOPE=1 AGENTD_TEST_ALL=1 \
  AGENTD_TEST_NO_CGROUP_KILL=1 "$e2e" sandbox:: containment:: --test-threads 2 2>&1 \
  | grep -vE '^test .* \.\.\. ok$' || status=1
echo "--- vm 3/3: $((SECONDS - start)) s"
exit "$status"
