"""Spawn latency with tracing off and on (exporting to the local OTLP stand-in), in one run.

    cargo build --release --bin agentd
    TMPDIR=/dev/shm python3 tests/bench/tracing.py --agentd target/release/agentd --spawns 1000 --rounds 6

Each round starts a fresh daemon without the OTEL_* variables and one with
OTEL_EXPORTER_OTLP_ENDPOINT pointing at tests/python/otlp_collector.py, and times `--spawns`
Spawn calls one at a time (each agent `sleep 600`, stopped after), from Python over the Unix
socket. With `--baseline BIN` (agentd built from an earlier commit) each round also runs
that binary without the variables, to show what the tracing code costs when it is off.
Prints p50 and p99 per round, agentd's own CPU time per spawn (from /proc, so the
stand-in collector's work on the same cores is not counted), and the medians.

The two take turns going first: each daemon's folder is deleted after its run, and on a
filesystem without a journal (this machine's ext4) creating files right after many were
deleted is slower (the kernel skips recently freed inodes), so whichever ran second would
pay for the first. TMPDIR=/dev/shm keeps the folders off the disk altogether.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from fleet_coordinator import Node, pb  # noqa: E402  (the stubs it generates)


def run(agentd, spawns, env):
    folder = tempfile.mkdtemp(prefix="agentd-bench-tracing-")
    sock = os.path.join(folder, "agentd.sock")
    daemon = subprocess.Popen([agentd, "--data-dir", os.path.join(folder, "data"), "--socket", sock,
                               "--capacity", "100000"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    daemon.stdout.readline()
    startup_ms = cpu_time_ms(daemon.pid)
    node = Node("bench", f"unix://{sock}")
    times = []
    try:
        for i in range(spawns):
            start = time.perf_counter()
            node.spawn(pb.SpawnRequest(agent_id=f"a{i}", command=["sleep", "600"]))
            times.append((time.perf_counter() - start) * 1000)
        # The daemon's own CPU time over the spawns (user + system), apart from the collector's.
        cpu_ms = cpu_time_ms(daemon.pid) - startup_ms
        node.stub.Cleanup(pb.CleanupRequest(all=True, force=True), timeout=60)
    finally:
        node.channel.close()
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(folder, ignore_errors=True)
    times.sort()
    return times[len(times) // 2], times[len(times) * 99 // 100], cpu_ms / spawns


def cpu_time_ms(pid):
    """A process's user and system CPU time so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--agentd", default="target/release/agentd")
    parser.add_argument("--spawns", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--baseline", help="an earlier agentd, run without the variables too")
    args = parser.parse_args()
    collector = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests/python/otlp_collector.py")],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    port = collector.stdout.readline().decode().strip()
    # The spans it prints are read and dropped, so the pipe never fills.
    drain = subprocess.Popen(["cat"], stdin=collector.stdout, stdout=subprocess.DEVNULL)
    off_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    on_env = dict(off_env, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}")
    modes = [("off", args.agentd, off_env), ("on", args.agentd, on_env)]
    if args.baseline:
        modes.append(("baseline", args.baseline, off_env))
    results = {mode: [] for mode, _, _ in modes}
    cpu = {mode: [] for mode, _, _ in modes}
    try:
        for round_ in range(args.rounds):
            for mode, agentd, env in modes if round_ % 2 == 0 else modes[::-1]:
                p50, p99, cpu_per_spawn = run(agentd, args.spawns, env)
                results[mode].append(p50)
                cpu[mode].append(cpu_per_spawn)
                print(f"round {round_ + 1}, tracing {mode}: spawn p50 {p50:.3f} ms, p99 {p99:.3f} ms, "
                      f"agentd CPU {cpu_per_spawn:.3f} ms per spawn", flush=True)
    finally:
        collector.stdin.close()
        collector.wait()
        drain.wait()
    for mode in results:
        print(f"tracing {mode}: median of p50s {statistics.median(results[mode]):.3f} ms, "
              f"median agentd CPU {statistics.median(cpu[mode]):.3f} ms per spawn")
    # Rounds drift together (the machine, the filesystem), so the difference within each round
    # says more than the medians apart.
    for mode, against in (("on", "off"), ("off", "baseline")):
        if mode in results and against in results:
            p50 = statistics.median(a - b for a, b in zip(results[mode], results[against]))
            used = statistics.median(a - b for a, b in zip(cpu[mode], cpu[against]))
            print(f"{mode} - {against}, median within a round: p50 {p50:+.3f} ms, "
                  f"agentd CPU {used:+.3f} ms per spawn")


if __name__ == "__main__":
    main()
