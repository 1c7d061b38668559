"""The fused cross-entropy kernel (kernels/triton/loss.py) under TRITON_INTERPRET=1,
against F.cross_entropy on float32 logits: loss, gradient, ignored labels, evaluation without
a gradient, a scaled upstream gradient and torch.compile. Each check runs in a child process
(the interpreter must be on before triton is imported). By hand:
TRITON_INTERPRET=1 python tests/torch/test_triton_cross_entropy.py matches_torch
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")


@pytest.mark.parametrize("check", ["matches_torch", "no_grad_and_compile", "trainer_loss"])
def test_cross_entropy_interpreted(check):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, __file__, check], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{check} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"{check} passed" in proc.stdout


def _case(N, V, dtype, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, V, generator=g)).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[1] = -100          # ignored rows
    targets[4] = -100
    targets[2] = V - 1         # the last column, in the last (partial) block
    return logits, targets


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def check_matches_torch():
    import torch
    import torch.nn.functional as F

    from retention.kernels.triton import cross_entropy, loss as loss_kernels

    # V = 5000: two 4096-wide blocks, the second partial; the forward's sum by block and by
    # lane (CE_FWD's LANE_SUM); row 3's first block all -inf (a masked vocabulary).
    for dtype, tol, lane_sum in ((torch.float32, 1e-6, False), (torch.float32, 1e-6, True),
                                 (torch.float16, 1e-3, True)):
        loss_kernels.CE_FWD = (4096, 8, lane_sum)
        logits, targets = _case(6, 5000, dtype)
        logits[3, :4096] = float("-inf")
        targets[3] = 4500
        a = logits.clone().requires_grad_()
        b = logits.clone().requires_grad_()
        loss = cross_entropy(a, targets)
        want = F.cross_entropy(b.float(), targets)
        assert loss.dtype == torch.float32 and _rel(loss, want) < 1e-6, (loss, want)
        (0.5 * loss).backward()   # the backward scales the saved gradient by the upstream one
        (0.5 * want).backward()
        assert a.grad.dtype == dtype and _rel(a.grad, b.grad) < tol, _rel(a.grad, b.grad)
        assert (a.grad[1] == 0).all() and (a.grad[4] == 0).all()
    # Every row ignored: 0, not F.cross_entropy's nan; no row at all: 0 too.
    logits, targets = _case(6, 300, torch.float32)
    assert cross_entropy(logits, torch.full_like(targets, -100)).item() == 0.0
    assert cross_entropy(logits[:0], targets[:0]).item() == 0.0
    with pytest.raises(ValueError):
        cross_entropy(logits[None], targets)


def check_no_grad_and_compile():
    import torch
    import torch.nn.functional as F

    from retention.kernels.triton import cross_entropy

    logits, targets = _case(5, 700, torch.float32, seed=1)
    with torch.no_grad():   # evaluation: no gradient buffer
        loss = cross_entropy(logits, targets)
    assert _rel(loss, F.cross_entropy(logits, targets)) < 1e-6
    x = logits.clone().requires_grad_()
    compiled = torch.compile(lambda t: cross_entropy(t * 2.0, targets), fullgraph=True,
                             backend="aot_eager")
    got = compiled(x)
    (gx,) = torch.autograd.grad(got, x)
    y = logits.clone().requires_grad_()
    want = F.cross_entropy(y * 2.0, targets)
    (gy,) = torch.autograd.grad(want, y)
    assert _rel(got, want) < 1e-6 and _rel(gx, gy) < 1e-6


def check_trainer_loss():
    """The trainer's loss with the fused kernel equals its loss with F.cross_entropy, through
    the model's compute-dtype logits (upcast=False), gradients included."""
    import torch

    from retention.backends.torch.loss import cross_entropy
    from retention.backends.torch.model import build_model
    from retention.config import ModelConfig

    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                      head_dim=16, chunk_size=16, mlp_hidden=64)
    model = build_model(cfg, seed=0)
    model.impl = "ops"
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    losses, grads = [], []
    for fused in (True, True, False):   # twice: a second call must find the same function
        model.zero_grad()
        logits = model(tokens, upcast=not fused)
        loss = cross_entropy(logits, targets, fused)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert _rel(losses[0], losses[2]) < 1e-6 and _rel(grads[0], grads[2]) < 1e-5
    assert torch.equal(losses[0], losses[1])


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    name = sys.argv[1]
    globals()[f"check_{name}"]()
    print(f"{name} passed")
