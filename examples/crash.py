#!/usr/bin/env python3
"""An agent that fails: it works for a moment, then exits with code 3 (or --code).

    agentctl spawn --id flaky --restart on-failure --max-restarts 2 -- python3 examples/crash.py

agentd records each run's exit code and `end_reason`, restarts it with a backoff while the
policy allows, then leaves it FAILED.
"""

import argparse
import os
import sys
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--code", type=int, default=3)
    parser.add_argument("--after", type=float, default=0.2, help="seconds before failing")
    args = parser.parse_args()
    time.sleep(args.after)
    print(f"{os.environ.get('AGENTD_AGENT_ID', 'agent')}: giving up, exit {args.code}",
          file=sys.stderr, flush=True)
    sys.exit(args.code)


if __name__ == "__main__":
    main()
