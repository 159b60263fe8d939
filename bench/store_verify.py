"""Benchmark: what checking artifacts against their manifests costs, per object of the demo's store and in
seconds per GB, against the demo run it protects.

    make demo                                     # once: the store to measure (.qlora/artifacts)
    .venv/bin/python bench/store_verify.py --run-seconds 474   # the demo's wall time, from its run summary

Each object is hashed twice, cold (its pages dropped from the page cache with posix_fadvise, as a fresh worker
reads it) and warm, by the store's own check (`ArtifactStore.check`, what `store verify` and a stage reading an
object run). A run hashes each object it reads once at most and nothing it sealed itself (the run summary's
last line says what it hashed), so hashing the whole store is the bound: "share of the run" divides that by
--run-seconds. Target (issue 25): under 5% of the run. Run it on an idle machine: the numbers are wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_SHARE = 0.05


def drop_from_page_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped
            finally:
                os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pipeline config YAML (default: the embedded default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--run-seconds", type=float, help="the demo run's wall seconds (its run summary's total)")
    args = parser.parse_args()

    from pipeline_config import load_config
    from tasks.lib.artifacts import MANIFEST, ArtifactStore

    store = ArtifactStore(load_config(args.config, args.set).artifacts.root)
    if not store.is_local:
        raise SystemExit("measure a local store (the demo's); a remote one adds the download")
    rows, total_bytes, total = [], 0, {"cold": 0.0, "warm": 0.0}
    for digest in store.objects():
        folder = Path(store.base) / "objects" / digest
        kind = json.loads((folder / MANIFEST).read_text())["kind"]
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        seconds = {}
        for mode in ("cold", "warm"):
            if mode == "cold":
                drop_from_page_cache(folder)
            start = time.perf_counter()
            problems = store.check(digest)
            seconds[mode] = time.perf_counter() - start
            total[mode] += seconds[mode]
        rows.append((kind, digest[:12], size, seconds, "ok" if not problems else problems[0]))
        total_bytes += size

    print(f"{'object':<20} {'digest':<12} {'MB':>9} {'cold s':>8} {'warm s':>8}  check")
    for kind, short, size, seconds, status in sorted(rows, key=lambda r: -r[2]):
        print(f"{kind:<20} {short:<12} {size / 1e6:>9.1f} {seconds['cold']:>8.3f} {seconds['warm']:>8.3f}  {status}")
    gigabytes = total_bytes / 1e9
    print(f"{'all':<20} {'':<12} {total_bytes / 1e6:>9.1f} {total['cold']:>8.3f} {total['warm']:>8.3f}")
    print(f"seconds per GB: {total['cold'] / gigabytes:.2f} cold, {total['warm'] / gigabytes:.2f} warm")
    if args.run_seconds:
        share = total["cold"] / args.run_seconds
        print(f"whole store, cold, against a {args.run_seconds:.0f} s run: {100 * share:.2f}% "
              f"(target < {100 * TARGET_SHARE:.0f}%: {'met' if share < TARGET_SHARE else 'NOT met'})")


if __name__ == "__main__":
    main()
