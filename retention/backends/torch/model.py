"""RetentionLLM on torch (DESIGN section 2): a pre-norm decoder whose attention is gated power
retention. Module names mirror the canonical parameter names of retention.params, so
`named_parameters()` is the checkpoint layout as it stands.

Shapes: tokens_BT [B,T], x_BTC [B,T,d_model], q_BTQd [B,T,Hq,hd], k/v_BTHd [B,T,H,hd].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from retention.config import ModelConfig
from retention.params import init_std, parameter_shapes
from retention.backends.torch.power_retention import (power_retention, power_retention_step,
                                                      power_retention_step_)


@dataclass
class ModelState:
    """Recurrent state after some tokens: (S [B,H,D,hd], z [B,H,D]) per layer, float32, and
    the number of tokens seen (the RoPE offset of the next token): an int, or a 0-d integer
    tensor on the model's device (what a captured CUDA graph advances; see graph_decode.py)."""
    layers: list = field(default_factory=list)
    offset: int = 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


def rope_cos_sin(offset, T: int, head_dim: int, theta: float, device):
    """cos, sin [T, hd] in float32 for positions offset..offset+T-1 (HF rotate_half layout).
    offset: an int, or a 0-d tensor on `device`, so a captured CUDA graph can advance it."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device,
                                            dtype=torch.float32) / head_dim)
    if isinstance(offset, torch.Tensor):   # exact: integer positions < 2**24 in float32
        pos = torch.arange(T, device=device, dtype=torch.float32) + offset.to(torch.float32)
    else:
        pos = torch.arange(offset, offset + T, device=device, dtype=torch.float32)
    angles = torch.cat([torch.outer(pos, inv_freq)] * 2, dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x_BTHd, cos_Td, sin_Td):
    xf = x_BTHd.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos_Td[:, None, :], sin_Td[:, None, :]
    return (xf * cos + rotated * sin).to(x_BTHd.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.config = c
        self.q_proj = nn.Linear(c.d_model, c.q_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.kv_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.kv_dim, bias=False)
        self.g_proj = nn.Linear(c.d_model, c.n_kv_heads, bias=False)
        self.o_proj = nn.Linear(c.q_dim, c.d_model, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps)

    def qkvg(self, x_BTC, cos, sin):
        c, (B, T, _) = self.config, x_BTC.shape
        q = self.q_norm(self.q_proj(x_BTC).view(B, T, c.n_heads, c.head_dim))
        k = self.k_norm(self.k_proj(x_BTC).view(B, T, c.n_kv_heads, c.head_dim))
        v = self.v_proj(x_BTC).view(B, T, c.n_kv_heads, c.head_dim)
        log_g = F.logsigmoid(c.gate_bias + self.g_proj(x_BTC).float())       # [B,T,H]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, log_g

    def forward(self, x_BTC, cos, sin, state=None, return_state=False, impl="auto"):
        c, (B, T, _) = self.config, x_BTC.shape
        q, k, v, log_g = self.qkvg(x_BTC, cos, sin)
        out = power_retention(q, k, v, log_g, degree=c.degree, chunk_size=c.chunk_size,
                              initial_state=state, return_state=return_state, impl=impl)
        y, new_state = out if return_state else (out, None)
        return self.o_proj(y.reshape(B, T, c.q_dim)), new_state

    def step(self, x_B1C, cos, sin, state, impl="auto", inplace=False):
        c, B = self.config, x_B1C.shape[0]
        q, k, v, log_g = self.qkvg(x_B1C, cos, sin)
        if inplace:   # the state's own buffers take the new state (GraphDecoder)
            y = power_retention_step_(q[:, 0], k[:, 0], v[:, 0], log_g[:, 0], state,
                                      degree=c.degree, impl=impl)
            new_state = state
        else:
            y, new_state = power_retention_step(q[:, 0], k[:, 0], v[:, 0], log_g[:, 0], state,
                                                degree=c.degree, impl=impl)
        return self.o_proj(y.reshape(B, 1, c.q_dim)), new_state


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, state=None, return_state=False, step=False, impl="auto",
                inplace=False):
        h = self.input_layernorm(x)
        if step:
            a, new_state = self.self_attn.step(h, cos, sin, state, impl=impl, inplace=inplace)
        else:
            a, new_state = self.self_attn(h, cos, sin, state, return_state, impl=impl)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), new_state


class Body(nn.Module):
    """The `model.` prefix of the canonical names."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)


class RetentionLLM(nn.Module):
    """model(tokens_BT) -> float32 logits [B,T,vocab]; prefill/step for decoding.

    Construction allocates float32 parameters on `device` (CPU by default) and initialises them
    from `seed`; `init=False` leaves them uninitialised for a loader to fill.
    """

    # Which power-retention path the layers use ("auto" | "kernel" | "ops").
    impl: str = "auto"
    # generate/stream_generate replay the decode step as a CUDA graph on CUDA devices
    # (retention/backends/torch/graph_decode.py); False runs it eagerly.
    cuda_graphs: bool = True

    def __init__(self, config: ModelConfig, *, seed: int = 0, device=None, init: bool = True):
        super().__init__()
        self.config = config
        with torch.device("meta"):  # no throwaway default init
            self.model = Body(config)
            if not config.tie_embeddings:
                self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.to_empty(device=torch.device("cpu") if device is None else device)
        if init:
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """normal(0, init_std(name)) for matrices, ones for norms, drawn in canonical order on
        the CPU so a seed gives the same weights on every device."""
        generator = torch.Generator().manual_seed(seed)
        params = dict(self.named_parameters())
        for name, shape in parameter_shapes(self.config).items():
            std = init_std(name, self.config)
            value = (torch.ones(shape) if std is None
                     else torch.empty(shape).normal_(0.0, std, generator=generator))
            params[name].copy_(value)

    # --- forward paths --------------------------------------------------------------------
    def _logits(self, x_BTC, upcast: bool = True):
        h = self.model.norm(x_BTC)
        weight = self.model.embed_tokens.weight if self.config.tie_embeddings \
            else self.lm_head.weight
        logits = F.linear(h, weight)
        return logits.float() if upcast else logits

    def _rope(self, offset, T: int, device):
        c = self.config
        return rope_cos_sin(offset, T, c.head_dim, c.rope_theta, device)

    def _run(self, tokens_BT, state: ModelState | None, return_state: bool,
             upcast: bool = True):
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must be [B,T] integers, got shape {tuple(tokens_BT.shape)}")
        offset = 0 if state is None else state.offset
        cos, sin = self._rope(offset, tokens_BT.shape[1], tokens_BT.device)
        x = self.model.embed_tokens(tokens_BT)
        layer_states = []
        for i, layer in enumerate(self.model.layers):
            init = None if state is None else state.layers[i]
            x, s = layer(x, cos, sin, init, return_state, impl=self.impl)
            layer_states.append(s)
        new_state = ModelState(layer_states, offset + tokens_BT.shape[1]) if return_state else None
        return self._logits(x, upcast), new_state

    def forward(self, tokens_BT, *, upcast: bool = True):
        """Logits [B,T,vocab], float32; upcast=False leaves them in the compute dtype (bf16
        under autocast) for a loss that reads them as they are (backends/torch/loss.py)."""
        return self._run(tokens_BT, None, False, upcast)[0]

    def prefill(self, tokens_BT, state: ModelState | None = None):
        """Chunked form over a prompt -> (logits [B,T,V], state after it)."""
        return self._run(tokens_BT, state, True)

    def step(self, tokens, state: ModelState | None = None):
        """One token per sequence (tokens [B] or [B,1]) -> (logits [B,V] or [B,1,V], state)."""
        squeeze = tokens.ndim == 1
        tokens_B1 = tokens[:, None] if squeeze else tokens
        if tokens_B1.ndim != 2 or tokens_B1.shape[1] != 1:
            raise ValueError(f"step takes tokens [B] or [B,1], got shape {tuple(tokens.shape)}; "
                             "use prefill for longer inputs")
        state = ModelState([None] * self.config.n_layers, 0) if state is None else state
        logits, layer_states = self._step_layers(tokens_B1, state.layers, state.offset)
        return (logits[:, 0] if squeeze else logits), ModelState(layer_states, state.offset + 1)

    def _step_layers(self, tokens_B1, layers, offset, inplace: bool = False):
        """(logits [B,1,V], new layer states) of one token at position `offset` (int or 0-d
        tensor); inplace=True writes each layer's new (S, z) into the given tensors."""
        cos, sin = self._rope(offset, 1, tokens_B1.device)
        x = self.model.embed_tokens(tokens_B1)
        layer_states = []
        for i, layer in enumerate(self.model.layers):
            x, s = layer(x, cos, sin, layers[i], step=True, impl=self.impl, inplace=inplace)
            layer_states.append(s)
        return self._logits(x), layer_states

    # --- generation (retention/generation.py is the loop; added by the generation issue) -----
    def generate(self, tokens, max_new_tokens: int = 256, **kwargs):
        """Prompt(s) + new tokens; see retention.generation.generate for the arguments."""
        from retention.backends.torch.generate import generate
        return generate(self, tokens, max_new_tokens, **kwargs)

    def stream_generate(self, tokens, max_new_tokens: int = 256, **kwargs):
        """Tokens as they are sampled; see retention.generation.stream_generate."""
        from retention.backends.torch.generate import stream_generate
        return stream_generate(self, tokens, max_new_tokens, **kwargs)

    def reset_states(self) -> None:
        """No-op: generation is stateless unless a PromptState is passed (guide compatibility)."""
        from retention.backends.torch.generate import reset_states
        reset_states(self)


def build_model(config: ModelConfig, seed: int = 0, device=None) -> RetentionLLM:
    """A freshly initialised float32 model; the same seed gives the same weights anywhere."""
    return RetentionLLM(config, seed=seed, device=device)
