"""Power retention kernel benchmark (issue 6 item 5): bf16, 16 heads, d=64, B*T = 65,536 tokens.

Forward and forward+backward milliseconds (median of triton.testing.do_bench) for our Triton
kernels, torch SDPA (flash backend, causal) and Manifest AI's `retention` 1.0.7 at chunk 128 and
1024, plus our achieved TFLOP/s against the measured bf16 matmul peak. Manifest's package is
also imported as `retention`, so it runs in a child process with its own PYTHONPATH:

    python benchmarks/kernels.py [--manifest-path DIR] [--sweep] [--profile]

DIR holds Manifest's unpacked wheel (pip install --no-deps --target DIR retention==1.0.7);
without it the Manifest columns are skipped. FLOPs counted for ours, per token and head
forward, for the form the kernels run at that T: 4*D*d with states (state update + state read,
canonical D=2080; the intra-chunk attention not counted), 2*d*(T+1) in one chunk (the causal
attention form, ops.quadratic_max); 3x that forward+backward.

    python benchmarks/kernels.py --attn-tune --quadratic   # one-chunk launch settings, then
                                                           # one chunk against chunks by T, d
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

TOKENS, HEADS, D_HEAD = 65536, 16, 64
TS = (1024, 4096, 16384, 65536)


def bench(fn, grads=()):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads),
                                   return_mode="median")


def inputs(T, layout="BTHd", requires_grad=True, d=D_HEAD):
    import torch
    import torch.nn.functional as F

    B = TOKENS // T
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (B, T, HEADS, d) if layout == "BTHd" else (B, HEADS, T, d)
    q, k, v = (torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16)
               for _ in range(3))
    lg = F.logsigmoid(3.0 + torch.randn(B, T, HEADS, device="cuda", generator=g))
    for a in (q, k, v, lg):
        a.requires_grad_(requires_grad)
    return q, k, v, lg


def fwd_bwd(f, ins):
    def run():
        y = f(*ins)
        y.backward(y.detach())   # any fixed upstream gradient
    return run


def matmul_peak():
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    return 2 * 8192 ** 3 / ms / 1e9


def ours(T, chunk=None, d=D_HEAD):
    import torch
    from retention.kernels.triton import power_retention

    q, k, v, lg = inputs(T, d=d)
    f = lambda q, k, v, lg: power_retention(q, k, v, lg, chunk_size=chunk)
    with torch.no_grad():
        fwd = bench(lambda: f(q, k, v, lg))
    return fwd, bench(fwd_bwd(f, (q, k, v, lg)), (q, k, v, lg))


def sdpa(T):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, _ = inputs(T, layout="BHTd")
    f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with torch.no_grad():
            fwd = bench(lambda: f(q, k, v))
        return fwd, bench(fwd_bwd(f, (q, k, v)), (q, k, v))


def manifest_child():
    """Runs in the child process: Manifest's power_retention, one JSON line per measurement."""
    import torch
    from retention import power_retention as manifest_pr   # Manifest's package, not ours

    # Most informative first: their autotuning makes each new shape slow to start.
    for chunk, T in ((128, 4096), (128, 65536), (1024, 65536), (128, 1024), (1024, 16384),
                     (128, 16384), (1024, 4096), (1024, 1024)):
            try:
                q, k, v, lg = inputs(T)
                f = lambda q, k, v, lg: manifest_pr(q, k, v, lg, deg=2, chunk_size=chunk)
                with torch.no_grad():
                    fwd = bench(lambda: f(q, k, v, lg))
                fb = bench(fwd_bwd(f, (q, k, v, lg)), (q, k, v, lg))
                print(json.dumps({"chunk": chunk, "T": T, "fwd": fwd, "fwdbwd": fb}), flush=True)
            except Exception as e:
                print(json.dumps({"chunk": chunk, "T": T, "error": f"{type(e).__name__}: {e}"[:200]}),
                      flush=True)


def manifest(path, timeout):
    env = dict(os.environ, PYTHONPATH=path)
    out = {}
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                              capture_output=True, text=True, timeout=timeout,
                              cwd="/")
        text = proc.stdout
        if proc.returncode:
            print("manifest child failed:", proc.stderr[-800:])
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(f"manifest child stopped after {timeout} s")
    for line in text.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[(r["chunk"], r["T"])] = r
    return out


def profile(T):
    import torch
    from retention.kernels.triton import power_retention

    q, k, v, lg = inputs(T)
    run = fwd_bwd(lambda *a: power_retention(*a), (q, k, v, lg))
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            for t in (q, k, v, lg):   # as do_bench does: no accumulation into .grad to time
                t.grad = None
            run()
        torch.cuda.synchronize()
    print(f"-- profile T={T}, 3 x fwd+bwd")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))


def kernel_resources():
    """Registers, spills and shared memory of every compiled kernel variant (from ptxas)."""
    from retention.kernels.triton import attention, chunked, rowwise

    for module, name in ((attention, "_attn_fwd"), (attention, "_attn_dq"),
                         (attention, "_attn_dkv"), (chunked, "_state_scan"),
                         (chunked, "_out_fwd"), (chunked, "_dq_bwd"), (chunked, "_dkv_bwd"),
                         (rowwise, "_row_delta")):
        try:
            for cache in getattr(module, name).device_caches.values():
                for k in cache[0].values():
                    print(f"{name:14s} regs {getattr(k, 'n_regs', '?')} spills "
                          f"{getattr(k, 'n_spills', '?')} smem {k.metadata.shared} warps "
                          f"{k.metadata.num_warps} stages {k.metadata.num_stages}")
        except Exception as e:   # the cache layout is triton-internal
            print(name, "resources unavailable:", type(e).__name__, e)


def scan_variants():
    """Operand that carries the per-token scale in the state scan (b: values rebuilt in
    shared memory per row; a: x^T scaled in registers) x rows per program."""
    from retention.kernels.triton import ops

    best = None
    for operand in ("b", "a"):
        for rows in ("4", "2"):
            ops.SCAN_BSIDE = operand == "b"
            os.environ["RETENTION_TRITON_SCAN_ROWS"] = rows
            try:
                res = [ours(T) for T in (4096, 65536)]
            except Exception as e:
                print(f"scan operand={operand} rows={rows}: failed {type(e).__name__}: "
                      f"{str(e)[:160]}", flush=True)
                continue
            total = sum(fb for _, fb in res)
            print(f"scan operand={operand} rows={rows}: " + ", ".join(
                f"T={T} fwd {f:.2f} fwd+bwd {fb:.2f} ms" for T, (f, fb) in zip((4096, 65536), res)),
                flush=True)
            if best is None or total < best[0]:
                best = (total, operand, rows)
    os.environ.pop("RETENTION_TRITON_SCAN_ROWS", None)
    if best:
        print(f"BEST RETENTION_TRITON_SCAN_OPERAND={best[1]} RETENTION_TRITON_SCAN_ROWS={best[2]}",
              flush=True)


def tune():
    """Settings of the chunked kernels (ops module knobs) against the defaults, fwd+bwd ms in
    256-token chunks at d=64 (T=4096 and 65536) and d=128 (T=4096, the 7B preset's head dim),
    including the rank-one intra-chunk gate (ops.CHUNK_RANK1), the scan's rows in pairs
    (ops.SCAN_PAIR), rows per scan program (ops._row_group, ops._row_group_narrow), its steps
    and stages (ops._scan_step), the state reads' rows in pairs (ops._read_pair) and the dk/dv
    launch forms (ops.DKV_LAUNCH). Row blocks
    of 64 with 4 warps and 3 stages won against 128-row blocks and 8 warps on 2026-11-30
    (docs/kernels_gpu_log.md); chunk sizes: --sweep."""
    from retention.kernels.triton import ops

    names = ("BLOCK_M", "_warps", "_stages", "_row_group", "_row_group_narrow", "DKV_LAUNCH",
             "_scan_step", "CHUNK_RANK1", "SCAN_PAIR", "_read_pair")
    base = {n: getattr(ops, n) for n in names}
    step64 = lambda stages: (lambda c, d, *args: (64 if c % 64 == 0 else 16, stages))
    stages_only = lambda n: (lambda *args: (base["_scan_step"](*args)[0], n))
    every = lambda dkv: {d: dkv for d in (16, 32, 64, 128)}
    variants = [("default", {}),
                ("scan one dot per row (no pairs)", dict(SCAN_PAIR=False)),
                ("scan 2 rows per program",
                 dict(_row_group=lambda d, reverse=False, paired=True, trans=True: 2)),
                ("reverse scan 2 rows per program",
                 dict(_row_group=lambda d, reverse=False, paired=True, trans=True:
                      4 if d >= 64 and not reverse else 2)),
                ("state reads one dot per row", dict(_read_pair=lambda *args: 0)),
                ("state reads in row pairs, every d and W", dict(_read_pair=lambda *args: 2)),
                ("intra-chunk rank-one gate", dict(CHUNK_RANK1=True)),
                ("scan 64-token steps", dict(_scan_step=step64(2))),
                ("scan 2 stages", dict(_scan_step=stages_only(2))),
                ("scan rows a >= d/2 grouped as the others",
                 dict(_row_group_narrow=lambda d, ag, *args: ag)),
                ("dk and dv in two launches (races at d=64)", dict(DKV_LAUNCH=every("split"))),
                ("dk and dv in one pass", dict(DKV_LAUNCH=every("joint"))),
                ("dv then dk in one program", dict(DKV_LAUNCH=every("sequential")))]
    for name, knobs in variants:
        for key, val in knobs.items():
            setattr(ops, key, val)
        try:
            res = [(T, d, ours(T, chunk=256, d=d))
                   for T, d in ((4096, 64), (65536, 64), (4096, 128))]
            print(f"tune {name}: " + ", ".join(f"T={T} d={d} fwd {f:.2f} fwd+bwd {fb:.2f} ms"
                                               for T, d, (f, fb) in res), flush=True)
        except Exception as e:
            print(f"tune {name}: failed {type(e).__name__}: {str(e)[:160]}", flush=True)
        for n, val in base.items():
            setattr(ops, n, val)


def quadratic():
    """One chunk (chunk = T: no state, the attention form of attention.py; the default up to
    ops.quadratic_max(d)) against 256-token chunks with states, fwd+bwd ms (same tokens and
    heads)."""
    for T, d in ((2048, 32), (4096, 32), (8192, 32), (4096, 64), (6144, 64), (8192, 64),
                 (12288, 64), (16384, 64), (4096, 128), (8192, 128), (16384, 128)):
        res = {"chunk 256": ours(T, chunk=256, d=d), "one chunk": ours(T, chunk=T, d=d)}
        print(f"quadratic T={T} d={d}: " + ", ".join(f"{k} fwd {f:.2f} fwd+bwd {fb:.2f} ms"
                                                     for k, (f, fb) in res.items()), flush=True)


# Launch settings of the one-chunk kernels to time: (rows, cols, warps, stages), by head dim;
# dq and dkv each with both ways of forming their transposed operands (ops.ATTN_TRANS).
ATTN_CANDIDATES = {
    "fwd": {64: [(64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3), (64, 128, 4, 3),
                 (128, 128, 8, 3)],
            128: [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 2), (64, 32, 4, 3)]},
    "dq": {64: [(64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3), (128, 64, 8, 3),
                (64, 64, 8, 3)],
           128: [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)]},
    "dkv": {64: [(64, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4), (64, 16, 4, 3),
                 (32, 32, 4, 3), (128, 32, 8, 3), (128, 32, 4, 3), (128, 64, 8, 3),
                 (64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 3)],
            128: [(128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 2), (128, 16, 8, 2)]},
}


def _time_ms(label, d, Ts, which):
    """ours at each T (one chunk; which: 0 forward, 1 fwd+bwd) with the settings now in ops,
    printed as a row; their sum in ms, or None when the setting fails to compile or run."""
    try:
        ms = [ours(T, chunk=T, d=d)[which] for T in Ts]
    except Exception as e:
        print(f"{label}: failed {type(e).__name__}: {str(e)[:160]}", flush=True)
        return None
    print(f"{label}: " + ", ".join(f"T={T} {m:.3f} ms" for T, m in zip(Ts, ms)), flush=True)
    return sum(ms)


def attn_tune(kinds=None):
    """Each one-chunk kernel's launch settings in turn, the others at their defaults: forward
    ms for fwd, fwd+bwd ms for dq and dkv, at T=1024 and 4096 (d=64) and T=4096 (d=128).
    Keeps and prints the fastest per kernel and head dim (ops.ATTN_BLOCKS, ops.ATTN_TRANS)."""
    from retention.kernels.triton import ops

    shapes = {64: (1024, 4096), 128: (4096,)}
    for kind, by_d in ATTN_CANDIDATES.items():
        if kinds and kind not in kinds:
            continue
        for d, cands in by_d.items():
            default = (ops.ATTN_BLOCKS[kind][d], ops.ATTN_TRANS.get(kind, {}).get(d))
            best = None
            for cfg in cands:
                for trans in (False, True) if kind in ops.ATTN_TRANS else (None,):
                    ops.ATTN_BLOCKS[kind][d] = cfg
                    if trans is not None:
                        ops.ATTN_TRANS[kind][d] = trans
                    ms = _time_ms(f"attn {kind} d={d} {cfg} trans={trans}", d, shapes[d],
                                  0 if kind == "fwd" else 1)
                    if ms is not None and (best is None or ms < best[0]):
                        best = (ms, cfg, trans)
            cfg, trans = best[1:] if best else default
            ops.ATTN_BLOCKS[kind][d] = cfg
            if trans is not None:
                ops.ATTN_TRANS[kind][d] = trans
            print(f"BEST attn {kind} d={d}: {cfg} trans={trans} (default {default})",
                  flush=True)
            if kind == "dkv" and best:
                split_tune(ops, d, shapes[d], best[0])


# dv and dk in two launches (ops.ATTN_SPLIT_DKV), each with these settings.
SPLIT_CANDIDATES = {64: [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3)],
                    128: [(64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 3)]}


def split_tune(ops, d, Ts, joint_ms):
    """dk/dv in two launches against the best joint launch (joint_ms, summed over Ts);
    keeps the split with its fastest settings if it wins."""
    best = None
    for cfg in SPLIT_CANDIDATES[d]:
        ops.ATTN_SPLIT_DKV[d] = True
        ops.ATTN_BLOCKS["dv"][d] = ops.ATTN_BLOCKS["dk"][d] = cfg
        ms = _time_ms(f"attn split dk/dv d={d} {cfg}", d, Ts, 1)
        if ms is not None and (best is None or ms < best[0]):
            best = (ms, cfg)
    ops.ATTN_SPLIT_DKV[d] = best is not None and best[0] < joint_ms
    if ops.ATTN_SPLIT_DKV[d]:
        ops.ATTN_BLOCKS["dv"][d] = ops.ATTN_BLOCKS["dk"][d] = best[1]
    choice = f"two launches {best[1]}" if ops.ATTN_SPLIT_DKV[d] else "one launch"
    split_ms = best[0] if best else float("nan")
    print(f"BEST attn dk/dv d={d}: {choice} ({split_ms:.3f} ms split against {joint_ms:.3f} "
          f"joint)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest-path", default=None)
    ap.add_argument("--manifest-timeout", type=int, default=240)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time chunk sizes 128/256/512")
    ap.add_argument("--profile", type=int, nargs="*", default=None, metavar="T",
                    help="profile fwd+bwd at these T (default 65536)")
    ap.add_argument("--scan-variants", action="store_true",
                    help="time the state scan's operand choice and rows per program "
                         "(T=4096 and 65536), print the fastest as env settings, and stop")
    ap.add_argument("--tune", action="store_true",
                    help="also time row-block sizes, warps and pipeline stages of the per-block "
                         "kernels and the rows per state-scan program (T=4096 and 65536)")
    ap.add_argument("--quadratic", action="store_true",
                    help="one chunk (no state) against 256-token chunks by T and head dim, and stop")
    ap.add_argument("--attn-tune", nargs="*", default=None, choices=sorted(ATTN_CANDIDATES),
                    help="time the one-chunk kernels' launch settings first (of these kernels; "
                         "all when none is named), keep the fastest for the rest of the run")
    args = ap.parse_args()
    if args.child:
        return manifest_child()
    import torch
    import triton

    from retention.kernels.triton.ops import default_chunk

    D = math.comb(D_HEAD + 1, 2)
    flop_fwd = lambda T: (2 * D_HEAD * (T + 1) if default_chunk(T, D_HEAD) >= T
                          else 4 * D * D_HEAD) * TOKENS * HEADS
    peak = matmul_peak()
    print(f"{time.strftime('%Y-%m-%d')} | {torch.cuda.get_device_name()} | torch {torch.__version__}"
          f" | triton {triton.__version__} | bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    if args.scan_variants:   # on its own: pick the state scan's launch settings first
        return scan_variants()
    if args.attn_tune is not None:
        attn_tune(args.attn_tune)
    if args.quadratic:
        return quadratic()
    man = manifest(args.manifest_path, args.manifest_timeout) if args.manifest_path else {}
    rows = []
    for T in TS:
        of, ofb = ours(T)
        sf, sfb = sdpa(T)
        m = [man.get((c, T), {}) for c in (128, 1024)]
        rows.append((T, of, ofb, sf, sfb, m))
        print(f"T={T}: ours {of:.2f}/{ofb:.2f} ms, sdpa {sf:.2f}/{sfb:.2f} ms", flush=True)
    fmt = lambda r, key: f"{r[key]:.2f}" if key in r else ("err" if "error" in r else "-")
    print("\n| T | B | ours fwd | ours fwd+bwd | ours TFLOP/s fwd / fwd+bwd | SDPA fwd | SDPA fwd+bwd "
          "| Manifest c128 fwd | c128 fwd+bwd | Manifest c1024 fwd | c1024 fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for T, of, ofb, sf, sfb, (m1, m2) in rows:
        tf, tfb = flop_fwd(T) / of / 1e9, 3 * flop_fwd(T) / ofb / 1e9
        print(f"| {T} | {TOKENS // T} | {of:.2f} | {ofb:.2f} | {tf:.0f} / {tfb:.0f} "
              f"({100 * tfb / peak:.0f}% of peak) | {sf:.2f} | {sfb:.2f} | {fmt(m1, 'fwd')} | "
              f"{fmt(m1, 'fwdbwd')} | {fmt(m2, 'fwd')} | {fmt(m2, 'fwdbwd')} |")
    for r in man.values():
        if "error" in r:
            print("manifest error:", r)
    if args.sweep:
        for T in (4096, 65536):
            for c in (128, 256, 512):
                of, ofb = ours(T, chunk=c)
                print(f"sweep T={T} chunk={c}: fwd {of:.2f} ms, fwd+bwd {ofb:.2f} ms", flush=True)
    if args.tune:
        tune()
    kernel_resources()
    if args.profile is not None:
        for T in args.profile or [65536]:
            profile(T)


if __name__ == "__main__":
    main()
