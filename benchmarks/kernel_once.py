"""One forward and backward of the Triton power-retention kernels and nothing else, for a
profiler or a checker to wrap (Nsight Compute, compute-sanitizer), e.g. on the GPU machine:

    ncu --clock-control none -k regex:_state_scan -c 2 python benchmarks/kernel_once.py --T 65536
    RETENTION_TRITON_DKV=split compute-sanitizer --tool racecheck \\
        python benchmarks/kernel_once.py --T 1024 --batch 1 --heads 4 --kv-heads 2 --chunk 256 --state

--warmup runs that many unwrapped passes first (compiling happens there; ncu's --launch-skip
then skips their kernels). Without CUDA it runs under TRITON_INTERPRET=1 on the CPU in float32:
tiny shapes only (a check that the script works).
"""
from __future__ import annotations

import argparse
import os


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
    import torch.nn.functional as F

    cuda = torch.cuda.is_available()
    if not cuda:   # must be set before triton is imported
        os.environ["TRITON_INTERPRET"] = "1"
    from retention.kernels.triton import power_retention
    from retention.reference import feature_index

    dev, dtype = ("cuda", getattr(torch, args.dtype)) if cuda else ("cpu", torch.float32)
    B = args.batch or max(1, 65536 // args.T)
    Hq, H, d, T = args.heads, args.kv_heads or args.heads, args.d, args.T
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=dev, generator=g)
    leaves = [rnd(B, T, Hq, d).to(dtype), rnd(B, T, H, d).to(dtype), rnd(B, T, H, d).to(dtype),
              F.logsigmoid(3.0 + rnd(B, T, H))]
    if args.state:   # small and positive-definite enough for the denominators
        D = len(feature_index(d, 2)[0])
        leaves += [1e-3 * rnd(B, H, D, d), 1e-2 + 1e-3 * rnd(B, H, D).abs()]
    leaves = [a.requires_grad_() for a in leaves]
    upstream = rnd(B, T, Hq, d).to(dtype)

    def once():
        q, k, v, lg = leaves[:4]
        st = tuple(leaves[4:]) or None
        if args.state:
            y, (S, z) = power_retention(q, k, v, lg, chunk_size=args.chunk, initial_state=st,
                                        return_state=True)
            loss = (y.float() * upstream.float()).sum() + 1e-3 * (S.sum() + z.sum())
        else:
            y = power_retention(q, k, v, lg, chunk_size=args.chunk)
            loss = (y.float() * upstream.float()).sum()
        return torch.autograd.grad(loss, leaves)

    for _ in range(args.warmup):
        once()
    grads = once()
    if cuda:
        torch.cuda.synchronize()
    finite = all(bool(torch.isfinite(gr).all()) for gr in grads)
    print(f"fwd+bwd once: B={B} T={T} heads={Hq}/{H} d={d} chunk={args.chunk or 'default'} "
          f"state={args.state} {dtype} on {'cuda' if cuda else 'cpu (triton interpreter)'}; "
          f"gradients finite: {finite}")
    return 0 if finite else 1


if __name__ == "__main__":
    raise SystemExit(main())
