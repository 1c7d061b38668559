"""Filter throughput on the built-in corpus (one process, one core): each filter alone, then
the default pipeline. Prints a table; the target is >= 5 MB of text per minute per core.

    python benchmarks/data_filters.py [--repeat 1]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

from retention.data import builtin
from retention.data.filters import DEFAULT_FILTERS, DEFAULT_OPTIONS, build_pipeline, make_filter


def bench(label, fn, texts, n_bytes):
    """Wall and CPU time: the CPU figure is the per-core rate even on a busy machine."""
    start, cpu = time.perf_counter(), time.process_time()
    kept = fn(texts)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    mb = n_bytes / 1e6
    print(f"{label:<22} {len(texts):>7} {kept:>7} {mb:>8.2f} {seconds:>8.2f} {cpu:>8.2f} "
          f"{mb / seconds * 60:>10.1f} {mb / cpu * 60:>12.1f}")
    return mb / cpu * 60


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=1, help="passes over the corpus")
    args = parser.parse_args()
    texts = [d["text"] for d in builtin.load_documents(None)] * args.repeat
    n_bytes = sum(len(t.encode()) for t in texts)
    print(f"built-in corpus x{args.repeat}: {len(texts)} documents, {n_bytes / 1e6:.2f} MB; "
          f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, one used")
    print(f"{'filter':<22} {'docs':>7} {'kept':>7} {'MB':>8} {'wall s':>8} {'cpu s':>8} "
          f"{'MB/min':>10} {'MB/cpu-min':>12}")

    def single(name):
        def fn(ts):
            f = make_filter(name, **DEFAULT_OPTIONS.get(name, {}))
            return sum(1 for t in ts if f(t).keep)
        return fn

    for name in DEFAULT_FILTERS:
        bench(name, single(name), texts, n_bytes)

    def pipeline(ts):
        p = build_pipeline("default")
        return sum(1 for t in ts if p(t) is not None)
    rate = bench("default pipeline", pipeline, texts, n_bytes)
    print(f"default pipeline: {rate:.1f} MB/min/core by CPU time (target >= 5); "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
