"""The training loss on one GPU: the fused Triton cross entropy (kernels/triton/loss.py)
against torch's F.cross_entropy on float32 logits (what the trainer did before), forward +
backward milliseconds and the largest differences, for a 65,536-token step over the 50,304-token
vocabulary of the presets (bf16 logits, 5% of the labels ignored).

    python benchmarks/cross_entropy.py [--tokens 65536] [--vocab 50304]
"""
from __future__ import annotations

import argparse
import time


def main():
    import torch
    import torch.nn.functional as F
    import triton
    import triton.testing

    from retention.kernels.triton import cross_entropy

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--vocab", type=int, default=50304)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(args.tokens, args.vocab, device="cuda", generator=g)
              ).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device="cuda", generator=g)
    targets[torch.rand(args.tokens, device="cuda", generator=g) < 0.05] = -100
    torch_loss = lambda: F.cross_entropy(logits.float(), targets)
    fused_loss = lambda: cross_entropy(logits, targets)
    results = {}
    for name, fn in (("torch (float32 logits)", torch_loss), ("fused (Triton)", fused_loss)):
        loss = fn()
        (grad,) = torch.autograd.grad(loss, logits)
        ms = triton.testing.do_bench(lambda: fn().backward(), grad_to_none=[logits],
                                     return_mode="median")
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        logits.grad = None
        results[name] = (loss.detach(), grad, ms, peak)
    (l0, g0, _, _), (l1, g1, _, _) = results.values()
    print(f"{time.strftime('%Y-%m-%d')} | {torch.cuda.get_device_name()} | "
          f"torch {torch.__version__} | triton {triton.__version__} | N={args.tokens} "
          f"V={args.vocab} bf16 logits")
    print("| loss | fwd+bwd ms | extra peak GiB |\n|---|---:|---:|")
    for name, (_, _, ms, peak) in results.items():
        print(f"| {name} | {ms:.2f} | {peak:.1f} |")
    print(f"loss difference {abs(l0.item() - l1.item()):.2e} (loss {l0.item():.5f}); gradient: "
          f"max abs difference {(g0.float() - g1.float()).abs().max().item():.2e}, "
          f"max abs {g0.float().abs().max().item():.2e}")


if __name__ == "__main__":
    main()
