"""One forward and backward of the Triton power-retention kernels and nothing else, for a
profiler or a checker to wrap (Nsight Compute, compute-sanitizer), e.g. on the GPU machine:

    ncu --clock-control none -k regex:_state_scan -c 2 python benchmarks/kernel_once.py --T 65536
    RETENTION_TRITON_DKV=split compute-sanitizer --tool racecheck \\
        python benchmarks/kernel_once.py --T 1024 --batch 1 --heads 4 --kv-heads 2 --chunk 256 --state

The inputs and the loss are gpu_check.py's (make_case, run). --warmup runs that many unwrapped
passes first (compiling happens there; ncu's --launch-skip then skips their kernels). Without
CUDA it runs under TRITON_INTERPRET=1 on the CPU in float32: tiny shapes only (a check that
the script works).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=4096, help="sequence length")
    ap.add_argument("--batch", type=int, default=None, help="default: 65536 tokens / T")
    ap.add_argument("--heads", type=int, default=16, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--d", type=int, default=64, help="head dim")
    ap.add_argument("--chunk", type=int, default=None, help="default: the kernels' own rule")
    ap.add_argument("--state", action="store_true",
                    help="an initial state in and a loss on the final state")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--warmup", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:   # must be set before triton is imported (gpu_check imports the kernels)
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpu_check

    dev, dtype = ("cuda", getattr(torch, args.dtype)) if cuda else ("cpu", torch.float32)
    B = args.batch or max(1, 65536 // args.T)
    Hq, H = args.heads, args.kv_heads or args.heads
    case = gpu_check.make_case(B, args.T, Hq, H, args.d, True, args.state, dtype, 0, device=dev)
    fn = gpu_check.kernel_fn(args.chunk, state_out=args.state)
    for _ in range(args.warmup + 1):
        out = gpu_check.run(fn, *case, lambda a: a, 0)
    if cuda:
        torch.cuda.synchronize()
    finite = all(bool(torch.isfinite(t).all()) for t in out[3:] if t is not None)
    print(f"fwd+bwd once: B={B} T={args.T} heads={Hq}/{H} d={args.d} "
          f"chunk={args.chunk or 'default'} state={args.state} {dtype} on "
          f"{'cuda' if cuda else 'cpu (triton interpreter)'}; gradients finite: {finite}")
    return 0 if finite else 1


if __name__ == "__main__":
    raise SystemExit(main())
