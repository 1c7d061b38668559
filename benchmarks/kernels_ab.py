"""A/B of kernel settings: the forward and forward+backward ms of benchmarks/kernels.py's ours()
(bf16, 16 heads, d=64 or --d, B*T = 65,536 tokens) under each setting, each run in a fresh
process, settings alternating, so compiled kernels and module-level switches never leak
between them:

    python benchmarks/kernels_ab.py base RETENTION_TRITON_SCAN_VEC_COLS=0 --T 16384 65536
    python benchmarks/kernels_ab.py base RETENTION_TRITON_SCAN_STAGES=3 --d 128 --T 65536

A setting is "base" (the environment as it is) or NAME=VALUE[,NAME=VALUE...] added to it.
Figures move by a few percent between GPUs and calls, so compare settings within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_setting(text: str) -> dict[str, str]:
    """'base' -> {}; 'A=1,B=x' -> {'A': '1', 'B': 'x'}."""
    if text == "base":
        return {}
    env = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"setting {text!r}: expected base or NAME=VALUE[,NAME=VALUE...]")
        env[name.strip()] = value.strip()
    return env


def child(Ts: list[int], d: int = 64) -> int:
    """In the child process: one JSON line {T: [fwd ms, fwd+bwd ms]} at head dim d."""
    sys.path.insert(0, HERE)
    import kernels

    print("AB " + json.dumps({T: list(kernels.ours(T, d=d)) for T in Ts}), flush=True)
    return 0


def run_child(env: dict[str, str], Ts: list[int], timeout: float,
              d: int = 64) -> dict[int, list[float]]:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--d", str(d), "--child",
                           *map(str, Ts)], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)
    line = next((s for s in proc.stdout.splitlines() if s.startswith("AB ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"setting {env} failed:\n{proc.stderr[-1500:]}")
    return {int(T): ms for T, ms in json.loads(line[3:]).items()}


def ab(settings: list[str], Ts: list[int], repeats: int, timeout: float = 600,
       runner=run_child, d: int = 64) -> dict[str, list[dict[int, list[float]]]]:
    """Every setting `repeats` times, in turn (A B A B ...) at head dim d; prints each run,
    then a table."""
    envs = {s: parse_setting(s) for s in settings}
    runs: dict[str, list] = {s: [] for s in settings}
    for r in range(repeats):
        for s in settings:
            t0 = time.time()
            res = runner(envs[s], Ts, timeout, d)
            runs[s].append(res)
            print(f"run {r + 1} {s}: " + ", ".join(f"T={T} {res[T][0]:.3f} / {res[T][1]:.3f} ms"
                                                   for T in Ts)
                  + f" ({time.time() - t0:.0f} s)", flush=True)
    print("\n| setting | T | fwd ms, each run | fwd+bwd ms, each run |\n|---|---|---|---|")
    for s in settings:
        for T in Ts:
            fwd = " / ".join(f"{x[T][0]:.3f}" for x in runs[s])
            fb = " / ".join(f"{x[T][1]:.3f}" for x in runs[s])
            print(f"| {s} | {T} | {fwd} | {fb} |")
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="*", help="base or NAME=VALUE[,NAME=VALUE...]")
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 65536])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--d", type=int, default=64, help="head dim (kernels.py's shapes otherwise)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per child process")
    ap.add_argument("--child", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.d)
    if len(args.settings) < 2:
        ap.error("give at least two settings (one may be base)")
    ab(args.settings, args.T, args.repeats, args.timeout, d=args.d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
