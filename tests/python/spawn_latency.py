"""Spawn latency of a running agentd, measured from a Python grpcio client, optionally with
watchers subscribed to every event.

Usage: python3 tests/python/spawn_latency.py SOCKET [--spawns N] [--watchers W]
(generate stubs first: python3 -m grpc_tools.protoc -I proto --python_out=/tmp/stubs
 --grpc_python_out=/tmp/stubs agentd/v1/agentd.proto, and pass --stubs /tmp/stubs)
"""

import argparse
import statistics
import sys
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("socket")
parser.add_argument("--stubs", required=True)
parser.add_argument("--spawns", type=int, default=200)
parser.add_argument("--watchers", type=int, default=0)
args = parser.parse_args()
sys.path.insert(0, args.stubs)

import grpc  # noqa: E402
from agentd.v1 import agentd_pb2 as pb  # noqa: E402
from agentd.v1 import agentd_pb2_grpc as rpc  # noqa: E402

options = [("grpc.default_authority", "localhost")]
channel = grpc.insecure_channel(f"unix://{args.socket}", options=options)
stub = rpc.AgentSupervisorStub(channel)

received = [0]
lock = threading.Lock()
streams = []


def watch():
    watcher = rpc.AgentSupervisorStub(
        grpc.insecure_channel(f"unix://{args.socket}", options=options)
    )
    stream = watcher.WatchAgents(pb.WatchAgentsRequest())
    stream.initial_metadata()
    streams.append(stream)
    try:
        for _ in stream:
            with lock:
                received[0] += 1
    except grpc.RpcError:
        pass


threads = [threading.Thread(target=watch, daemon=True) for _ in range(args.watchers)]
for t in threads:
    t.start()
while len(streams) < args.watchers:
    time.sleep(0.01)

run = f"bench-{time.time_ns()}"
latencies = []
for i in range(args.spawns):
    started = time.perf_counter()
    stub.Spawn(pb.SpawnRequest(agent_id=f"{run}-{i}", command=["sleep", "3600"]))
    latencies.append((time.perf_counter() - started) * 1000)

status_latencies = []
for i in range(2000):
    started = time.perf_counter()
    stub.Status(pb.StatusRequest(agent_id=f"{run}-{i % args.spawns}"))
    status_latencies.append((time.perf_counter() - started) * 1000)

started = time.perf_counter()
stub.Cleanup(pb.CleanupRequest(agent_ids=[f"{run}-{i}" for i in range(args.spawns)]))
stop_seconds = time.perf_counter() - started
for stream in streams:
    stream.cancel()


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


print(
    f"watchers={args.watchers} spawns={args.spawns} "
    f"spawn_ms p50={pct(latencies, 50):.2f} p99={pct(latencies, 99):.2f} "
    f"mean={statistics.mean(latencies):.2f} | status_ms p50={pct(status_latencies, 50):.3f} "
    f"p99={pct(status_latencies, 99):.3f} | stop_all={stop_seconds:.3f}s "
    f"| events_delivered={received[0]}"
)
