"""agentd against supervisord and circus on the same work, in one run, from Python.

Each system is started fresh on a temporary folder and driven through its own API: agentd over
gRPC (grpcio, Unix socket), supervisord over XML-RPC (Unix socket), circus over ZeroMQ (ipc).
Every workload runs `--runs` times; the table shows the median with min and max, and the
agentd/peer ratio of the medians (below 1 means agentd is faster).

    cargo build --release
    python3 tests/bench/compare.py                 # creates a venv with the peers, ~5 min
    python3 tests/bench/compare.py --smoke         # agentd only, tiny N (what CI runs)

Workloads (issue 6): spawn latency with one request in flight and wall time for N with several
in flight; status latency and listing all N; exit visibility; stopping N agents that obey
SIGTERM and 100 that ignore it with a 2 s grace.
"""

import argparse
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
            stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: os.path.exists(self.socket), "agentd socket")
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


def measure_idle(system, n, seconds):
    """The supervisor's own RSS and CPU with `n` idle agents, over `seconds`."""
    names = [f"idle-{i}" for i in range(n)]
    with ThreadPoolExecutor(getattr(system, "in_flight", IN_FLIGHT)) as pool:
        list(pool.map(lambda name: system.spawn(name, sleeper_cmd()), names))
    pid = system.process.pid
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    cpu = (cpu_seconds(pid) - before) / (time.monotonic() - started) * 100
    rows = {f"idle {n}: RSS (MB)": rss_mb(pid), f"idle {n}: CPU (% of a core)": cpu}
    system.stop_all(names)
    system.clear(names)
    return rows


def measure(system, n, trials, stubborn, work):
    """One run of every workload; returns {row: value}."""
    rows = {}
    names = [f"sleep-{i}" for i in range(n)]
    latencies = []
    for name in names[: n // 2]:
        started = time.perf_counter()
        system.spawn(name, sleeper_cmd())
        latencies.append((time.perf_counter() - started) * 1000)
    rows["spawn p50 (ms), 1 in flight"] = pct(latencies, 50)
    rows["spawn p99 (ms), 1 in flight"] = pct(latencies, 99)
    started = time.perf_counter()
    with ThreadPoolExecutor(getattr(system, "in_flight", IN_FLIGHT)) as pool:
        list(pool.map(lambda name: system.spawn(name, sleeper_cmd()), names[n // 2:]))
    rows[f"spawn {n - n // 2} running, wall (s), {IN_FLIGHT} in flight*"] = time.perf_counter() - started

    status = []
    for i in range(trials * 20):
        started = time.perf_counter()
        system.status(names[i % n])
        status.append((time.perf_counter() - started) * 1000)
    rows["status p50 (ms)"] = pct(status, 50)
    rows["status p99 (ms)"] = pct(status, 99)
    started = time.perf_counter()
    listed = system.list_all()
    rows[f"list all {n} (ms)"] = (time.perf_counter() - started) * 1000
    assert listed >= n, f"{system.name} listed {listed} of {n}"

    started = time.perf_counter()
    system.stop_all(names)
    rows[f"stop {n} obeying SIGTERM (s)"] = time.perf_counter() - started
    system.clear(names)

    delays = []
    for i in range(trials):
        stamp = os.path.join(work, f"ts-{i}")
        seen = system.exit_visible(f"exit-{i}", stamp)
        with open(stamp) as f:
            delays.append((seen - int(f.read().strip())) / 1e6)
    rows["exit visible p50 (ms)"] = pct(delays, 50)
    rows["exit visible p99 (ms)"] = pct(delays, 99)
    system.clear([f"exit-{i}" for i in range(trials)])

    stubborn_names = [f"stubborn-{i}" for i in range(stubborn)]
    with ThreadPoolExecutor(getattr(system, "in_flight", IN_FLIGHT)) as pool:
        list(pool.map(lambda name: system.spawn(name, stubborn_cmd(), grace=2), stubborn_names))
    started = time.perf_counter()
    system.stop_all(stubborn_names)
    rows[f"stop {stubborn} ignoring SIGTERM, 2 s grace (s)"] = time.perf_counter() - started
    system.clear(stubborn_names)
    return rows


def programs(n, trials, stubborn, work):
    return (
        [(f"sleep-{i}", sleeper_cmd(), None) for i in range(n)]
        + [(f"exit-{i}", exit_cmd(os.path.join(work, f"ts-{i}")), None) for i in range(trials)]
        + [(f"stubborn-{i}", stubborn_cmd(), 2) for i in range(stubborn)]
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--agentd", default=os.path.join(ROOT, "target/release/agentd"))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--stubborn", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=int, default=1000, help="agents for the idle-cost rows")
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--smoke", action="store_true", help="agentd only, tiny N")
    parser.add_argument("--venv", help="a venv with the peers (created when missing)")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.trials, args.stubborn, args.runs = 6, 3, 2, 1
        args.idle, args.idle_seconds = 6, 1

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
        for run in range(args.runs):
            systems = [("agentd", lambda work: Agentd(work, args.agentd, stubs))]
            if venv_bin:
                systems += [
                    ("supervisord", lambda work: Supervisord(
                        work, venv_bin,
                        programs(args.n, args.trials, args.stubborn, work)
                        + [(f"idle-{i}", sleeper_cmd(), None) for i in range(args.idle)])),
                    ("circus", lambda work: Circus(work, venv_bin)),
                ]
            for name, start in systems:
                work = tempfile.mkdtemp(prefix=f"{name}-", dir=base)
                system = start(work)
                try:
                    rows = measure(system, args.n, args.trials, args.stubborn, work)
                    if args.idle:
                        rows.update(measure_idle(system, args.idle, args.idle_seconds))
                finally:
                    system.close()
                for row, value in rows.items():
                    results.setdefault(row, {}).setdefault(name, []).append(value)
                print(f"run {run + 1}/{args.runs}: {name} done", file=sys.stderr)

        names = ["agentd"] + (["supervisord", "circus"] if venv_bin else [])
        header = f"{'':48}" + "".join(f"{n:>24}" for n in names)
        if venv_bin:
            header += f"{'agentd/supervisord':>20}{'agentd/circus':>16}"
        print(f"median (min-max) over {args.runs} runs; N={args.n}, {args.trials} exit trials, "
              f"{args.stubborn} SIGTERM-ignoring agents")
        print(header)
        for row, by_system in results.items():
            line = f"{row:48}"
            for n in names:
                values = by_system.get(n, [])
                cell = f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"
                line += f"{cell:>24}"
            if venv_bin:
                mine = statistics.median(by_system["agentd"])
                for peer in ("supervisord", "circus"):
                    theirs = statistics.median(by_system[peer])
                    line += f"{mine / theirs if theirs else float('nan'):>20.2f}" if peer == "supervisord" \
                        else f"{mine / theirs if theirs else float('nan'):>16.2f}"
            print(line)
        if venv_bin:
            print("* circus: 1 in flight, the most its arbiter accepts")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
