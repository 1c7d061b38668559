"""Activation checkpointing and torch.compile per decoder layer (backends/torch/fsdp.py
wrap_layers, used by the trainer's --activation-checkpointing and --compile): each layer must
trace whole. One graph break inside checkpoint's traced region sends that layer back to eager
with no error at all (the 7B profile showed it: 43% of the step in eager elementwise kernels).
The kernel path's twin of this test runs under the Triton interpreter
(test_triton_interpret.py, check "checkpointed_compiled_layers")."""
from __future__ import annotations

import importlib

import pytest

torch = pytest.importorskip("torch")


def check_layers_trace_whole(impl: str) -> None:
    """Loss and gradients of a small model with checkpointed, compiled layers (aot_eager: the
    graph breaks are dynamo's, whatever the backend) against the plain model; no graph
    break, one graph for all layers."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from retention.backends.torch.fsdp import wrap_layers
    from retention.backends.torch.model import build_model
    from retention.config import create_model_config

    cfg = create_model_config("tiny", d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                              head_dim=32, mlp_hidden=96, vocab_size=97)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    plain, wrapped = build_model(cfg, seed=1), build_model(cfg, seed=1)
    plain.impl = wrapped.impl = impl
    compile_layer = torch.nn.Module.compile
    torch.nn.Module.compile = lambda self, **kw: compile_layer(self, backend="aot_eager")
    try:
        wrap_layers(wrapped, activation_checkpointing=True, compile=True)
    finally:
        torch.nn.Module.compile = compile_layer
    pr = importlib.import_module("retention.backends.torch.power_retention")
    pr._resolved.clear()   # the first call resolves the path inside the traced region, as in
    torch._dynamo.reset()  # a fresh trainer
    counters.clear()
    losses = []
    for model in (wrapped, plain):
        loss = model(tokens).float().logsumexp(-1).mean()
        loss.backward()
        losses.append(loss)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointed_compiled_layers_trace_whole():
    check_layers_trace_whole("ops")
