"""The full profile's curation at scale, over a hub-layout replica of the shipped sample.

Runs ``helpers.curate.curate`` with the ``full`` profile's settings (every core, the offline
Llama 3.1 tokenizer) on a replica written by ``benchmarks/hub_replica.py`` (built first if
missing): the 179 real sample records replicated to ``--rows`` rows, so it measures speed,
memory and disk at scale, not data quality. Prints the wall time, records/s of each stage,
the peak resident memory of the whole process tree (sampled, children included) and the
peak temporary disk (the stage parts and any datasets cache written).
Run: ``python benchmarks/bench_full_curation.py --rows 4448181``.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import psutil
from hub_replica import write_replica

from helpers import config
from helpers.curate import curate

SAMPLE_SECONDS = 0.5


def cpu_seconds() -> float:
    """CPU seconds used by this process and its finished children (the curation's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (every process, every core)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 if missing; files vanishing meanwhile are skipped)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


class Peaks(threading.Thread):
    """Samples the resident memory of this process and all its children, and the size of folders."""

    def __init__(self, folders: list[Path]):
        super().__init__(daemon=True)
        self.folders, self.rss, self.disk, self.done = folders, 0, 0, threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.done.wait(SAMPLE_SECONDS):
            rss = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    rss += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.rss = max(self.rss, rss)
            self.disk = max(self.disk, sum(folder_bytes(folder) for folder in self.folders))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--replica", type=Path, default=None, help="default: <tmp>/book-pricer-replica-<rows>")
    parser.add_argument("--work", type=Path, default=None, help="data folder for the run (default: a new temp one)")
    parser.add_argument("--num-proc", type=int, default=None, help="default: the full profile's (every core)")
    args = parser.parse_args()
    replica = args.replica or Path(tempfile.gettempdir()) / f"book-pricer-replica-{args.rows}"
    if not (replica / "README.md").exists():
        started = time.perf_counter()
        write_replica(args.rows, replica)
        print(f"replica built in {time.perf_counter() - started:.1f} s: {replica}")
    download = folder_bytes(replica)
    config.DATA_DIR = args.work or Path(tempfile.mkdtemp(prefix="bench-full-curation-"))  # not the course's data/
    overrides = {"data_source": str(replica)} | ({"num_proc": args.num_proc} if args.num_proc else {})
    profile = config.get_profile("full", **overrides)
    hf_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path.home() / ".cache" / "huggingface" / "datasets"))
    cache_before = folder_bytes(hf_cache)
    peaks = Peaks([profile.curated_dir / ".stage", hf_cache])
    peaks.start()
    machine_before, cpu_before = busy_seconds(), cpu_seconds()
    started = time.perf_counter()
    curation = curate(profile)
    wall = time.perf_counter() - started
    cpu, machine = cpu_seconds() - cpu_before, busy_seconds() - machine_before
    peaks.done.set()
    peaks.join()
    raw = curation.manifest["funnel"][0]["items"]
    seconds = curation.manifest["seconds"]
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"Scale test on a replica of the {raw:,}-row hub layout ({replica}): the 179 real sample records "
          f"replicated, not new data.")
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM; "
          f"num_proc {profile.num_proc}, batch {profile.batch_size}")
    print(f"wall time                 : {wall:8.1f} s ({raw / wall:,.0f} records/s overall)")
    print(f"CPU time of the curation  : {cpu:8.1f} s ({raw / cpu:,.0f} records per CPU second); other processes "
          f"kept the machine busy {max(machine - cpu, 0) / wall:.2f} cores on average during the run")
    print(f"stage 1, curate shards    : {seconds['shards']:8.1f} s ({raw / seconds['shards']:,.0f} records/s)")
    kept = next(row["items"] for row in curation.manifest["funnel"] if row["stage"] == "drop: too few tokens")
    print(f"stage 2, dedup/balance/split: {seconds['dedup, balance, split']:6.1f} s "
          f"({kept / max(seconds['dedup, balance, split'], 1e-9):,.0f} kept items/s)")
    largest = max(self_kib, child_kib) * 1024  # ru_maxrss is in KiB on Linux
    print(f"peak resident memory      : {max(peaks.rss, largest) / 1e9:8.2f} GB (the larger of: the process tree "
          f"sampled every {SAMPLE_SECONDS} s, {peaks.rss / 1e9:.2f} GB; the largest single process, "
          f"{largest / 1e9:.2f} GB)")
    print(f"peak temporary disk       : {peaks.disk / 1e9:8.2f} GB (stage parts + datasets cache; datasets cache "
          f"grew {(folder_bytes(hf_cache) - cache_before) / 1e9:.2f} GB)")
    print(f"download (replica parquet): {download / 1e9:8.2f} GB")
    print(curation.funnel.to_string(index=False))


if __name__ == "__main__":
    main()
