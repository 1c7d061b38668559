"""Per-program timelines of the Triton kernels in one forward+backward, on a CUDA GPU.

Each launch of the selected kernels (every heavy one by default) runs as a wrapper kernel that
reads the GPU's %globaltimer and %smid around the kernel's own body and stores, per program,
its start, end, multiprocessor and grid axis 1 (in the kernels that is the row group, the
head or the query block). For each launch it prints one JSON line: the span, how many
programs shared a multiprocessor at most (slots), the share of slot time busy, the time with
fewer than 90% of the slots busy (a tail, or programs of unequal length), and the program
lengths by grid axis 1. The profiler gives a kernel's time; this says whether its programs
fill the GPU while it runs. bf16, 16 heads, d=64, 65,536 tokens per T (benchmarks/kernels.py's
shapes):

    python benchmarks/kernel_timeline.py --T 65536 16384 [--kernels _state_scan,_dkv_bwd]

The wrapper adds a few registers at most (benchmarks/sm90_compile.py compiles it offline);
its numbers are for comparing programs within a launch, not for timing the kernel.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
_WRAPPERS: dict = {}


def wrapper_source(kernel) -> str:
    """Source of a @triton.jit kernel probe_NAME(PROBE, <kernel's parameters>) that runs the
    kernel's body between two reads of %globaltimer and stores [start, end, smid, axis-1 id]
    as int64 at PROBE[4 * program]."""
    import triton.language as tl

    params, call = [], []
    for p in inspect.signature(kernel.fn).parameters.values():
        constexpr = p.annotation is tl.constexpr or "constexpr" in str(p.annotation)
        default = "" if p.default is inspect.Parameter.empty else f" = {p.default!r}"
        params.append(f"{p.name}{': tl.constexpr' if constexpr else ''}{default}")
        call.append(f"{p.name}={p.name}" if default else p.name)
    name = kernel.fn.__name__
    return f'''import triton
import triton.language as tl
from triton.language.extra.cuda.utils import globaltimer, smid
from {kernel.fn.__module__} import {name} as _inner


@triton.jit
def probe_{name}(PROBE, {", ".join(params)}):
    t0 = globaltimer()
    _inner({", ".join(call)})
    t1 = globaltimer()
    pid = ((tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0)
           + tl.program_id(0))
    tl.store(PROBE + pid * 4, t0)
    tl.store(PROBE + pid * 4 + 1, t1)
    tl.store(PROBE + pid * 4 + 2, smid().to(tl.int64))
    tl.store(PROBE + pid * 4 + 3, tl.program_id(1).to(tl.int64))
'''


def probe_kernel(kernel):
    """The wrapper of wrapper_source as a JITFunction (written to a file: triton reads a
    kernel's source from it), built once per kernel."""
    name = kernel.fn.__name__
    if name not in _WRAPPERS:
        path = os.path.join(tempfile.mkdtemp(prefix="retention_probe_"), f"probe_{name}.py")
        with open(path, "w") as f:
            f.write(wrapper_source(kernel))
        spec = importlib.util.spec_from_file_location(f"probe_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _WRAPPERS[name] = getattr(module, f"probe_{name}")
    return _WRAPPERS[name]


def _running(t0: np.ndarray, t1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Programs [t0, t1) -> the sorted event times and how many run from each on (an end
    before a start at the same instant, so back-to-back programs never overlap)."""
    times = np.concatenate([t0, t1])
    steps = np.concatenate([np.ones(len(t0)), -np.ones(len(t1))])
    order = np.lexsort((steps, times))
    return times[order], np.cumsum(steps[order])


def summarize(rows: np.ndarray) -> dict:
    """A launch's programs, rows [start ns, end ns, multiprocessor, axis-1 id] -> span (us),
    the most programs one multiprocessor ran at once (slots), the busy share of slots x span,
    the time with under 90% of all slots busy, and program lengths (us) by axis-1 id."""
    t0 = (rows[:, 0] - rows[:, 0].min()) / 1e3
    t1 = (rows[:, 1] - rows[:, 0].min()) / 1e3
    sm, group = rows[:, 2], rows[:, 3]
    span, dur = float(t1.max()), t1 - t0
    # the most programs that overlapped on one multiprocessor
    slots = max(int(_running(t0[sm == s], t1[sm == s])[1].max()) for s in np.unique(sm))
    full = slots * len(np.unique(sm))
    times, running = _running(t0, t1)
    below = float(np.sum(np.diff(times)[running[:-1] < 0.9 * full]))
    by_group = {int(g): [round(float(dur[group == g].mean()), 1),
                         round(float(dur[group == g].max()), 1), int((group == g).sum())]
                for g in np.unique(group)}
    return {"span_us": round(span, 1), "programs": len(rows), "multiprocessors":
            len(np.unique(sm)), "slots": slots,
            "busy": round(float(dur.sum() / (span * full)), 3),
            "under_90pct_us": round(below, 1), "length_mean_us": round(float(dur.mean()), 1),
            "length_max_us": round(float(dur.max()), 1),
            "last_start_us": round(float(t0.max()), 1), "by_axis1": by_group}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[65536])
    ap.add_argument("--kernels", default="", help="comma-separated names (default: all)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("kernel_timeline.py reads the GPU's clocks: it needs a CUDA GPU")
    sys.path.insert(0, HERE)
    import kernels as bench

    from retention.kernels.triton import launch, power_retention

    selected = set(filter(None, args.kernels.split(",")))
    plain, recording, records = launch.fitted, [False], []

    def fitted(kernel, grid, *a, num_stages, **kw):
        name = kernel.fn.__name__
        if not recording[0] or (selected and name not in selected):
            return plain(kernel, grid, *a, num_stages=num_stages, **kw)
        g = tuple(grid) + (1,) * (3 - len(grid))
        dev = next(x.device for x in a if hasattr(x, "device"))
        probe = torch.zeros(4 * g[0] * g[1] * g[2], dtype=torch.int64, device=dev)
        plain(probe_kernel(kernel), grid, probe, *a, num_stages=num_stages, **kw)
        records.append((name, g, probe))

    launch.fitted = fitted
    for T in args.T:
        q, k, v, lg = bench.inputs(T)

        step = bench.fwd_bwd(power_retention, (q, k, v, lg))

        step()                       # compiles the kernels
        recording[0] = True
        for _ in range(2):           # compiles the wrappers, then the pass that is kept
            records.clear()
            step()
        torch.cuda.synchronize()
        recording[0] = False
        for name, g, probe in records:
            out = {"T": T, "kernel": name, "grid": g}
            out.update(summarize(probe.view(-1, 4).cpu().numpy()))
            print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
