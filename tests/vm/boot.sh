#!/usr/bin/env bash
# Boots Debian's kernel (tests/vm/setup.sh) in QEMU with the host's / as a read-only 9p root
# under a tmpfs overlay, systemd as PID 1 on a pure cgroup v2 hierarchy; runs a command in the
# guest (a unit with Delegate=yes) once boot has finished; prints its output and exits with
# its status.
#
#   boot.sh [-m MEM_MB] [-smp N] [-C GUEST_CWD] [-s DIR]... [-k] -- COMMAND [ARGS...]
#     -s DIR : also share host DIR read-write at the same path in the guest (repeatable)
#     -k : keep the run dir (console.log, output) and print its path
#
# AGENTD_VM_DIR: what setup.sh provisioned (/var/cache/agentd-vm). AGENTD_VM_ACCEL: tcg
# (default; KVM hangs at boot on these machines, nested) or kvm where it works.
# AGENTD_VM_TIMEOUT: seconds before the guest is killed (600).
set -euo pipefail
VMX=${AGENTD_VM_DIR:-/var/cache/agentd-vm}
ACCEL=${AGENTD_VM_ACCEL:-tcg}
case "$ACCEL" in
  tcg) CPU=max ;;
  kvm) CPU=host ;;
  *) echo "AGENTD_VM_ACCEL is tcg or kvm, not $ACCEL" >&2; exit 2 ;;
esac
MEM=2048 SMP=2 GCWD=$PWD KEEP=0 SHARES=()
while [ $# -gt 0 ]; do
  case "$1" in
    -m) MEM=$2; shift 2;;
    -smp) SMP=$2; shift 2;;
    -C) GCWD=$2; shift 2;;
    -k) KEEP=1; shift;;
    -s) SHARES+=("$(realpath "$2")"); shift 2;;
    --) shift; break;;
    *) break;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [-m MB] [-smp N] [-C DIR] [-s DIR]... [-k] -- CMD [ARGS...]" >&2; exit 2; }

KVER=$(basename "$(ls "$VMX"/root/boot/vmlinuz-* | head -1)"); KVER=${KVER#vmlinuz-}
QEMU=$VMX/root/usr/bin/qemu-system-x86_64
mkdir -p "$VMX/runs"
RUN=$(mktemp -d "$VMX/runs/run.XXXXXX")
mkdir -p "$RUN/units"

EXTRA=()
i=0
for d in "${SHARES[@]}"; do
  echo "share$i $d" >> "$RUN/shares"
  EXTRA+=(-virtfs "local,path=$d,mount_tag=share$i,security_model=none,multidevs=remap")
  i=$((i+1))
done

# The user command, quoted so it survives as an argv.
{
  echo '#!/bin/sh'
  printf 'cd %q || exit 125\n' "$GCWD"
  printf 'exec'; printf ' %q' "$@"; printf '\n'
} > "$RUN/cmd.sh"

# Runs inside the guest as a systemd service once the boot transaction is done.
cat > "$RUN/guest-wrapper.sh" <<'EOF'
#!/bin/sh
R=/vmrun
: > $R/started                      # host uses this file's mtime as "command started"
systemctl is-system-running --wait > $R/system-state 2>&1
sh $R/cmd.sh > $R/output 2>&1 < /dev/null
echo $? > $R/exit_status
sync
echo "vmtest: command finished, exit status $(cat $R/exit_status)"
EOF

cat > "$RUN/units/vmtest.target" <<EOF
[Unit]
Description=VM test target
Requires=basic.target vmtest.service
After=basic.target
AllowIsolate=yes
EOF
cat > "$RUN/units/vmtest.service" <<EOF
[Unit]
Description=VM test command
After=basic.target
SuccessAction=poweroff-force
FailureAction=poweroff-force
[Service]
Type=exec
Delegate=yes
ExecStart=/bin/sh /vmrun/guest-wrapper.sh
StandardOutput=journal+console
StandardError=journal+console
EOF

APPEND="console=ttyS0 panic=-1 loglevel=4 systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all"
APPEND+=" systemd.unit=vmtest.target systemd.show_status=error systemd.firstboot=off"
[ -n "${AGENTD_VM_DEBUG:-}" ] && APPEND+=" systemd.show_status=1 systemd.log_level=debug systemd.log_target=console"
APPEND+=" VMMODS=$VMX/root/lib/modules"

echo "vm: Linux $KVER, accel $ACCEL, ${MEM} MB, $SMP CPUs" >&2
T0=$(date +%s%N)
rc_q=0
timeout --foreground "${AGENTD_VM_TIMEOUT:-600}" "$QEMU" \
  -L "$VMX/root/usr/share/seabios" -L "$VMX/root/usr/share/qemu" \
  -machine "pc,accel=$ACCEL" -cpu "$CPU" -smp "$SMP" -m "$MEM" \
  -nodefaults -no-user-config -display none -monitor none -no-reboot \
  -serial "file:$RUN/console.log" \
  -kernel "$VMX/root/boot/vmlinuz-$KVER" -initrd "$VMX/initramfs.cpio" -append "$APPEND" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  -virtfs "local,path=$RUN,mount_tag=vmrun,security_model=none,multidevs=remap" \
  "${EXTRA[@]}" \
  || rc_q=$?
T1=$(date +%s%N)
seconds() { printf '%d.%d' $(($1 / 1000000000)) $(($1 / 100000000 % 10)); }

[ -f "$RUN/output" ] && cat "$RUN/output"
{
  echo "vm: qemu exited $rc_q; systemd said the system was $(cat "$RUN/system-state" 2>/dev/null || echo '?')"
  if [ -f "$RUN/started" ]; then
    started=$(($(stat -c %Y "$RUN/started") * 1000000000))
    echo "vm: booted in about $(seconds $((started > T0 ? started - T0 : 0))) s, $(seconds $((T1 - T0))) s in all"
    # Killed by the timeout: the guest's kernel and systemd say whether it hung as a whole
    # (a test binary alive would have printed libtest's "running for over 60 seconds").
    if [ "$rc_q" = 124 ]; then
      echo "vm: timed out; the console's end:"
      tail -n 60 "$RUN/console.log" || true
    fi
  else
    echo "vm: the command never started ($(seconds $((T1 - T0))) s); the console's end:"
    tail -n 40 "$RUN/console.log" || true
  fi
} >&2

if [ -f "$RUN/exit_status" ]; then rc=$(cat "$RUN/exit_status"); else rc=125; fi
if [ "$KEEP" = 1 ]; then echo "vm: run dir kept: $RUN" >&2; else rm -rf "$RUN"; fi
exit "$rc"
