"""agentd against supervisord and circus on the same work, in one run.

Each system is started fresh on a temporary folder and driven from Python through its own API:
agentd over gRPC (grpcio, Unix socket), supervisord over XML-RPC (Unix socket), circus over
ZeroMQ (ipc). agentd is also driven from Rust (`crates/server/benches/agentd.rs`, run through
cargo each run), which adds the "agentd (Rust)" column and the rows only it runs: 10,000 idle
agents and the watch fan-out. Every workload runs `--runs` times; the Markdown table shows the
median with min and max, and agentd (Python) / peer for each row.

    cargo build --release
    python3 tests/bench/compare.py                 # creates a venv with the peers, ~25 min
    python3 tests/bench/compare.py --smoke --cargo-profile dev --agentd target/debug/agentd

Workloads (BENCHMARKS.md): spawn latency with one request in flight; wall time to spawn N with
several in flight; status latency and listing all N; stopping N agents that obey SIGTERM and 100
that ignore it with a 2 s grace; exit visibility; the supervisor's RSS and CPU with idle agents.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEERS = ["supervisor==4.3.0", "circus==0.19.0"]
CLIENTS = ["grpcio==1.85.3", "grpcio-tools==1.85.1"]
IN_FLIGHT = 8


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def wait_until(condition, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)


def sleeper_cmd():
    return ["sleep", "3600"]


def stubborn_cmd():
    return ["sh", "-c", "trap '' TERM; exec sleep 3600"]


def exit_cmd(stamp):
    # The agent writes a nanosecond timestamp, then exits at once.
    return ["sh", "-c", f"date +%s%N > {stamp}"]


class Agentd:
    name = "agentd"

    def __init__(self, work, binary, stubs):
        sys.path.insert(0, stubs)
        import grpc
        from agentd.v1 import agentd_pb2, agentd_pb2_grpc

        self.pb, self.rpc, self.grpc = agentd_pb2, agentd_pb2_grpc, grpc
        self.socket = os.path.join(work, "agentd.sock")
        self.process = subprocess.Popen(
            [binary, "--data-dir", os.path.join(work, "data"), "--socket", self.socket,
             "--log-level", "warn", "--event-retention-count", "1000000"],
            stdout=subprocess.PIPE, text=True,
        )
        # Ready once it says so: the socket file exists a moment before it accepts.
        line = self.process.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"agentd did not start: {line!r}")
        self.local = threading.local()

    def stub(self):
        if not hasattr(self.local, "stub"):
            channel = self.grpc.insecure_channel(
                f"unix://{self.socket}", options=[("grpc.default_authority", "localhost")]
            )
            self.local.stub = self.rpc.AgentSupervisorStub(channel)
        return self.local.stub

    def spawn(self, name, argv, grace=None):
        request = self.pb.SpawnRequest(agent_id=name, command=argv)
        if grace is not None:
            request.stop_policy.first_grace.FromMilliseconds(int(grace * 1000))
            request.stop_policy.second_grace.FromMilliseconds(0)
        self.stub().Spawn(request)

    def status(self, name):
        return self.stub().Status(self.pb.StatusRequest(agent_id=name))

    def list_all(self):
        return len(self.stub().ListAgents(self.pb.ListAgentsRequest()).agents)

    def stop_all(self, names):
        self.stub().Cleanup(self.pb.CleanupRequest(agent_ids=names))

    def clear(self, names):
        for name in names:
            self.stub().Remove(self.pb.RemoveRequest(agent_id=name))

    def exit_visible(self, name, stamp):
        """Spawns an agent that stamps and exits; returns when the exit is on the watch stream."""
        stream = self.stub().WatchAgents(
            self.pb.WatchAgentsRequest(agent_ids=[name], kinds=[self.pb.EVENT_KIND_EXITED])
        )
        stream.initial_metadata()
        self.spawn(name, exit_cmd(stamp))
        next(iter(stream))
        seen = time.time_ns()
        stream.cancel()
        return seen

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=60)


class Supervisord:
    name = "supervisord"

    def __init__(self, work, venv_bin, programs):
        self.work = work
        self.socket = os.path.join(work, "supervisor.sock")
        config = os.path.join(work, "supervisord.conf")
        with open(config, "w") as f:
            f.write(
                f"[unix_http_server]\nfile={self.socket}\n"
                f"[supervisord]\nnodaemon=true\nlogfile={work}/supervisord.log\n"
                f"pidfile={work}/supervisord.pid\nchildlogdir={work}\nloglevel=warn\n"
                "[rpcinterface:supervisor]\n"
                "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
            )
            # supervisord cannot add a program at run time without a config file naming it:
            # every program the workloads use is declared up front, not started.
            for name, argv, grace in programs:
                command = " ".join(a if " " not in a else "'" + a.replace("'", "'\\''") + "'"
                                   for a in argv).replace("%", "%%")
                f.write(
                    f"[program:{name}]\ncommand={command}\nautostart=false\n"
                    f"autorestart=false\nstartsecs=0\nstopwaitsecs={grace or 10}\n"
                    "stdout_logfile=NONE\nstderr_logfile=NONE\n"
                )
        self.process = subprocess.Popen(
            [os.path.join(venv_bin, "supervisord"), "-c", config],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: os.path.exists(self.socket), "supervisord socket")
        self.local = threading.local()
        wait_until(self._ready, "supervisord ready")

    def _ready(self):
        try:
            return self.proxy().supervisor.getState()["statename"] == "RUNNING"
        except Exception:
            return False

    def proxy(self):
        if not hasattr(self.local, "proxy"):
            import xmlrpc.client
            from supervisor.xmlrpc import SupervisorTransport

            transport = SupervisorTransport(None, None, f"unix://{self.socket}")
            self.local.proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        return self.local.proxy

    def spawn(self, name, argv, grace=None):
        self.proxy().supervisor.startProcess(name, True)

    def status(self, name):
        return self.proxy().supervisor.getProcessInfo(name)

    def list_all(self):
        return len(self.proxy().supervisor.getAllProcessInfo())

    def stop_all(self, names):
        self.proxy().supervisor.stopAllProcesses(True)

    def clear(self, names):
        pass

    def exit_visible(self, name, stamp):
        """Polls every millisecond: supervisord has no exit stream short of an event listener."""
        self.spawn(name, None)
        proxy = self.proxy()
        while proxy.supervisor.getProcessInfo(name)["statename"] not in ("EXITED", "STOPPED"):
            time.sleep(0.001)
        return time.time_ns()

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=60)


class Circus:
    name = "circus"
    # The arbiter runs one command at a time and refuses the others: one in flight is the
    # fastest its API allows.
    in_flight = 1

    def __init__(self, work, venv_bin):
        self.endpoint = f"ipc://{work}/circus.sock"
        config = os.path.join(work, "circus.ini")
        with open(config, "w") as f:
            f.write(
                f"[circus]\nendpoint = {self.endpoint}\npubsub_endpoint = ipc://{work}/pubsub.sock\n"
                f"statsd = False\ncheck_delay = 5\nloglevel = WARNING\n"
            )
        self.process = subprocess.Popen(
            [os.path.join(venv_bin, "circusd"), config],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.local = threading.local()
        wait_until(self._ready, "circusd ready")

    def client(self):
        if not hasattr(self.local, "client"):
            from circus.client import CircusClient

            self.local.client = CircusClient(endpoint=self.endpoint, timeout=60)
        return self.local.client

    def _ready(self):
        try:
            return self.client().call({"command": "list", "properties": {}})["status"] == "ok"
        except Exception:
            return False

    def call(self, command, **properties):
        while True:
            answer = self.client().call({"command": command, "properties": properties})
            # "status" is "error" on failure; otherwise "ok", or a watcher's state.
            if answer.get("status") != "error":
                return answer
            # The arbiter runs one command at a time and refuses the rest (errno 5): with
            # several in flight, circus can only be retried.
            if answer.get("errno") != 5:
                raise RuntimeError(f"circus {command}: {answer}")
            time.sleep(0.001)

    def spawn(self, name, argv, grace=None):
        options = {"respawn": False, "graceful_timeout": grace or 10}
        self.call("add", name=name, cmd=argv[0], args=argv[1:], start=True, options=options)

    def status(self, name):
        return self.call("status", name=name)

    def list_all(self):
        # `status` without a name is every watcher's state (`list` is only their names).
        return len(self.call("status")["statuses"])

    def stop_all(self, names):
        self.call("stop", waiting=True)

    def clear(self, names):
        for name in names:
            self.call("rm", name=name, waiting=True)

    def exit_visible(self, name, stamp):
        """Polls every millisecond for the watcher to have no process left."""
        self.spawn(name, exit_cmd(stamp))
        while self.call("list", name=name)["pids"]:
            time.sleep(0.001)
        return time.time_ns()

    def close(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def cpu_seconds(pid):
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def spawn_parallel(system, names, argv, grace=None):
    with ThreadPoolExecutor(getattr(system, "in_flight", IN_FLIGHT)) as pool:
        list(pool.map(lambda name: system.spawn(name, argv, grace=grace), names))


def measure_idle(system, n, seconds):
    """The supervisor's own RSS and CPU with `n` idle agents, over `seconds`."""
    names = [f"idle-{i}" for i in range(n)]
    spawn_parallel(system, names, sleeper_cmd())
    pid = system.process.pid
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    cpu = (cpu_seconds(pid) - before) / (time.monotonic() - started) * 100
    rows = {f"{n} idle agents: supervisor RSS (MB)": rss_mb(pid),
            f"{n} idle agents: supervisor CPU (% of a core)": cpu}
    system.stop_all(names)
    system.clear(names)
    return rows


def measure(system, args, work):
    """One run of every workload but the idle ones; returns {row: value}. Row names are the
    ones the Rust client (crates/server/benches/agentd.rs) prints."""
    rows = {}
    names = [f"lat-{i}" for i in range(args.latency_spawns)]
    latencies = []
    for name in names:
        started = time.perf_counter()
        system.spawn(name, sleeper_cmd())
        latencies.append((time.perf_counter() - started) * 1000)
    rows["spawn p50 (ms), 1 in flight"] = pct(latencies, 50)
    rows["spawn p99 (ms), 1 in flight"] = pct(latencies, 99)
    system.stop_all(names)
    system.clear(names)

    for n in args.n:
        names = [f"sleep-{i}" for i in range(n)]
        started = time.perf_counter()
        spawn_parallel(system, names, sleeper_cmd())
        rows[f"spawn {n} until running, wall (s), {IN_FLIGHT} in flight"] = \
            time.perf_counter() - started
        status = []
        for i in range(args.status_calls):
            started = time.perf_counter()
            system.status(names[i % n])
            status.append((time.perf_counter() - started) * 1000)
        rows[f"status p50 (ms), {n} agents"] = pct(status, 50)
        rows[f"status p99 (ms), {n} agents"] = pct(status, 99)
        started = time.perf_counter()
        listed = system.list_all()
        rows[f"list all {n} with status (ms)"] = (time.perf_counter() - started) * 1000
        assert listed >= n, f"{system.name} listed {listed} of {n}"
        started = time.perf_counter()
        system.stop_all(names)
        rows[f"stop {n} obeying SIGTERM (s)"] = time.perf_counter() - started
        system.clear(names)

    delays = []
    for i in range(args.trials):
        stamp = os.path.join(work, f"ts-{i}")
        seen = system.exit_visible(f"exit-{i}", stamp)
        with open(stamp) as f:
            delays.append((seen - int(f.read().strip())) / 1e6)
    rows["exit visible p50 (ms)"] = pct(delays, 50)
    rows["exit visible p99 (ms)"] = pct(delays, 99)
    system.clear([f"exit-{i}" for i in range(args.trials)])

    stubborn_names = [f"stubborn-{i}" for i in range(args.stubborn)]
    spawn_parallel(system, stubborn_names, stubborn_cmd(), grace=2)
    started = time.perf_counter()
    system.stop_all(stubborn_names)
    rows[f"stop {args.stubborn} ignoring SIGTERM, 2 s grace (s)"] = time.perf_counter() - started
    system.clear(stubborn_names)
    return rows


def programs(args, work):
    """Everything supervisord must know up front."""
    return (
        [(f"lat-{i}", sleeper_cmd(), None) for i in range(args.latency_spawns)]
        + [(f"sleep-{i}", sleeper_cmd(), None) for i in range(max(args.n))]
        + [(f"exit-{i}", exit_cmd(os.path.join(work, f"ts-{i}")), None)
           for i in range(args.trials)]
        + [(f"stubborn-{i}", stubborn_cmd(), 2) for i in range(args.stubborn)]
        + [(f"idle-{i}", sleeper_cmd(), None) for i in range(peer_idle(args))]
    )


def peer_idle(args):
    return max([n for n in args.idle if n <= args.peer_idle_max], default=0)


def rust_rows(args):
    """The same workloads from the Rust client: one run of its benchmark, as {row: value}."""
    command = [
        "cargo", "bench", "--quiet", "--profile", args.cargo_profile, "-p", "agentd-server",
        "--bench", "agentd", "--", "--json", "--n", ",".join(map(str, args.n)),
        "--latency-spawns", str(args.latency_spawns), "--status-calls", str(args.status_calls),
        "--trials", str(args.trials), "--stubborn", str(args.stubborn),
        "--idle", ",".join(map(str, args.idle)), "--idle-seconds", str(args.idle_seconds),
        "--subscribers", str(args.subscribers), "--fanout", str(args.fanout),
    ]
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cell(values):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def print_table(results, columns, peers, args):
    """A Markdown table: median (min-max) per system, then agentd (Python) / peer."""
    print(f"median (min-max) over {args.runs} runs; the ratios compare agentd driven from "
          "Python with each peer driven from Python (below 1: agentd is faster or lighter)\n")
    header = ["workload"] + columns + [f"agentd/{peer}" for peer in peers]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row, by_system in results.items():
        cells = [row] + [cell(by_system.get(column, [])) for column in columns]
        mine = by_system.get("agentd (Python)")
        for peer in peers:
            theirs = by_system.get(peer)
            ratio = "-"
            if mine and theirs and statistics.median(theirs):
                ratio = f"{statistics.median(mine) / statistics.median(theirs):.2f}"
            cells.append(ratio)
        print("| " + " | ".join(cells) + " |")
    if peers:
        print(f"\ncircus runs spawns 1 in flight, the most its arbiter accepts; the others "
              f"{IN_FLIGHT}.")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--agentd", default=os.path.join(ROOT, "target/release/agentd"))
    ints = lambda text: [int(n) for n in text.split(",")]  # noqa: E731
    parser.add_argument("--n", type=ints, default=[200, 1000],
                        help="agent counts for the spawn/status/list/stop rows")
    parser.add_argument("--latency-spawns", type=int, default=200)
    parser.add_argument("--status-calls", type=int, default=5000)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--stubborn", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=ints, default=[1000, 10000],
                        help="agent counts for the idle-cost rows")
    parser.add_argument("--peer-idle-max", type=int, default=1000,
                        help="largest idle count run from Python (the peers and agentd)")
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--fanout", type=int, default=1000)
    parser.add_argument("--no-rust", action="store_true", help="skip the Rust-client column")
    parser.add_argument("--cargo-profile", default="bench",
                        help="cargo profile of the Rust client and its agentd")
    parser.add_argument("--smoke", action="store_true", help="agentd only, tiny N")
    parser.add_argument("--venv", help="a venv with the peers (created when missing)")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.latency_spawns, args.status_calls = [6], 6, 20
        args.trials, args.stubborn, args.runs = 3, 2, 1
        args.idle, args.peer_idle_max, args.idle_seconds = [6], 6, 1
        args.subscribers, args.fanout = 3, 6

    base = tempfile.mkdtemp(prefix="agentd-bench-")
    try:
        stubs = os.path.join(base, "stubs")
        os.makedirs(stubs)
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", "-I", os.path.join(ROOT, "proto"),
             f"--python_out={stubs}", f"--grpc_python_out={stubs}", "agentd/v1/agentd.proto"],
            check=True,
        )
        venv_bin = None
        if not args.smoke:
            venv = args.venv or os.path.join(base, "venv")
            venv_bin = os.path.join(venv, "bin")
            if not os.path.exists(os.path.join(venv_bin, "supervisord")):
                subprocess.run([sys.executable, "-m", "venv", venv], check=True)
                subprocess.run([os.path.join(venv_bin, "pip"), "install", "--quiet", *PEERS],
                               check=True)
            # The peers' client libraries live in the venv.
            site = subprocess.run(
                [os.path.join(venv_bin, "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                check=True, capture_output=True, text=True,
            ).stdout.strip()
            sys.path.append(site)

        results = {}

        def record(column, rows):
            for row, value in rows.items():
                results.setdefault(row, {}).setdefault(column, []).append(value)

        peers = ["supervisord", "circus"] if venv_bin else []
        for run in range(args.runs):
            systems = [("agentd (Python)", lambda work: Agentd(work, args.agentd, stubs))]
            if venv_bin:
                systems += [
                    ("supervisord", lambda work: Supervisord(work, venv_bin, programs(args, work))),
                    ("circus", lambda work: Circus(work, venv_bin)),
                ]
            for name, start in systems:
                work = tempfile.mkdtemp(prefix=name.split()[0] + "-", dir=base)
                system = start(work)
                try:
                    rows = measure(system, args, work)
                    for n in args.idle:
                        if n <= args.peer_idle_max:
                            rows.update(measure_idle(system, n, args.idle_seconds))
                finally:
                    system.close()
                record(name, rows)
                print(f"run {run + 1}/{args.runs}: {name} done", file=sys.stderr)
            if not args.no_rust:
                # Rows only the Rust client runs (10k idle, fan-out) come last.
                record("agentd (Rust)", rust_rows(args))
                print(f"run {run + 1}/{args.runs}: agentd (Rust) done", file=sys.stderr)

        columns = ([] if args.no_rust else ["agentd (Rust)"]) + ["agentd (Python)"] + peers
        print_table(results, columns, peers, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
