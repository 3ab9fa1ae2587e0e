#!/usr/bin/env python3
"""An agent that forks worker processes: agentd samples the whole tree (`processes` in
`agentctl status`) and a stop takes every worker with the agent, even one that left its
process group.

    agentctl spawn --id pool -- python3 examples/workers.py --workers 3
    agentctl status pool      # processes: 4
    agentctl stop pool        # the agent and its 3 workers, in one ladder
"""

import argparse
import os
import signal
import time


def work(number):
    if number == 0:
        os.setsid()  # a worker that leaves the group is still the agent's (its cgroup)
    print(f"worker {number} (pid {os.getpid()}) started", flush=True)
    while True:
        time.sleep(3600)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()
    workers = []
    for number in range(args.workers):
        pid = os.fork()
        if pid == 0:
            work(number)
        workers.append(pid)

    def stop(_number, _frame):
        print("stopping: ending the workers", flush=True)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"{len(workers)} workers running", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
