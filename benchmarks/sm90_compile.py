"""Compile every Triton launch of the kernels' calls for a CUDA GPU target, without a GPU:
catches what the interpreter accepts and the GPU compiler rejects (a static branch returning
two shapes, an MLIR pass failure in one dtype) or the GPU cannot launch (more shared memory
than it has), and reports registers and spills, before a device call is spent on it.

    python benchmarks/sm90_compile.py                       # bf16/fp16/fp32 x d=32/64/128, sm_90a
    python benchmarks/sm90_compile.py --dtypes bfloat16 --dims 64 --arch 80
    RETENTION_TRITON_SCAN_PAIR=0 python benchmarks/sm90_compile.py --dims 64 --only scan
    python benchmarks/sm90_compile.py --dtypes bfloat16 --dims 64 --waits   # wgmma waits too

The calls (power_retention forward and backward in its chunked form with state, gates and
grouped queries, and in its one-chunk form; power_retention_step; cross_entropy) run on CPU
tensors with every kernel launch recorded instead of run (their outputs are garbage); each
distinct launch is then compiled by triton.compile for the target, through ptxas, with fewer
pipeline stages where it needs more shared memory than the target has (as the kernels'
launcher does; shown as 3->2). The GPU image's triton can differ from this one: run it under
that version for the closest answer (pip install --target DIR triton==X; PYTHONPATH=DIR
python benchmarks/sm90_compile.py).
Exit status 1 when any launch fails to compile.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

# Shared memory per block (opt-in maximum), bytes, by compute capability: a launch compiled to
# need more is refused; ops launches it with fewer stages then (kernels/triton/launch.py).
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}

_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32",
          "int64": "i64", "int8": "i8", "uint8": "u8", "bool": "i1"}


def cuda_backend_available(arch: int = 90) -> bool:
    """Whether this triton has its CUDA backend and ptxas (what compile_launch needs)."""
    try:
        from triton.backends.nvidia import compiler
    except ImportError:
        return False
    return os.path.exists(compiler.get_ptxas(arch).path)


def record_launches(dtypes, dims):
    """[(JITFunction, {param: value}, num_warps, num_stages)] of the calls, deduplicated."""
    import torch
    import torch.nn.functional as F
    from triton.runtime.jit import JITFunction

    from retention.kernels.triton import cross_entropy, ops

    seen, launches = set(), []

    def fake_run(self, *args, grid, warmup, **kwargs):
        kw = dict(kwargs)
        warps, stages = kw.pop("num_warps", 4), kw.pop("num_stages", 3)
        bound = dict(zip(self.arg_names, args), **kw)
        key = (self.fn.__name__, warps, stages,
               tuple((k, _key(self, k, v)) for k, v in bound.items()))
        if key not in seen:
            seen.add(key)
            launches.append((self, bound, warps, stages))

    real_run = JITFunction.run
    JITFunction.run = fake_run
    try:
        for dtype in dtypes:
            dt = getattr(torch, dtype)
            for d in dims:
                g = torch.Generator().manual_seed(0)
                B, Hq, H, D = 1, 4, 2, d * (d + 1) // 2

                def leaf(*shape, dtype=dt):
                    return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

                for T, state in ((600, True), (300, False)):   # chunked with state; one chunk
                    q, k, v = leaf(B, T, Hq, d), leaf(B, T, H, d), leaf(B, T, H, d)
                    lg = F.logsigmoid(torch.randn(B, T, H, generator=g) + 2).requires_grad_()
                    S0 = (leaf(B, H, D, d, dtype=torch.float32),
                          leaf(B, H, D, dtype=torch.float32)) if state else None
                    out = ops.power_retention(q, k, v, lg, initial_state=S0, return_state=state)
                    y, (S, z) = out if state else (out, (None, None))
                    loss = y.float().sum() + (S.sum() + z.sum() if state else 0)
                    loss.backward()
                with torch.no_grad():
                    st = (torch.zeros(B, H, D, d), torch.zeros(B, H, D))
                    ops.power_retention_step(torch.randn(B, Hq, d).to(dt),
                                             torch.randn(B, H, d).to(dt),
                                             torch.randn(B, H, d).to(dt), None, st)
            logits = leaf(8, 512)
            cross_entropy(logits, torch.randint(0, 512, (8,))).backward()
    finally:
        JITFunction.run = real_run
    return launches


def _sig(t):
    return "*" + _TYPES[str(t.dtype).removeprefix("torch.")]


def _key(fn, name, value):
    """What of an argument selects the compiled kernel: a tensor's dtype, a constexpr's value,
    a runtime integer's divisibility by 16 (a runtime float: nothing)."""
    import torch

    if isinstance(value, torch.Tensor):
        return _sig(value)
    param = next((p for p in fn.params if p.name == name), None)
    if param is None or param.is_constexpr:   # None: a launch option such as maxnreg
        return repr(value)
    return isinstance(value, int) and value % 16 == 0


def compile_launch(fn, bound, warps, stages, arch):
    """triton.compile for cuda:arch; returns (registers, spill bytes, shared bytes, TTGIR)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = bound[p.name]
        if p.is_constexpr:
            sig[p.name], consts[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = _sig(v)
            attrs[(i,)] = [["tt.divisibility", 16]]   # torch allocations are 16-byte aligned
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    options = dict(num_warps=warps, num_stages=stages)
    if bound.get("maxnreg"):   # a launch's register cap (ops.REGISTER_CAPS)
        options["maxnreg"] = bound["maxnreg"]
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return (*_ptxas_usage(k.asm["ptx"], arch), k.metadata.shared, k.asm.get("ttgir", ""))


def dot_waits(ttgir):
    """(wgmma ops, those waited on at once): a warp_group_dot followed, in its block, by a
    wait with pendings = 0 before the next dot. Triton keeps a dot in flight only when its
    result feeds nothing but later dots' accumulators and its shared operands are pipelined
    buffers."""
    dots = waited = 0
    last_dot = False
    for line in ttgir.splitlines():
        if "warp_group_dot_wait" in line:
            waited += last_dot and "pendings = 0" in line
            last_dot = False
        elif "warp_group_dot " in line:
            dots += 1
            last_dot = True
        elif "scf.yield" in line or "scf.for" in line:   # a loop's drain is not a wait at once
            last_dot = False
    return dots, waited


def _ptxas_usage(ptx, arch):
    """Registers and spill-store bytes from ptxas -v (the ptxas triton compiles with)."""
    from triton.backends.nvidia import compiler

    ptxas = compiler.get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        info = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", path, "-o", path + ".o"],
                              capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return (int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else -1)


def _root_cause(e):
    """The innermost exception of a compile error's chain, in one line (a CompilationError's
    own text is the kernel's source around the failing call)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:120] if lines else ''}"


def _describe(bound):
    import triton.language as tl

    keep = ("D_HEAD", "DT", "PREC", "PART", "REVERSE", "HAS_INIT", "PAIR", "TRANS", "AG", "AGN",
            "READ_PAIR", "BM", "BN", "BK", "C", "maxnreg")
    parts = []
    for k in keep:
        if k in bound:
            v = bound[k]
            v = str(v).removeprefix("tl.") if isinstance(v, tl.dtype) else v
            parts.append(f"{k}={v}")
    return " ".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"],
                    choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--dims", nargs="+", type=int, default=[32, 64, 128])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 or 80")
    ap.add_argument("--only", default=None, help="compile the kernels whose name contains this")
    ap.add_argument("--waits", action="store_true",
                    help="also count each launch's wgmma ops and those waited on at once")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("sm90_compile.py compiles for a GPU: unset TRITON_INTERPRET")
    import triton

    from retention.kernels.triton import ops
    ops.OFF_CUDA_MAJOR = args.arch // 10   # the CPU tensors' launches get the target's settings
    launches = record_launches(args.dtypes, args.dims)
    if args.only:
        launches = [x for x in launches if args.only in x[0].fn.__name__]
    print(f"triton {triton.__version__}, cuda:{args.arch}: {len(launches)} distinct launches")
    print(f"{'kernel':16s} {'warps':>5s} {'stages':>6s} {'regs':>4s} {'spill':>5s} "
          f"{'smem':>6s} {'s':>5s}  settings")
    failed = 0
    limit = SMEM_LIMIT.get(args.arch)
    for fn, bound, warps, stages in launches:
        t0 = time.perf_counter()
        waits = ""
        try:
            fit = stages
            regs, spill, smem, ttgir = compile_launch(fn, bound, warps, fit, args.arch)
            while limit and smem > limit and fit > 1:   # as kernels/triton/launch.py does
                fit -= 1
                regs, spill, smem, ttgir = compile_launch(fn, bound, warps, fit, args.arch)
            res = f"{regs:4d} {spill:5d} {smem:6d}"
            waits = " | dots %d, waited on at once %d" % dot_waits(ttgir) if args.waits else ""
            if limit and smem > limit:
                failed += 1
                res = f"FAIL shared memory {smem} > {limit} bytes even at 1 stage"
        except Exception as e:   # report every failure, then exit 1
            failed += 1
            res = f"FAIL {_root_cause(e)}"
        shown = f"{stages}" if fit == stages else f"{stages}->{fit}"
        print(f"{fn.fn.__name__:16s} {warps:5d} {shown:>6s} {res} "
              f"{time.perf_counter() - t0:5.1f}  {_describe(bound)}{waits}", flush=True)
    print(f"{failed} of {len(launches)} launches failed to compile" if failed
          else f"all {len(launches)} launches compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
