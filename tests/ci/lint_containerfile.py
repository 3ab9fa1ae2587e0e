"""Lints deploy/Containerfile where no image can be built (this CI machine reaches no container
registry for the base images): Docker's own parser (the `dockerfile` package) must read it,
and the rules that matter here must hold.

Usage: lint_containerfile.py deploy/Containerfile
"""

import json
import os
import re
import sys

import dockerfile

path = sys.argv[1]
root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
commands = dockerfile.parse_file(path)
problems = []
stages = []  # names of the stages so far
final = []   # commands of the last stage

for command in commands:
    if command.cmd == "FROM":
        image = command.value[0]
        if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
            problems.append(f"line {command.start_line}: pin the base image's tag: {image}")
        stages.append(command.value[2] if len(command.value) > 2 else str(len(stages)))
        final = []
        continue
    final.append(command)
    if command.cmd == "COPY":
        sources = command.value[:-1]
        source_stage = [f.split("=", 1)[1] for f in command.flags if f.startswith("--from=")]
        if source_stage:
            if source_stage[0] not in stages[:-1]:
                problems.append(f"line {command.start_line}: no earlier stage `{source_stage[0]}`")
        else:
            for source in sources:
                if not os.path.exists(os.path.join(root, source)):
                    problems.append(f"line {command.start_line}: `{source}` is not in the repository")
    if command.cmd == "RUN" and "apt-get install" in command.value[0]:
        if "--no-install-recommends" not in command.value[0]:
            problems.append(f"line {command.start_line}: apt-get install without --no-install-recommends")
        if "rm -rf /var/lib/apt/lists" not in command.value[0]:
            problems.append(f"line {command.start_line}: apt lists left in the image")

if len(stages) < 2:
    problems.append("not a multi-stage build: the toolchain would ship in the image")
names = {c.cmd for c in final}
for needed in ("USER", "ENTRYPOINT"):
    if needed not in names:
        problems.append(f"the final stage has no {needed}")
for command in final:
    if command.cmd in ("ENTRYPOINT", "CMD") and not command.json:
        problems.append(f"line {command.start_line}: {command.cmd} in shell form (signals would not reach agentd)")
built = set(re.findall(r"--bin (\S+)", " ".join(c.value[0] for c in commands if c.cmd == "RUN")))
for command in final:
    if command.cmd == "COPY" and any(f.startswith("--from=") for f in command.flags):
        for source in command.value[:-1]:
            if os.path.basename(source) not in built:
                problems.append(f"line {command.start_line}: copies `{source}`, which no stage builds")

if problems:
    print("\n".join(f"{path}: {p}" for p in problems))
    sys.exit(1)
print(f"{path}: parsed by Docker's parser; {len(stages)} stages, final runs as "
      f"{next(c.value[0] for c in final if c.cmd == 'USER')}, entrypoint "
      f"{json.dumps(list(next(c.value for c in final if c.cmd == 'ENTRYPOINT')))}")
