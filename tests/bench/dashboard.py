"""What open dashboards cost agentd, and whether the page keeps up.

Starts agentd (release build) with N idle agents sampled every second, measures agentd's own
CPU time (utime + stime of the daemon, all threads) over a window with no dashboard, then with
K dashboards open in one headless Chromium (Debian's, through Playwright), each showing all N
agents. In the first page, a PerformanceObserver for `longtask` entries is installed before
the page's own script runs and read back over the DevTools protocol at the end: the longest
main-thread task and how many passed 50 ms while the agents update every second.

    cargo build --release --bin agentd
    python3 tests/bench/dashboard.py --agentd target/release/agentd --agents 1000 --pages 10

With `--top`, instead of pages, `agentctl top` runs in a tmux window of 160x40 for the window:
agentd's CPU beside it, and agentctl's own.

    cargo build --release --bin agentd --bin agentctl
    python3 tests/bench/dashboard.py --agents 10000 --top target/release/agentctl
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from playwright.sync_api import sync_playwright

TICKS = os.sysconf("SC_CLK_TCK")

LONG_TASKS = """
window.__longTasks = [];
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) window.__longTasks.push(entry.duration);
}).observe({ type: "longtask", buffered: true });
"""


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_percent(pid, seconds):
    start, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)  # the measurement window itself
    return 100 * (cpu_seconds(pid) - start) / (time.monotonic() - t0)


def post(base, path, body):
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def stand_ins(base, pid, args):
    streams = [subprocess.Popen(["curl", "-sN", "-o", "/dev/null", f"{base}/v1/events?snapshot=true&view={args.view}"])
               for _ in range(args.pages)]
    summaries = subprocess.Popen(
        ["sh", "-c", f"while :; do for i in $(seq {args.pages}); do curl -s -o /dev/null {base}/v1/summary; "
                     "done; sleep 2; done"])
    try:
        time.sleep(5)  # the snapshots are sent
        return cpu_percent(pid, args.window)
    finally:
        for process in streams + [summaries]:
            process.kill()
            process.wait()


def top(socket, pid, args):
    session = f"agentd-bench-top-{os.getpid()}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "40",
                    args.top, "--socket", socket, "top"], check=True)
    try:
        pane = int(subprocess.run(["tmux", "list-panes", "-t", session, "-F", "#{pane_pid}"],
                                  check=True, capture_output=True, text=True).stdout.split()[0])
        # The pane's shell may have run agentctl as its child rather than exec it.
        children = subprocess.run(["pgrep", "-P", str(pane)], capture_output=True, text=True).stdout.split()
        client = int(children[0]) if children else pane
        time.sleep(5)  # the first list of every agent is read
        own = cpu_seconds(client)
        watched = cpu_percent(pid, args.window)
        return watched, 100 * (cpu_seconds(client) - own) / args.window
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--agentd", default="target/release/agentd")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--window", type=float, default=30.0, help="seconds per measurement")
    parser.add_argument("--view", default="figures", choices=["figures", "full"],
                        help="what the curl stand-ins ask of /v1/events (the page asks for figures)")
    parser.add_argument("--curl", action="store_true",
                        help="instead of browsers, the requests each page makes (the event stream, "
                             "the summary every 2 s) from curl: agentd's cost without 2 cores "
                             "shared with ten renderers")
    parser.add_argument("--top", metavar="AGENTCTL",
                        help="instead of pages, this agentctl's `top` in a tmux window")
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="agentd-bench-dashboard-")
    log = open(os.path.join(data_dir, "agentd.log"), "ab")
    daemon = subprocess.Popen(
        [args.agentd, "--data-dir", data_dir, "--socket", os.path.join(data_dir, "agentd.sock"),
         "--http-listen", "127.0.0.1:0", "--insecure-listen", "--sample-interval", "1s",
         "--capacity", str(args.agents * 10)],
        stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    base = None
    for line in daemon.stdout:
        found = re.search(rb"HTTP API on http://(\S+)", line)
        if found:
            base = "http://" + found.group(1).decode().rstrip(",")
            break
    if base is None:
        sys.exit("agentd did not start; see " + log.name)
    try:
        # Every tenth agent leads the nine after it: parents first, so the page has a tree.
        def spawn(i):
            parent = f"agent-{i // 10 * 10:04}" if i % 10 else ""
            post(base, "/v1/agents", {"agentId": f"agent-{i:04}", "command": ["sleep", "3600"],
                                      "parentAgentId": parent})
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(spawn, range(0, args.agents, 10)))
            list(pool.map(spawn, [i for i in range(args.agents) if i % 10]))
        time.sleep(3)  # let the spawn burst's samples settle before measuring
        idle = cpu_percent(daemon.pid, args.window)
        print(f"agentd CPU, {args.agents} agents, no dashboard: {idle:.2f}% of a core")

        if args.top:
            watched, own = top(os.path.join(data_dir, "agentd.sock"), daemon.pid, args)
            print(f"agentd CPU, {args.agents} agents, agentctl top: {watched:.2f}% of a core "
                  f"(+{watched - idle:.2f}); agentctl top itself {own:.2f}%")
            return
        if args.curl:
            watched = stand_ins(base, daemon.pid, args)
            print(f"agentd CPU, {args.agents} agents, {args.pages} curl stand-ins: {watched:.2f}% of a core "
                  f"(+{watched - idle:.2f})")
            return
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                                 args=["--no-sandbox"])
            pages = []
            for i in range(args.pages):
                page = browser.new_page(viewport={"width": 1500, "height": 900}, bypass_csp=True)
                if i == 0:
                    page.add_init_script(LONG_TASKS)
                page.goto(base + "/")
                pages.append(page)
            for page in pages:
                page.wait_for_function(f"document.getElementById('shown').textContent.startsWith('{args.agents} agents')",
                                       timeout=120_000)
            pages[0].evaluate("window.__longTasks = []")  # the page load is not the steady state
            watched = cpu_percent(daemon.pid, args.window)
            long_tasks = pages[0].evaluate("window.__longTasks")
            health = pages[0].evaluate("document.querySelectorAll('#visible .row:not([hidden])').length")
            browser.close()
        print(f"agentd CPU, {args.agents} agents, {args.pages} dashboards: {watched:.2f}% of a core "
              f"(+{watched - idle:.2f})")
        # A long task is, by definition, one over 50 ms.
        print(f"page: {len(long_tasks)} long tasks (over 50 ms) in {args.window:.0f} s, "
              f"longest {max(long_tasks, default=0):.0f} ms; {health} rows drawn of {args.agents}")
    finally:
        post(base, "/v1/agents:stop", {"all": True, "force": True})
        daemon.terminate()
        daemon.wait(timeout=60)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
