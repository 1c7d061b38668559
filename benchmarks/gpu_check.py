"""Correctness grid of the Triton power-retention kernels on a CUDA GPU, in one call.

For every case: gold = float64 attention form (kernels/triton/testing.py) on the bf16-rounded
inputs, ref = the torch ops path (backends/torch) on the bf16 inputs, test = the kernel.
err(x) = max|x - gold| / max|gold| per output and gradient; a case passes when
err(test) <= 4 * err(ref) + 1e-2 for every tensor (DESIGN section 5) and nothing is NaN.
The gradient check covers the Hopper tl.trans-of-a-dot miscompile of triton 3.4-3.7.0.

    python benchmarks/gpu_check.py            # the whole grid; prints a table, exits 1 on failure
    python benchmarks/gpu_check.py --quick    # T=63 and 1024 only
    python benchmarks/gpu_check.py --only d=128   # the cases whose name contains 'd=128'
    python benchmarks/gpu_check.py --only deterministic   # the backward, 16 runs: bit-identical

Cases run in a child process (CUDA_LAUNCH_BLOCKING=1, so an error names its kernel); a case
that kills the CUDA context is reported and the grid goes on in a fresh child.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from retention.kernels.triton import available, power_retention, power_retention_step
from retention.kernels.triton.testing import attention_form

try:
    from retention.backends.torch.power_retention import power_retention_ops
except ImportError:                                   # ops path absent: bf16 attention form
    power_retention_ops = None

NAMES = ("y", "S", "z", "dq", "dk", "dv", "dlog_g", "dS0", "dz0")


def make_case(B, T, Hq, H, d, gates, state, dtype, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device=device, generator=g)
    q, k, v = rnd(B, T, Hq, d).to(dtype), rnd(B, T, H, d).to(dtype), rnd(B, T, H, d).to(dtype)
    log_g = F.logsigmoid(3.0 + rnd(B, T, H)) if gates else None
    S0 = None
    if state:   # a consistent state: the one a random 64-token prefix leaves
        qp = rnd(B, 64, Hq, d).double()
        kp, vp = rnd(B, 64, H, d).to(dtype).double(), rnd(B, 64, H, d).to(dtype).double()
        _, S0 = attention_form(qp, kp, vp)
        S0 = tuple(a.float() for a in S0)
    return q, k, v, log_g, S0


def run(fn, q, k, v, log_g, S0, cast, seed):
    """Outputs and gradients of fn under a fixed random loss on (y, S, z)."""
    ins = [None if a is None else cast(a).detach().requires_grad_()
           for a in (q, k, v, log_g, *(S0 or (None, None)))]
    qq, kk, vv, lg, s0, z0 = ins
    y, (S, z) = fn(qq, kk, vv, lg, (s0, z0) if s0 is not None else None)
    g = torch.Generator(device=y.device).manual_seed(seed + 1)
    gy = torch.randn(y.shape, device=y.device, generator=g)
    loss = (y.double() * gy).sum()
    if S is not None:   # None: the call asked for no final state (training's call)
        gS = torch.randn(S.shape, device=y.device, generator=g) * 1e-3
        gz = torch.randn(z.shape, device=y.device, generator=g) * 1e-3
        loss = loss + (S.double() * gS).sum() + (z.double() * gz).sum()
    grads = torch.autograd.grad(loss, [a for a in ins if a is not None])
    it = iter(grads)
    full = [next(it) if a is not None else None for a in ins]
    return [y, S, z] + full[:3] + full[3:]


def kernel_fn(chunk, state_out=True):
    def fn(q, k, v, lg, st):
        if not state_out:   # training's call: one chunk then needs no state at all
            return power_retention(q, k, v, lg, chunk_size=chunk, initial_state=st), (None, None)
        return power_retention(q, k, v, lg, chunk_size=chunk, initial_state=st, return_state=True)
    return fn


def without_state(fn):
    return lambda *a: (fn(*a)[0], (None, None))


def ops_fn(q, k, v, lg, st):
    if power_retention_ops is not None:
        return power_retention_ops(q, k, v, lg, initial_state=st, return_state=True)
    return attention_form(q, k, v, lg, initial_state=st)


def gold_fn(q, k, v, lg, st):
    return attention_form(q, k, v, lg, initial_state=st)


def err(x, gold):
    if x is None or gold is None:
        return None
    x, gold = x.double(), gold.double()
    if not torch.isfinite(x).all():
        return math.inf
    return ((x - gold).abs().max() / gold.abs().max().clamp_min(1e-30)).item()


def check_case(B, T, Hq, H, d, gates, state, dtype=torch.bfloat16, chunk=None, seed=0,
               state_out=True):
    q, k, v, log_g, S0 = make_case(B, T, Hq, H, d, gates, state, dtype, seed)
    wrap = (lambda f: f) if state_out else without_state
    gold = run(wrap(gold_fn), q, k, v, log_g, S0, lambda a: a.double(), seed)
    ref = run(wrap(ops_fn), q, k, v, log_g, S0, lambda a: a, seed)
    test = run(kernel_fn(chunk, state_out), q, k, v, log_g, S0, lambda a: a, seed)
    return compare(gold, ref, test)


def compare(gold, ref, test):
    """(every tensor within err(test) <= 4 err(ref) + 1e-2, one 'name=test/ref' per tensor),
    in NAMES order; tensors absent from the case (None) are skipped."""
    rows, ok = [], True
    for name, g_, r_, t_ in zip(NAMES, gold, ref, test):
        et, er = err(t_, g_), err(r_, g_)
        if et is None:
            continue
        passed = et <= 4 * (er or 0.0) + 1e-2
        ok &= passed
        rows.append(f"{name}={et:.1e}/{er:.1e}{'' if passed else '!'}")
    return ok, rows


def check_decode(d=64, Hq=4, H=2, B=2, T=40, seed=3):
    """Prefill T-4 tokens with the chunked kernel, then 4 decode steps: against the full gold."""
    q, k, v, log_g, _ = make_case(B, T, Hq, H, d, True, False, torch.bfloat16, seed)
    gold_y, gold_state = attention_form(q.double(), k.double(), v.double(), log_g.double())
    _, state = power_retention(q[:, :-4], k[:, :-4], v[:, :-4], log_g[:, :-4], return_state=True)
    errs = []
    for t in range(T - 4, T):
        y, state = power_retention_step(q[:, t], k[:, t], v[:, t], log_g[:, t], state)
        errs.append(err(y, gold_y[:, t]))
    errs += [err(state[0], gold_state[0]), err(state[1], gold_state[1])]
    return max(errs) <= 1e-2, [f"max err {max(errs):.1e}"]


def check_forward_only(T, d, Hq=4, H=2, B=1, seed=4):
    """A forward-only call (no gradient: prefill, evaluation), which runs ops.forward_chunk(d)
    chunks: y and the final state from an initial state, gold/ref/test as in check_case."""
    from retention.kernels.triton import ops

    q, k, v, log_g, S0 = make_case(B, T, Hq, H, d, True, True, torch.bfloat16, seed)
    with torch.no_grad():
        gold = gold_fn(q.double(), k.double(), v.double(), log_g.double(), S0)
        ref = ops_fn(q, k, v, log_g, S0)
        test = power_retention(q, k, v, log_g, initial_state=S0, return_state=True)
    ok, rows = compare(*((y, *state) for y, state in (gold, ref, test)))
    return ok, [f"chunk={ops.kernel_chunk(T, None, d, stateless=False, forward_only=True)}"] + rows


def check_deterministic(runs=16):
    """The backward run several times without CUDA_LAUNCH_BLOCKING (which would serialize
    what a race needs to show), with L2 flushed and a random pause before each run: every
    output and gradient bit-identical every time, and equal to a run in stream order (dq off
    its side stream, ops.OVERLAP_DQ). Runs in its own process. Failures seen on 2026-11-30
    (H200, triton 3.6), both in dv: with dq on the side stream and the split dk/dv launch,
    then in that split dv launch alone (3 pipeline stages; d=64 now takes the sequential
    dk/dv launch, ops.DKV_LAUNCH)."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_LAUNCH_BLOCKING"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--determinism-child",
                           str(runs)], env=env, capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("DETERMINISTIC")]
    if proc.returncode or not lines:
        return False, [f"crashed: {proc.stderr.strip().splitlines()[-1:]}"]
    return all(l.split()[1] == "ok" for l in lines), [" ".join(l.split()[2:]) for l in lines]


def determinism_child(runs):
    """Chunks with initial and final state (T=16384) and one chunk (T=4096), d=64 and 128."""
    import random

    from retention.kernels.triton import ops

    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    for T, d, state in ((16384, 64, True), (8192, 128, True), (4096, 64, False)):
        q, k, v, log_g, S0 = make_case(1, T, 4, 2, d, True, state, torch.bfloat16, 5)
        outs = []
        for i in range(runs + 1):
            ops.OVERLAP_DQ = i > 0   # the first run in stream order: the others must equal it
            flush.random_()   # cold L2 and a random pause: vary the timing a race needs
            torch.cuda._sleep(random.randint(0, 2_000_000))
            out = run(kernel_fn(None, state), q, k, v, log_g, S0, lambda a: a, 5)
            torch.cuda.synchronize()
            outs.append(dict(zip(NAMES, out)))
        base = outs[0]
        bad = [{n: f"{err(o[n], base[n]):.1e}" for n in base
                if base[n] is not None and not torch.equal(o[n], base[n])} for o in outs[1:]]
        ok = not any(bad)
        print(f"DETERMINISTIC {'ok' if ok else 'FAIL'} T={T} d={d} state={state}: {runs} runs "
              f"bit-identical to stream order: {ok}"
              f"{'' if ok else f' (differing, by run: {bad})'}", flush=True)


def grid(quick, only=None):
    cases = [c for c in all_cases(quick) if only is None or only in c[0]]
    if not cases:
        raise SystemExit(f"no case name contains {only!r}")
    return cases


def all_cases(quick):
    Ts = (63, 1024) if quick else (63, 1024, 4096)
    cases = []
    for T in Ts:
        for d in (32, 64, 128):
            B = 2 if T < 100 else 1
            cases.append((f"T={T} d={d} gates GQA state", (B, T, 4, 2, d, True, True)))
            cases.append((f"T={T} d={d} plain", (B, T, 2, 2, d, False, False)))
    for T in Ts:   # one chunk and no state out (training's call): the stateless form
        chunk = None if T <= 1024 else T   # the default chunk is T up to ops.QUADRATIC_MAX
        for d in (32, 64, 128):
            cases.append((f"T={T} d={d} gates GQA no state out",
                          (2 if T < 100 else 1, T, 4, 2, d, True, False, torch.bfloat16, chunk,
                           0, False)))
    cases.append(("T=300 d=64 chunk=64 gates GQA state", (1, 300, 4, 2, 64, True, True, torch.bfloat16, 64)))
    cases.append(("T=1024 d=64 fp16 gates GQA state", (1, 1024, 4, 2, 64, True, True, torch.float16)))
    cases.append(("T=1024 d=64 fp32 gates GQA state", (1, 1024, 4, 2, 64, True, True, torch.float32)))
    # float32 operands at d=128 in one chunk: the dq launch that needed its own blocks
    # (ops.ATTN_BLOCKS_F32) to fit the shared memory
    for dt, name in ((torch.float16, "fp16"), (torch.float32, "fp32")):
        cases.append((f"T=1024 d=128 {name} gates GQA no state out",
                      (1, 1024, 4, 2, 128, True, False, dt, None, 0, False)))
    cases.append(("prefill + 4 decode steps, d=64 GQA", None))
    for d in (32, 64, 128):   # prefill's and evaluation's longer chunk, a partial last one
        cases.append((f"T=1500 d={d} forward-only GQA state", ("forward-only", 1500, d)))
    cases.append(("deterministic backward, 16 runs", "determinism"))
    return cases


def child(quick, only, start):
    """Run cases from `start` on; each result line is 'RESULT i ok|FAIL text'."""
    torch.backends.cuda.matmul.allow_tf32 = False
    for i, (name, a) in enumerate(grid(quick, only)):
        if i < start:
            continue
        print(f"BEGIN {i}", flush=True)
        t0 = time.time()
        try:
            ok, rows = (check_decode() if a is None else check_deterministic() if a == "determinism"
                        else check_forward_only(*a[1:]) if a[0] == "forward-only"
                        else check_case(*a))
        except Exception as e:  # a compile error is a failed case, the grid goes on
            ok, rows = False, [f"{type(e).__name__}: {str(e)[:200]}"]
            if "CUDA" in str(e):
                raise
        print(f"RESULT {i} {'ok' if ok else 'FAIL'} {time.time() - t0:5.1f}  {' '.join(rows)}",
              flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="run the cases whose name contains this")
    ap.add_argument("--child-from", type=int, default=None)
    ap.add_argument("--determinism-child", type=int, default=None)
    args = ap.parse_args()
    if args.determinism_child is not None:
        return determinism_child(args.determinism_child)
    if args.child_from is not None:
        return child(args.quick, args.only, args.child_from)
    print("kernels:", available(), "| torch", torch.__version__, "| ops twin:",
          "backends.torch" if power_retention_ops else "attention form (bf16)", flush=True)
    cases = grid(args.quick, args.only)
    results, start = {}, 0
    print(f"{'case':38s} {'ok':4s} {'s':>5s}  err test/ref per tensor ('!' = over 4*ref+1e-2)")
    while start < len(cases):
        cmd = [sys.executable, os.path.abspath(__file__), "--child-from", str(start)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--only", args.only] if args.only else []
        proc = subprocess.Popen(cmd, env=dict(os.environ, CUDA_LAUNCH_BLOCKING="1"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        current = start
        for line in proc.stdout:
            if line.startswith("BEGIN"):
                current = int(line.split()[1])
            elif line.startswith("RESULT"):
                _, i, rest = line.rstrip("\n").split(" ", 2)
                results[int(i)] = rest
                print(f"{cases[int(i)][0]:38s} {rest}", flush=True)
        err = proc.stderr.read()
        proc.wait()
        if current not in results:   # the child died inside this case
            where = [l for l in err.splitlines() if "kernels/triton" in l or "Error" in l][-4:]
            results[current] = "FAIL  crashed: " + " | ".join(w.strip()[:160] for w in where)
            print(f"{cases[current][0]:38s} {results[current]}", flush=True)
        start = current + 1
    failures = sum(not r.startswith("ok") for r in results.values())
    print(f"{failures} failing case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
