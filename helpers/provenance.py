"""Where a figure came from: the command, the date, the commit and the machine, recorded next to the results a
command writes, so that ``make report`` can print them under every table it generates.

    python -m helpers.provenance stamp results/smoke "make smoke"     # results/smoke/provenance.json
    python -m helpers.provenance record results/benchmarks/bench-curation -- python benchmarks/bench_curation.py
      # runs the command, shows its output, keeps it in bench-curation.txt and its stamp in bench-curation.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from helpers import config
from helpers.storage import write_file_atomically

STAMP = "provenance.json"


def commit() -> str:
    """This checkout's commit (short), ``+changes`` when files differ from it; ``unknown`` outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=config.REPO_ROOT, capture_output=True, text=True,
                              encoding="utf-8", check=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """The machine in words: system, CPU model and cores, and each CUDA GPU by name."""
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    words = f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores"
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, encoding="utf-8", timeout=30, check=True).stdout.split("\n")
        words += "".join(f", {name.strip()}" for name in gpus if name.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # no NVIDIA GPU (or no driver): the CPU is the machine
    return words


def stamp(command: str) -> dict[str, str]:
    """The provenance of results a command writes now."""
    return {"command": command, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit(), "machine": machine()}


def write_stamp(path: Path, command: str) -> Path:
    """``stamp(command)`` as JSON at ``path`` (a folder gets ``provenance.json``)."""
    path = path / STAMP if path.suffix != ".json" else path
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(stamp(command), indent=2)
    write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def read_stamp(path: Path) -> dict[str, str] | None:
    """The provenance recorded at ``path`` (a folder: its ``provenance.json``), or None."""
    path = path / STAMP if path.is_dir() else path
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def line(recorded: dict[str, str] | None) -> str:
    """The provenance as a sentence for a page, or that it is unknown."""
    if not recorded:
        return "The command that made it was not recorded."
    return (f"Made by `{recorded['command']}`, {recorded['date']}, commit {recorded['commit']}, on "
            f"{recorded['machine']}.")


def record(base: Path, command: list[str]) -> int:
    """Run ``command``, showing its output as it comes, and keep that output (``base``.txt) with its stamp
    (``base``.json) when it succeeds; its exit status."""
    base.parent.mkdir(parents=True, exist_ok=True)
    started = stamp(shlex.join(command))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, encoding="utf-8")
    lines = []
    for output in process.stdout:
        sys.stdout.write(output)
        lines.append(output)
    if process.wait() == 0:
        text = "".join(lines)
        write_file_atomically(base.with_suffix(".txt"), lambda tmp: tmp.write_text(text, encoding="utf-8"))
        write_file_atomically(base.with_suffix(".json"),
                              lambda tmp: tmp.write_text(json.dumps(started, indent=2), encoding="utf-8"))
    return process.returncode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Record where results come from.")
    commands = parser.add_subparsers(dest="what", required=True)
    stamp_parser = commands.add_parser("stamp", help="write FOLDER/provenance.json for COMMAND")
    stamp_parser.add_argument("folder", type=Path)
    stamp_parser.add_argument("command")
    record_parser = commands.add_parser("record", help="run a command and keep its output and stamp")
    record_parser.add_argument("base", type=Path, help="BASE.txt (the output) and BASE.json (the stamp)")
    record_parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    if args.what == "stamp":
        print(f"Provenance: {write_stamp(args.folder, args.command)}")
    else:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        sys.exit(record(args.base, command))


if __name__ == "__main__":
    main()
