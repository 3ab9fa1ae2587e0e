#!/bin/sh
# Inside the VM guest (systemd as PID 1, pure cgroup v2): agentd installed from
# deploy/agentd.service as shipped, with only the binary's path changed. Each check prints `ok: ...`; the
# first that fails prints `FAILED: ...` with agentd's journal and exits 1.
#
#   systemd.sh REPO BIN_DIR
set -eu
repo=$1 bin=$2
ctl="$bin/agentctl --socket /var/lib/agentd/agentd.sock"
ok() { echo "ok: $*"; }
fail() {
  echo "FAILED: $*"
  journalctl -u agentd --no-pager -n 60 -o cat || true
  exit 1
}
# Polls a shell condition for up to 30 s.
until_true() {
  what=$1 && shift
  i=0
  until "$@" >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -lt 300 ] || fail "$what"
    sleep 0.1
  done
}
main_pid() { systemctl show -p MainPID --value agentd; }
alive() { kill -0 "$1" 2>/dev/null; }
pid_of() { $ctl status "$1" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["pid"])'; }
cgroup_of() { $ctl status "$1" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["cgroup"])'; }
state_of() { $ctl status "$1" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["state"])'; }

sed "s|/usr/local/bin/agentd|$bin/agentd|" "$repo/deploy/agentd.service" >/etc/systemd/system/agentd.service
systemctl daemon-reload
systemctl start agentd || fail "systemctl start agentd (Type=notify: READY=1)"
ok "started by systemd, Type=notify, MainPID $(main_pid)"

$ctl spawn --id limited --memory-high 64 --memory-max 128 --cpu-max 0.5 --pids-max 32 -- sleep 1000 >/dev/null \
  || fail "spawn with limits"
$ctl spawn --id plain -- sleep 1000 >/dev/null || fail "spawn"
service=/sys/fs/cgroup/system.slice/agentd.service
limited=/sys/fs/cgroup$(cgroup_of limited)
case "$limited" in
  /sys/fs/cgroup/system.slice/agentd.service/agents/*) ;;
  *) fail "the agent's cgroup is below agentd's delegated subtree: $limited" ;;
esac
[ "$(cat "$limited/memory.high")" = $((64 * 1024 * 1024)) ] || fail "memory.high: $(cat "$limited/memory.high")"
[ "$(cat "$limited/memory.max")" = $((128 * 1024 * 1024)) ] || fail "memory.max: $(cat "$limited/memory.max")"
[ "$(cat "$limited/cpu.max")" = "50000 100000" ] || fail "cpu.max: $(cat "$limited/cpu.max")"
[ "$(cat "$limited/pids.max")" = 32 ] || fail "pids.max: $(cat "$limited/pids.max")"
ok "v2 limits written: memory.high, memory.max, cpu.max, pids.max"
grep -qx "$(main_pid)" "$service/supervisor/cgroup.procs" || fail "agentd moved itself into its supervisor leaf"
ok "agentd in $service/supervisor; controllers for agents: $(cat "$service/agents/cgroup.subtree_control")"
systemd-cgls --no-pager -u agentd.service >/tmp/cgls || fail "systemd-cgls"
for id in limited plain; do
  grep -q "$id" /tmp/cgls || fail "systemd-cgls shows $id: $(cat /tmp/cgls)"
done
ok "systemd-cgls shows each agent in its own cgroup:"
sed 's/^/    /' /tmp/cgls

before=$(main_pid)
systemctl reload agentd || fail "systemctl reload"
until_true "agentd logs the SIGHUP" sh -c "journalctl -u agentd -o cat | grep -q SIGHUP"
[ "$(main_pid)" = "$before" ] && systemctl is-active -q agentd || fail "alive after reload"
ok "systemctl reload: SIGHUP handled, same process"

limited_pid=$(pid_of limited) plain_pid=$(pid_of plain)
systemctl stop agentd || fail "systemctl stop"
alive "$limited_pid" || alive "$plain_pid" && fail "systemctl stop ends the agents with their ladders"
[ ! -e "$service/agents" ] || fail "nothing of agentd left in its cgroup: $(ls "$service")"
ok "systemctl stop: agentd stopped its agents, its cgroup is gone"
systemctl start agentd || fail "systemctl start after stop"
[ "$(state_of plain)" = AGENT_STATE_KILLED ] || [ "$(state_of plain)" = AGENT_STATE_COMPLETED ] \
  || fail "the records survive: plain is $(state_of plain)"
ok "systemctl start: agentd back, the records kept"
# Not checked here, because they fail on systemd 252 (Debian 12): a restart while agents run
# (after a crash, the watchdog, or --on-shutdown=detach). systemd must start the new agentd in
# agentd.service's own cgroup, which holds processes below it and has controllers enabled for
# them, and the kernel refuses that (EBUSY: no internal processes), so the start fails with
# 219/CGROUP. systemd 254 and later have DelegateSubgroup= for this.
echo "not checked: adoption after a crash or a watchdog kill under systemd 252 (219/CGROUP)"
$ctl spawn --id again -- sleep 1000 >/dev/null || fail "spawn after the restart"
$ctl stop --all >/dev/null || fail "stop all"
systemctl stop agentd
ok "stopped"
