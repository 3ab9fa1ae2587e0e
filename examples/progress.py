#!/usr/bin/env python3
"""An agent that works through steps and reports its progress to agentd.

    agentctl spawn --id researcher-1 -- python3 examples/progress.py --steps 20

Each step it writes its status file (AGENTD_STATUS_FILE: {"progress": 0-100, "message": ...})
the safe way, a temporary file then a rename, which is also its heartbeat. It prints a line
per step (`agentctl logs`), reads its prompt (AGENTD_PROMPT_FILE), and ends with 0.
"""

import argparse
import json
import os
import time


def report(progress, message):
    path = os.environ.get("AGENTD_STATUS_FILE")
    if not path:
        return
    temporary = path + ".tmp"
    with open(temporary, "w") as file:
        json.dump({"progress": progress, "message": message}, file)
    os.replace(temporary, path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-seconds", type=float, default=0.5)
    args = parser.parse_args()
    prompt = ""
    if os.environ.get("AGENTD_PROMPT_FILE"):
        with open(os.environ["AGENTD_PROMPT_FILE"]) as file:
            prompt = file.read().strip()
    print(f"{os.environ.get('AGENTD_AGENT_ID', 'agent')} working on: {prompt or '(no prompt)'}",
          flush=True)
    for step in range(1, args.steps + 1):
        time.sleep(args.step_seconds)
        progress = step * 100 // args.steps
        report(progress, f"step {step} of {args.steps}")
        print(f"step {step}/{args.steps} done", flush=True)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
