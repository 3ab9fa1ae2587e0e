#!/usr/bin/env python3
"""An agent that ignores SIGTERM, so a stop has to go down the whole ladder.

    agentctl spawn --id stubborn --grace 1s --second-grace 1s -- python3 examples/stubborn.py
    agentctl stop stubborn    # SIGTERM, 1 s, SIGTERM, 1 s, SIGKILL: outcome `killed`

Each SIGTERM it receives is printed to its output (`agentctl logs stubborn`).
"""

import signal
import time


def ignore(number, _frame):
    print(f"got {signal.Signals(number).name}, carrying on", flush=True)


def main():
    signal.signal(signal.SIGTERM, ignore)
    print("working, and not stopping for SIGTERM", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
