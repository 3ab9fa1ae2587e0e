"""A coordinator for a fleet of agentd, one per node: it places each agent on the node with the
most free capacity (GetSummary), follows every node's event stream merged into one (each node
resumed from its own last sequence), and carries on when a node's agentd restarts.

    # against running daemons: a list of endpoints, or the DNS name of the headless Service
    python3 examples/fleet_coordinator.py --endpoint unix:///run/a.sock --endpoint unix:///run/b.sock \
        spawn --count 6 --load 20 -- sh -c 'sleep 5'
    python3 examples/fleet_coordinator.py --dns agentd.agentd.svc:7443 --ca-cert ca.pem \
        --token "$AGENTD_TOKEN" watch
    # what CI runs: three daemons on this machine, one killed and restarted in the middle
    python3 examples/fleet_coordinator.py self-test --agentd target/debug/agentd

The stubs are generated from the repository's protos at start (grpcio-tools).
"""

import argparse
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_stubs():
    out = tempfile.mkdtemp(prefix="agentd-stubs-")
    proto = os.path.join(ROOT, "proto")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    status = protoc.main(["protoc", f"-I{proto}", f"-I{include}", f"--python_out={out}",
                          f"--grpc_python_out={out}", os.path.join(proto, "agentd/v1/agentd.proto")])
    if status != 0:
        sys.exit("generating the Python stubs failed")
    sys.path.insert(0, out)
    from agentd.v1 import agentd_pb2, agentd_pb2_grpc  # noqa: E402
    return agentd_pb2, agentd_pb2_grpc


pb, rpc = load_stubs()


class Node:
    """One agentd: its channel, and the last event sequence the coordinator has from it."""

    def __init__(self, name, target, credentials=None, token=None):
        self.name = name
        options = [("grpc.default_authority", "localhost")] if target.startswith("unix:") else []
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.stub = rpc.AgentSupervisorStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.last_sequence = None
        self.resumed_from = []  # the sequences each reconnection resumed after

    def summary(self):
        return self.stub.GetSummary(pb.GetSummaryRequest(), metadata=self.metadata, timeout=5)

    def spawn(self, request):
        return self.stub.Spawn(request, metadata=self.metadata, timeout=30).status

    def follow(self, merged, stop):
        """Puts (node, event) on `merged` until `stop` is set: a snapshot first, then from the
        last sequence received, across any number of daemon restarts."""
        while not stop.is_set():
            if self.last_sequence is None:
                request = pb.WatchAgentsRequest(include_snapshot=True)
            else:
                request = pb.WatchAgentsRequest(after_sequence=self.last_sequence)
                self.resumed_from.append(self.last_sequence)
            call = self.stub.WatchAgents(request, metadata=self.metadata)
            try:
                for event in call:
                    if stop.is_set():
                        call.cancel()
                        return
                    if event.kind != pb.EVENT_KIND_SNAPSHOT or self.last_sequence is None:
                        merged.put((self, event))
                    if self.last_sequence is None or event.sequence > self.last_sequence:
                        self.last_sequence = event.sequence
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.OUT_OF_RANGE:
                    self.last_sequence = None  # the node no longer holds our position
                elif error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                          grpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise
            stop.wait(0.2)  # the node is away: try again shortly


class Fleet:
    def __init__(self, nodes):
        self.nodes = nodes
        self.merged = queue.Queue()
        self.stop = threading.Event()
        self.threads = []

    def start_following(self):
        for node in self.nodes:
            thread = threading.Thread(target=node.follow, args=(self.merged, self.stop), daemon=True)
            thread.start()
            self.threads.append(thread)

    def place(self, request):
        """Spawns on the reachable node with the most free capacity; returns (node, status,
        the free capacity each node had)."""
        free = {}
        for node in self.nodes:
            try:
                free[node.name] = node.summary().free_capacity
            except grpc.RpcError:
                continue  # a node that is down takes nothing now
        fitting = [n for n in self.nodes if free.get(n.name, -1) >= request.load_percentage]
        if not fitting:
            raise RuntimeError(f"no node has {request.load_percentage} free: {free}")
        node = max(fitting, key=lambda n: (free[n.name], -self.nodes.index(n)))
        return node, node.spawn(request), free

    def close(self):
        self.stop.set()
        for node in self.nodes:
            node.channel.close()


def nodes_from(args):
    credentials = None
    if args.ca_cert:
        with open(args.ca_cert, "rb") as ca:
            credentials = grpc.ssl_channel_credentials(ca.read())
    targets = list(args.endpoint)
    if args.dns:
        host, port = args.dns.rsplit(":", 1)
        # A headless Service's name resolves to every ready pod's address.
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)})
        targets += [f"{address}:{port}" for address in addresses]
    if not targets:
        sys.exit("give --endpoint (repeatable) or --dns NAME:PORT")
    return [Node(target, target, credentials, args.token) for target in targets]


# ---- self-test: three daemons on this machine -----------------------------------------------

class Daemon:
    def __init__(self, binary, folder, capacity):
        self.binary, self.folder, self.capacity = binary, folder, capacity
        self.socket = os.path.join(folder, "agentd.sock")
        self.start()

    def start(self):
        log = open(os.path.join(self.folder, "agentd.log"), "ab")
        self.process = subprocess.Popen(
            [self.binary, "--data-dir", os.path.join(self.folder, "data"), "--socket", self.socket,
             "--capacity", str(self.capacity), "--sample-interval", "200ms"],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        line = self.process.stdout.readline()
        if b"ready" not in line:
            sys.exit(f"agentd in {self.folder} did not start: {line!r}")

    def crash(self):
        self.process.kill()
        self.process.wait()

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def self_test(binary):
    folder = tempfile.mkdtemp(prefix="agentd-fleet-")
    daemons = []
    for name, capacity in (("a", 100), ("b", 60), ("c", 30)):
        os.makedirs(os.path.join(folder, name))
        daemons.append(Daemon(binary, os.path.join(folder, name), capacity))
    nodes = [Node(name, f"unix://{d.socket}") for name, d in zip("abc", daemons)]
    fleet = Fleet(nodes)
    try:
        fleet.start_following()
        placed = {}
        for i in range(8):
            request = pb.SpawnRequest(agent_id=f"task-{i}", load_percentage=20,
                                      command=["sh", "-c", "sleep 3"])
            node, status, free = fleet.place(request)
            best = max(free.values())
            assert free[node.name] == best, f"task-{i} went to {node.name} with {free}"
            assert status.state == pb.AGENT_STATE_RUNNING, status
            placed[status.agent_id] = node.name
        print("placed:", placed)
        assert set(placed.values()) == {"a", "b", "c"}, placed

        # Node b's agentd dies and comes back; its agents run on under its keeper and the
        # new daemon adopts them. The coordinator resumes b from b's own last sequence.
        b = daemons[1]
        b.crash()
        b.start()

        ended, seen = {}, {node.name: set() for node in nodes}
        deadline = time.monotonic() + 60
        while len(ended) < len(placed):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                sys.exit(f"events never came for {set(placed) - set(ended)}; have {ended}")
            try:
                node, event = fleet.merged.get(timeout=remaining)
            except queue.Empty:
                continue
            if event.kind != pb.EVENT_KIND_SNAPSHOT:
                assert event.sequence not in seen[node.name], f"{node.name} sent {event.sequence} twice"
                seen[node.name].add(event.sequence)
            if event.kind in (pb.EVENT_KIND_EXITED, pb.EVENT_KIND_FAILED, pb.EVENT_KIND_LOST):
                ended[event.agent_id] = (node.name, pb.EventKind.Name(event.kind))
        print("ended:", ended)
        assert all(kind == "EVENT_KIND_EXITED" for _, kind in ended.values()), ended
        assert all(ended[agent][0] == placed[agent] for agent in placed), (ended, placed)
        assert nodes[1].resumed_from, "node b's stream was never resumed"
        print(f"node b resumed after sequence {nodes[1].resumed_from}")
        print("fleet ok")
    finally:
        fleet.close()
        for daemon in daemons:
            daemon.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", action="append", default=[],
                        help="unix:///path/agentd.sock or HOST:PORT; repeatable")
    parser.add_argument("--dns", help="NAME:PORT of a headless Service: every address it resolves to")
    parser.add_argument("--ca-cert", help="CA of the daemons' TLS certificates")
    parser.add_argument("--token", default=os.environ.get("AGENTD_TOKEN"))
    commands = parser.add_subparsers(dest="command", required=True)
    spawn = commands.add_parser("spawn", help="place agents, then follow them until they end")
    spawn.add_argument("--count", type=int, default=1)
    spawn.add_argument("--load", type=float, default=10)
    spawn.add_argument("program", nargs=argparse.REMAINDER)
    commands.add_parser("watch", help="print every node's events, merged")
    test = commands.add_parser("self-test", help="three daemons here, one restarted midway")
    test.add_argument("--agentd", required=True)
    args = parser.parse_args()

    if args.command == "self-test":
        self_test(args.agentd)
        return
    fleet = Fleet(nodes_from(args))
    fleet.start_following()
    try:
        if args.command == "spawn":
            program = [a for a in args.program if a != "--"]
            for i in range(args.count):
                request = pb.SpawnRequest(load_percentage=args.load, command=program)
                node, status, free = fleet.place(request)
                print(f"{status.agent_id} on {node.name} (free capacity was {free})", flush=True)
        while True:
            node, event = fleet.merged.get()
            if event.kind != pb.EVENT_KIND_HEALTH:
                print(f"{node.name} #{event.sequence} {pb.EventKind.Name(event.kind)} "
                      f"{event.agent_id} {event.message}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        fleet.close()


if __name__ == "__main__":
    main()
