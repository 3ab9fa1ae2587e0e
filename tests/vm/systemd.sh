#!/bin/sh
# Inside the VM guest (systemd as PID 1, pure cgroup v2): agentd installed from
# deploy/agentd.service as shipped, with only the binary's path changed and, in a drop-in, the
# watchdog shortened so that a stall is seen in seconds. Each check prints `ok: ...`; the
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
mkdir -p /etc/systemd/system/agentd.service.d
printf '[Service]\nWatchdogSec=4s\nTimeoutAbortSec=2s\nRestartSec=1s\n' \
  >/etc/systemd/system/agentd.service.d/vm-test.conf
systemctl daemon-reload
systemctl start agentd || fail "systemctl start agentd (Type=notify: READY=1)"
ok "started by systemd, Type=notify, MainPID $(main_pid)"

$ctl spawn --id limited --memory-high 64 --memory-max 128 --cpu-max 0.5 --pids-max 32 -- sleep 1000 >/dev/null \
  || fail "spawn with limits"
$ctl spawn --id plain -- sleep 1000 >/dev/null || fail "spawn"
service=/sys/fs/cgroup/system.slice/agentd.service
keeper=$(ls -d /sys/fs/cgroup/system.slice/agentd-keeper-var-lib-agentd.*.scope)
scope=${keeper##*/}
limited=/sys/fs/cgroup$(cgroup_of limited)
case "$limited" in
  "$keeper"/agents/*) ;;
  *) fail "the agent's cgroup is in the keeper's delegated scope: $limited" ;;
esac
[ "$(cat "$limited/memory.high")" = $((64 * 1024 * 1024)) ] || fail "memory.high: $(cat "$limited/memory.high")"
[ "$(cat "$limited/memory.max")" = $((128 * 1024 * 1024)) ] || fail "memory.max: $(cat "$limited/memory.max")"
[ "$(cat "$limited/cpu.max")" = "50000 100000" ] || fail "cpu.max: $(cat "$limited/cpu.max")"
[ "$(cat "$limited/pids.max")" = 32 ] || fail "pids.max: $(cat "$limited/pids.max")"
ok "v2 limits written: memory.high, memory.max, cpu.max, pids.max"
grep -qx "$(main_pid)" "$service/cgroup.procs" && [ -z "$(cat "$service/cgroup.subtree_control")" ] \
  || fail "agentd alone in its unit's cgroup, no controllers enabled there"
[ -n "$(cat "$keeper/keeper/cgroup.procs")" ] || fail "the keeper in its scope's keeper leaf"
ok "agentd in $service; the keeper in $scope, controllers for agents: $(cat "$keeper/agents/cgroup.subtree_control")"
systemd-cgls --no-pager -u agentd.service -u "$scope" >/tmp/cgls || fail "systemd-cgls"
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
# A crash: systemd starts agentd again (Restart=on-failure) and it adopts the agents.
crashed=$(main_pid)
kill -KILL "$crashed"
until_true "systemd restarts a crashed agentd" sh -c \
  "[ \"\$(systemctl show -p MainPID --value agentd)\" != $crashed ] && systemctl is-active -q agentd"
until_true "agents adopted after the crash" sh -c "$ctl status limited --json | grep -q RUNNING"
[ "$(pid_of limited)" = "$limited_pid" ] && alive "$limited_pid" || fail "the same limited agent"
ok "crash: systemd restarted agentd, which adopted the agents (same pids)"

# A stalled agentd (SIGSTOP: no watchdog ping) is killed by the watchdog and restarted, and
# the new one adopts the agents.
stalled=$(main_pid)
kill -STOP "$stalled"
until_true "the watchdog restarts a stalled agentd" sh -c \
  "[ \"\$(systemctl show -p MainPID --value agentd)\" != $stalled ] && systemctl is-active -q agentd"
journalctl -u agentd -o cat | grep -qi watchdog || fail "systemd says the watchdog fired"
until_true "agents adopted after the watchdog restart" sh -c "$ctl status plain --json | grep -q RUNNING"
[ "$(pid_of plain)" = "$plain_pid" ] || fail "the same plain agent"
ok "watchdog: a stalled agentd killed and restarted, its agents adopted"

systemctl stop agentd || fail "systemctl stop"
alive "$limited_pid" && alive "$plain_pid" || fail "agents outlive systemctl stop (--on-shutdown=detach)"
ok "systemctl stop: agentd gone, its agents still run"
systemctl start agentd || fail "systemctl start after stop"
[ "$(state_of limited)" = AGENT_STATE_RUNNING ] && [ "$(pid_of limited)" = "$limited_pid" ] \
  || fail "the started agentd adopts the running agents"
ok "systemctl start: the agents adopted, same pids"
$ctl spawn --id again -- sleep 1000 >/dev/null || fail "spawn after the restart"
# Sandboxes on this kernel's Landlock (6.1: ABI 2, which cannot scope signals): an agent that
# runs as agentd's own user gets a PID namespace of its own, so it can name (and signal) no
# process outside it; one with a user of its own is confined as well (files by Landlock ABI 2
# and the mount namespace, no network, seccomp).
abi=$(python3 -c 'import ctypes; print(ctypes.CDLL(None).syscall(444, None, 0, 1))')
$ctl spawn --id boxed-own --sandbox --net none --env "AGENTD_MAIN=$(main_pid)" -- \
  /usr/bin/python3 -c '
import os, signal
print("pids=" + ",".join(sorted(p for p in os.listdir("/proc") if p.isdigit())))
try:
    os.kill(int(os.environ["AGENTD_MAIN"]), signal.SIGTERM)
    print("kill_agentd=ok")
except OSError as e:
    print(f"kill_agentd=denied {type(e).__name__}")
' >/dev/null 2>/tmp/err || fail "a sandbox for agentd's own user: $(cat /tmp/err)"
$ctl wait boxed-own >/dev/null || fail "the own-user probe ran: $($ctl logs boxed-own)"
$ctl logs boxed-own --stdout >/tmp/probe
if [ "$abi" -lt 6 ]; then
  grep -qx "pids=1,2" /tmp/probe || fail "its own PID namespace: $(cat /tmp/probe)"
fi
grep -q "^kill_agentd=denied" /tmp/probe || fail "agentd cannot be signalled: $(cat /tmp/probe)"
alive "$(main_pid)" || fail "agentd lives on"
ok "Landlock ABI $abi: a sandbox for agentd's own user: $(tr '\n' ' ' </tmp/probe)"
echo "the host's secret" >/var/tmp/vm-secret && chmod 644 /var/tmp/vm-secret
mkdir -p /var/tmp/vm-probe
cat >/var/tmp/vm-probe/probe.py <<'PROBE'
import ctypes, os, socket
def attempt(name, f):
    try:
        f()
        print(f"{name}=ok")
    except Exception as e:
        print(f"{name}=denied {type(e).__name__}")
attempt("read_secret", lambda: open("/var/tmp/vm-secret").read())
attempt("write_etc", lambda: open("/etc/vm-planted", "w").write("x"))
attempt("write_own", lambda: open(os.environ["AGENTD_AGENT_DIR"] + "/mine", "w").write("x"))
attempt("read_passwd", lambda: open("/etc/passwd").read())
attempt("connect_out", lambda: socket.create_connection(("10.0.2.2", 80), timeout=2))
attempt("agentd_socket", lambda: socket.socket(socket.AF_UNIX).connect("/var/lib/agentd/agentd.sock"))
libc = ctypes.CDLL(None, use_errno=True)
print("mount=" + ("ok" if libc.mount(b"none", b"/mnt", b"tmpfs", 0, None) == 0 else "denied"))
PROBE
chmod -R a+rX /var/tmp/vm-probe
$ctl spawn --id boxed --sandbox --net none --user nobody \
  --read /var/tmp/vm-probe -- /usr/bin/python3 /var/tmp/vm-probe/probe.py \
  >/dev/null 2>/tmp/err || fail "a sandbox for a user of its own: $(cat /tmp/err)"
$ctl wait boxed >/dev/null || fail "the probe ran: $($ctl logs boxed)"
$ctl logs boxed --stdout >/tmp/probe
for name in read_secret write_etc connect_out agentd_socket mount; do
  grep -q "^$name=denied" /tmp/probe || fail "$name refused: $(cat /tmp/probe)"
done
for name in write_own read_passwd; do
  grep -q "^$name=ok" /tmp/probe || fail "$name allowed: $(cat /tmp/probe)"
done
[ ! -e /etc/vm-planted ] || fail "nothing planted in /etc"
ok "Landlock ABI $abi: a sandboxed agent as nobody confined: $(tr '\n' ' ' </tmp/probe)"

$ctl stop --all >/dev/null || fail "stop all"
alive "$limited_pid" || alive "$plain_pid" && fail "agentctl stop --all ends them"
systemctl stop agentd
ok "agentctl stop --all: every agent stopped"
