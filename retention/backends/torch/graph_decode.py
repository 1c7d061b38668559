"""Token-by-token decode from fixed buffers, replayed as one CUDA graph per batch on CUDA.

A decode step of a small model is dozens of tiny kernels per layer; launched one by one from
Python their overhead (milliseconds) hides the step's real work, reading the fixed-size state
(tens of microseconds on a GPU). GraphDecoder keeps everything a step touches at fixed
addresses: the input tokens [B, 1], the position (a 0-d device tensor RoPE reads and the step
advances) and each layer's (S, z), updated in place. So the whole step is captured once with
torch.cuda.CUDAGraph and replayed per token: one launch, no per-token allocation.

Off CUDA (or with graph=False) the same step runs eagerly on the same buffers: that is what
the CPU tests compare with ordinary decoding, and it spares a CPU the state-sized allocation
per token.

    decoder = GraphDecoder(model, state)          # state: a ModelState after prefill (copied)
    logits_BV = decoder.step(tokens_B)            # a fixed buffer: read it before the next step
    decoder.offset, decoder.layers                # a ModelState's fields (duck-typed)

fuse=True (opt-in) runs each layer as two functions around the recurrent step, with the q/k/v/g
and gate/up projections as one matmul each, compiled by torch.compile (inductor) when
compile=True: a few fused kernels per layer instead of ~65, which is what a replayed graph
spends its time on. Same math as model.step; rounding differs a little.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch

import torch.nn.functional as F

from retention.backends.torch.model import ModelState, apply_rope
from retention.backends.torch.power_retention import power_retention_step_
from retention.reference import feature_dim

ENV_SWITCH = "RETENTION_CUDA_GRAPHS"   # "0" turns graph capture off everywhere


def graphs_enabled(model) -> bool:
    """Capture on CUDA unless model.cuda_graphs is False or RETENTION_CUDA_GRAPHS=0."""
    device = next(model.parameters()).device
    return (device.type == "cuda" and bool(getattr(model, "cuda_graphs", True))
            and os.environ.get(ENV_SWITCH, "1") != "0")


def _rms(x, weight, eps: float):
    xf = x.float()       # as model.RMSNorm
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


@lru_cache(maxsize=None)
def _layer_fns(n_heads: int, n_kv_heads: int, head_dim: int, norm_eps: float, gate_bias: float,
               compile: bool):
    """(pre, post) for one shape of layer, compiled once per process (not per decoder)."""
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim

    def pre(x_B1C, cos, sin, w_in, w_qkvg, w_qn, w_kn):
        B = x_B1C.shape[0]
        qkvg = F.linear(_rms(x_B1C, w_in, norm_eps), w_qkvg)
        q, k, v, g = qkvg.split([q_dim, kv_dim, kv_dim, n_kv_heads], dim=-1)
        q = _rms(q.reshape(B, 1, n_heads, head_dim), w_qn, norm_eps)
        k = _rms(k.reshape(B, 1, n_kv_heads, head_dim), w_kn, norm_eps)
        log_g = F.logsigmoid(gate_bias + g.float())
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return (q[:, 0].contiguous(), k[:, 0].contiguous(),
                v.reshape(B, n_kv_heads, head_dim).contiguous(), log_g[:, 0].contiguous())

    def post(x_B1C, y_BQd, w_o, w_post, w_gu, w_down):
        x = x_B1C + F.linear(y_BQd.reshape(x_B1C.shape[0], 1, q_dim), w_o)
        gate, up = F.linear(_rms(x, w_post, norm_eps), w_gu).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w_down)

    if compile:
        return (torch.compile(pre, fullgraph=True, dynamic=False),
                torch.compile(post, fullgraph=True, dynamic=False))
    return pre, post


class FusedLayers:
    """The decode step of every layer as pre (norm, one q/k/v/g matmul, q/k norms, RoPE, gate)
    -> recurrent step -> post (o_proj, residual, norm, one gate/up matmul, MLP, residual).
    Weights are read from the model once (the concatenated ones copied): build it again if the
    model's weights change."""

    def __init__(self, model, compile: bool = False):
        c = self.config = model.config
        self.model = model
        self.layers = []
        with torch.no_grad():
            for layer in model.model.layers:
                a, m = layer.self_attn, layer.mlp
                w_qkvg = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                                    a.g_proj.weight]).contiguous()
                w_gu = torch.cat([m.gate_proj.weight, m.up_proj.weight]).contiguous()
                self.layers.append(((layer.input_layernorm.weight, w_qkvg, a.q_norm.weight,
                                     a.k_norm.weight),
                                    (a.o_proj.weight, layer.post_attention_layernorm.weight,
                                     w_gu, m.down_proj.weight)))
        self.pre, self.post = _layer_fns(c.n_heads, c.n_kv_heads, c.head_dim,
                                         float(c.norm_eps), float(c.gate_bias), bool(compile))

    def __call__(self, tokens_B1, layers, position):
        """(logits [B,1,V], layers) like model._step_layers(..., inplace=True)."""
        m = self.model
        cos, sin = m._rope(position, 1, tokens_B1.device)
        x = m.model.embed_tokens(tokens_B1)
        for (pre_w, post_w), state in zip(self.layers, layers):
            q, k, v, log_g = self.pre(x, cos, sin, *pre_w)
            y = power_retention_step_(q, k, v, log_g, state, degree=self.config.degree,
                                      impl=m.impl)
            x = self.post(x, y, *post_w)
        return m._logits(x), layers


class GraphDecoder:
    """Decodes one batch of B rows (B fixed: another batch size needs another decoder).

    graph: None = graphs_enabled(model); True needs a CUDA model. warmup: eager steps before
    the capture (they load the kernels and cuBLAS handles the capture must not create; with
    compile=True they also compile). fuse / compile: see the module docstring (compile
    implies fuse).
    """

    def __init__(self, model, state: ModelState | None = None, *, batch_size: int | None = None,
                 graph: bool | None = None, warmup: int = 1, fuse: bool = False,
                 compile: bool = False):
        self.model = model
        self._fused = FusedLayers(model, compile=compile) if (fuse or compile) else None
        param = next(model.parameters())
        device = param.device
        if graph and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, got {device}; "
                             "pass graph=False")
        self.graph_enabled = graphs_enabled(model) if graph is None else bool(graph)
        self.warmup = max(1, int(warmup))
        c = model.config
        layers = [None] * c.n_layers if state is None else list(state.layers)
        if len(layers) != c.n_layers:
            raise ValueError(f"state has {len(layers)} layers, the model {c.n_layers}")
        given = next((S for S, _ in filter(None, layers)), None)
        B = given.shape[0] if given is not None else batch_size
        if B is None:
            raise ValueError("an empty state needs batch_size")
        # The step computes in float32 (float64 for a float64 model): the state is kept so.
        cdt = torch.float64 if param.dtype == torch.float64 else torch.float32
        D = feature_dim(c.head_dim, c.degree)
        with torch.inference_mode():
            self._layers = []
            for pair in layers:
                if pair is None:
                    pair = (torch.zeros(B, c.n_kv_heads, D, c.head_dim),
                            torch.zeros(B, c.n_kv_heads, D))
                S, z = pair
                # copy=True: the caller's state stays as it was.
                self._layers.append((S.to(device, cdt, copy=True).contiguous(),
                                     z.to(device, cdt, copy=True).contiguous()))
            self._offset = int(0 if state is None else state.offset)
            self.position = torch.tensor(self._offset, dtype=torch.long, device=device)
            self.tokens_B1 = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.batch_size = B
        self.device = device
        self._graph = None
        self._logits_B1V = None
        self._eager_steps = 0

    # --- what a ModelState has (so select_rows, state_to_numpy... take a decoder) ----------
    @property
    def layers(self) -> list:
        """The live (S, z) buffers of every layer (the next step overwrites them)."""
        return self._layers

    @property
    def offset(self) -> int:
        return self._offset

    def state(self) -> ModelState:
        """A copy of the current state, independent of further steps."""
        return ModelState([(S.clone(), z.clone()) for S, z in self._layers], self._offset)

    @property
    def captured(self) -> bool:
        return self._graph is not None

    # --- decoding ---------------------------------------------------------------------------
    def _body(self):
        """One token for every row, written into the buffers; the captured region."""
        if self._fused is not None:
            logits_B1V, _ = self._fused(self.tokens_B1, self._layers, self.position)
        else:
            logits_B1V, _ = self.model._step_layers(self.tokens_B1, self._layers,
                                                    self.position, inplace=True)
        self.position.add_(1)
        return logits_B1V

    def _eager(self):
        if not self.graph_enabled:
            return self._body()
        # Warm-up on a side stream, as torch.cuda.graphs recommends before a capture.
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            logits = self._body()
        current.wait_stream(side)
        return logits

    def _capture(self):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._body()
        self._graph, self._logits_B1V = graph, logits

    @torch.inference_mode()
    def step(self, tokens) -> torch.Tensor:
        """Logits [B, V] (float32) after reading tokens [B] (or [B, 1]; any int array). They
        live in a buffer the next step overwrites: copy what must outlive it."""
        tokens = torch.as_tensor(tokens)
        if tokens.numel() != self.batch_size or tokens.ndim not in (1, 2):
            raise ValueError(f"this decoder steps {self.batch_size} rows: give tokens "
                             f"[{self.batch_size}] or [{self.batch_size}, 1], got "
                             f"{tuple(tokens.shape)}")
        self.tokens_B1.copy_(tokens.reshape(self.batch_size, 1))
        if self._graph is None and self.graph_enabled and self._eager_steps >= self.warmup:
            self._capture()          # records the step without running it
        if self._graph is not None:
            self._graph.replay()
        else:
            self._logits_B1V = self._eager()
            self._eager_steps += 1
        self._offset += 1
        return self._logits_B1V[:, 0]


__all__ = ["GraphDecoder", "graphs_enabled", "ENV_SWITCH"]
