"""Where a spawn's time goes: agentd's own spans for each step of Spawn, from its traces.

    cargo build --release --bin agentd
    python3 tests/bench/spawn_budget.py --agentd target/release/agentd --spawns 300 --rounds 3

Each round starts a fresh daemon (data folder on disk, in TMPDIR) that exports its traces to
the OTLP stand-in (tests/python/otlp_collector.py) and makes `--spawns` Spawn calls one at a
time from Python over the Unix socket (each agent `sleep 600`, all killed after). Every Spawn
is one trace: the RPC's span and, inside it, a span per step:

    check    validation, sandbox and user checks, capacity (agentd.spawn.check)
    folder   the agent's folder and its output and prompt files, made ahead and renamed
             into place (agentd.spawn.folder)
    spec     the spec written for a rebuild of the store (agentd.spawn.spec)
    record   the STARTING record put in the store (agentd.spawn.record)
    exec     the order made and sent to the keeper (agentd.spawn.exec), of which:
      cgroup   the agent's cgroup made and limited (agentd.spawn.cgroup)
    keeper   from the order to the keeper's answer once the program runs: its clone3 and exec
             (agentd.spawn.keeper; the supervisor meanwhile serves other commands)
    started  the RUNNING record, the event, the first sample (agentd.spawn.started)
    flush    the store flushed: the promise that an acknowledged spawn survives a crash
             (agentd.spawn.flush)

and what is left of the RPC's span (decoding, the queue to the supervisor, the answer's way
back into its loop, encoding) and of the client's own time (the transport, Python). Prints p50 and p90 of each, per round and the
median of the rounds. Tracing costs a little itself: tests/bench/tracing.py measures how much.
"""

import argparse
import json
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

STEPS = ["check", "folder", "spec", "record", "exec", "cgroup", "keeper", "started", "flush"]
# The steps that follow one another inside the RPC (cgroup is inside exec).
SEQUENTIAL = ["check", "folder", "spec", "record", "exec", "keeper", "started", "flush"]


def run(agentd, spawns, env):
    """Spawns one at a time; returns each spawn's client time (ms) by agent id."""
    folder = tempfile.mkdtemp(prefix="agentd-bench-budget-")
    sock = os.path.join(folder, "agentd.sock")
    daemon = subprocess.Popen([agentd, "--data-dir", os.path.join(folder, "data"), "--socket", sock,
                               "--capacity", "100000"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    daemon.stdout.readline()
    node = Node("bench", f"unix://{sock}")
    client = {}
    try:
        for i in range(spawns):
            start = time.perf_counter()
            node.spawn(pb.SpawnRequest(agent_id=f"a{i}", command=["sleep", "600"]))
            client[f"a{i}"] = (time.perf_counter() - start) * 1000
        node.stub.Cleanup(pb.CleanupRequest(all=True, force=True), timeout=60)
    finally:
        node.channel.close()
        daemon.terminate()  # flushes the last spans
        daemon.wait()
        shutil.rmtree(folder, ignore_errors=True)
    return client


def budgets(spans, client):
    """One dict per spawn: the milliseconds of each step, the RPC's rest and the client's."""
    by_trace = {}
    for span in spans:
        by_trace.setdefault(span["trace_id"], []).append(span)
    rows = []
    for trace in by_trace.values():
        steps = {}
        rpc = None
        for span in trace:
            ms = (span["end"] - span["start"]) / 1e6
            name = span["name"]
            if name.startswith("agentd.spawn."):
                step = name.removeprefix("agentd.spawn.")
                steps[step] = steps.get(step, 0.0) + ms
            elif name.endswith("/Spawn"):
                rpc = (span, ms)
        agent = next((s["attributes"].get("agent.id") for s in trace
                      if s["attributes"].get("agent.id")), None)
        if rpc is None or agent not in client or "exec" not in steps:
            continue
        row = {step: steps.get(step, 0.0) for step in STEPS}
        row["rpc rest"] = rpc[1] - sum(row[step] for step in SEQUENTIAL)
        row["rpc"] = rpc[1]
        row["client rest"] = client[agent] - rpc[1]
        row["client"] = client[agent]
        rows.append(row)
    return rows


def percentile(values, fraction):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * fraction))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--agentd", default="target/release/agentd")
    parser.add_argument("--spawns", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    names = STEPS + ["rpc rest", "rpc", "client rest", "client"]
    medians = {name: [] for name in names}
    for round_ in range(args.rounds):
        spans_file = tempfile.NamedTemporaryFile(prefix="agentd-spans-", suffix=".jsonl")
        collector = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests/python/otlp_collector.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        port = collector.stdout.readline().decode().strip()
        copy = subprocess.Popen(["cat"], stdin=collector.stdout, stdout=spans_file)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
        try:
            client = run(args.agentd, args.spawns, env)
        finally:
            collector.stdin.close()
            collector.wait()
            copy.wait()
        with open(spans_file.name) as lines:
            spans = [json.loads(line) for line in lines if line.strip()]
        rows = budgets(spans, client)
        if len(rows) < args.spawns * 9 // 10:
            sys.exit(f"only {len(rows)} of {args.spawns} spawns were traced whole")
        print(f"round {round_ + 1}: {len(rows)} spawns traced")
        print(f"  {'step':<12} {'p50 ms':>8} {'p90 ms':>8}")
        for name in names:
            values = [row[name] for row in rows]
            p50 = statistics.median(values)
            medians[name].append(p50)
            print(f"  {name:<12} {p50:8.3f} {percentile(values, 0.9):8.3f}", flush=True)
    print(f"median of {args.rounds} rounds' p50 (ms):")
    for name in names:
        print(f"  {name:<12} {statistics.median(medians[name]):8.3f}")


if __name__ == "__main__":
    main()
