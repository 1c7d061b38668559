"""RetentionLLM on MLX (DESIGN section 2). The module tree mirrors the canonical parameter names:
`tree_flatten(model.parameters())` yields `model.layers.0.self_attn.q_proj.weight` and friends,
so checkpoints need no renaming.

Legend: B batch, T tokens, E d_model, Q query heads, H KV heads, d head_dim, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from retention.config import ModelConfig
from retention.params import init_std, parameter_shapes
from retention.backends.mlx.power_retention import power_retention, power_retention_step


@dataclass
class ModelState:
    """Decoding state: one (S [B,H,D,d], z [B,H,D]) float32 pair per layer, and how many
    tokens have been seen (the RoPE position of the next token)."""
    layers: list = field(default_factory=list)
    offset: int = 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x):
        # Normalise in float32 whatever the parameter dtype, then cast back.
        x32 = x.astype(mx.float32)
        y = x32 * mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight).astype(x.dtype)


@lru_cache(maxsize=None)
def _inv_freq(head_dim: int, theta: float):
    # float32 arithmetic, as the torch backend and Hugging Face compute it.
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return mx.array(np.float32(1.0) / np.float32(theta) ** exponents)


def apply_rope(x_BTHd, offset: int, theta: float):
    """Rotary embedding, Hugging Face Llama convention (rotate_half over non-interleaved halves);
    angles for positions offset..offset+T-1 in float32."""
    T, hd = x_BTHd.shape[1], x_BTHd.shape[-1]
    positions = mx.arange(offset, offset + T, dtype=mx.float32)
    angles_Th = positions[:, None] * _inv_freq(hd, float(theta))[None, :]
    angles_Td = mx.concatenate([angles_Th, angles_Th], axis=-1)[:, None, :]
    cos, sin = mx.cos(angles_Td), mx.sin(angles_Td)
    x = x_BTHd.astype(mx.float32)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    rotated = mx.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x_BTHd.dtype)


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

    def _project(self, x_BTE, offset: int):
        c = self.config
        B, T, _ = x_BTE.shape
        q_BTQd = self.q_norm(self.q_proj(x_BTE).reshape(B, T, c.n_heads, c.head_dim))
        k_BTHd = self.k_norm(self.k_proj(x_BTE).reshape(B, T, c.n_kv_heads, c.head_dim))
        v_BTHd = self.v_proj(x_BTE).reshape(B, T, c.n_kv_heads, c.head_dim)
        q_BTQd = apply_rope(q_BTQd, offset, c.rope_theta)
        k_BTHd = apply_rope(k_BTHd, offset, c.rope_theta)
        log_g_BTH = nn.log_sigmoid(c.gate_bias + self.g_proj(x_BTE).astype(mx.float32))
        return q_BTQd, k_BTHd, v_BTHd, log_g_BTH

    def __call__(self, x_BTE, offset: int = 0, state=None, return_state: bool = False,
                 impl: str = "auto"):
        """Chunked form over T tokens; with return_state, also the (S, z) after them."""
        c = self.config
        B, T, _ = x_BTE.shape
        q, k, v, log_g = self._project(x_BTE, offset)
        out = power_retention(q, k, v, log_g, degree=c.degree, chunk_size=c.chunk_size,
                              initial_state=state, return_state=return_state, impl=impl)
        y_BTQd, new_state = out if return_state else (out, None)
        return self.o_proj(y_BTQd.reshape(B, T, c.q_dim)), new_state

    def step(self, x_B1E, offset: int, state, impl: str = "auto"):
        """One token with the recurrent form."""
        c = self.config
        B = x_B1E.shape[0]
        q, k, v, log_g = self._project(x_B1E, offset)
        y_BQd, new_state = power_retention_step(q[:, 0], k[:, 0], v[:, 0], log_g[:, 0], state,
                                                degree=c.degree, impl=impl)
        return self.o_proj(y_BQd.reshape(B, 1, c.q_dim)), new_state


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def __call__(self, x_BTE, offset=0, state=None, return_state=False, step=False,
                 impl="auto"):
        h = self.input_layernorm(x_BTE)
        if step:
            a, new_state = self.self_attn.step(h, offset, state, impl)
        else:
            a, new_state = self.self_attn(h, offset, state, return_state, impl)
        x_BTE = x_BTE + a
        return x_BTE + self.mlp(self.post_attention_layernorm(x_BTE)), new_state


class Backbone(nn.Module):
    """The `model.` prefix of the canonical names: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = [DecoderLayer(config) for _ in range(config.n_layers)]
        self.norm = RMSNorm(config.d_model, config.norm_eps)


class RetentionLLM(nn.Module):
    """model(tokens_BT) -> float32 logits [B,T,V]; prefill/step for decoding."""

    # Which power-retention path the layers use ("auto" | "kernel" | "ops").
    impl: str = "auto"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def _run(self, tokens_BT, state: ModelState | None, return_state: bool, step: bool):
        tokens_BT = mx.array(tokens_BT) if not isinstance(tokens_BT, mx.array) else tokens_BT
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must be [B, T] integers, got shape {tokens_BT.shape}")
        offset = 0 if state is None else state.offset
        layer_states = [None] * len(self.model.layers) if state is None else state.layers
        if len(layer_states) != len(self.model.layers):
            raise ValueError(f"state has {len(layer_states)} layers, the model "
                             f"{len(self.model.layers)}")
        x_BTE = self.model.embed_tokens(tokens_BT)
        new_states = []
        for layer, layer_state in zip(self.model.layers, layer_states):
            x_BTE, new_state = layer(x_BTE, offset, layer_state, return_state, step, self.impl)
            new_states.append(new_state)
        h_BTE = self.model.norm(x_BTE)
        if self.config.tie_embeddings:
            logits_BTV = self.model.embed_tokens.as_linear(h_BTE)
        else:
            logits_BTV = self.lm_head(h_BTE)
        logits_BTV = logits_BTV.astype(mx.float32)
        if not (return_state or step):
            return logits_BTV, None
        return logits_BTV, ModelState(new_states, offset + tokens_BT.shape[1])

    def __call__(self, tokens_BT):
        """Logits [B,T,V] float32 of the full chunked forward."""
        return self._run(tokens_BT, None, return_state=False, step=False)[0]

    def prefill(self, tokens_BT, state: ModelState | None = None):
        """Chunked forward that also returns the decoding state (continuing `state` if given)."""
        return self._run(tokens_BT, state, return_state=True, step=False)

    def step(self, tokens, state: ModelState | None = None):
        """One recurrent step: tokens [B] -> logits [B,V], or [B,1] -> [B,1,V]."""
        tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
        if tokens.ndim == 1:
            logits, state = self._run(tokens[:, None], state, return_state=False, step=True)
            return logits[:, 0], state
        if tokens.ndim != 2 or tokens.shape[1] != 1:
            raise ValueError(f"step takes tokens [B] or [B, 1], got shape {tokens.shape}; "
                             "use prefill for several tokens")
        return self._run(tokens, state, return_state=False, step=True)

    # --- generation (retention/generation.py is the loop; added by the generation issue) -----
    def generate(self, tokens, max_new_tokens: int = 256, **kwargs):
        """Prompt(s) + new tokens; see retention.generation.generate for the arguments."""
        from retention.backends.mlx.generate import generate
        return generate(self, tokens, max_new_tokens, **kwargs)

    def stream_generate(self, tokens, max_new_tokens: int = 256, **kwargs):
        """Tokens as they are sampled; see retention.generation.stream_generate."""
        from retention.backends.mlx.generate import stream_generate
        return stream_generate(self, tokens, max_new_tokens, **kwargs)

    def reset_states(self) -> None:
        """No-op: generation is stateless unless a PromptState is passed (guide compatibility)."""
        from retention.backends.mlx.generate import reset_states
        reset_states(self)


def init_parameters(model: RetentionLLM, seed: int = 0) -> None:
    """normal(0, init_std(name)) for matrices, ones for norms, from a key derived from seed."""
    config = model.config
    shapes = parameter_shapes(config)
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    values = []
    for key, (name, shape) in zip(keys, shapes.items()):
        std = init_std(name, config)
        value = mx.ones(shape) if std is None else std * mx.random.normal(shape, key=key)
        values.append((name, value))
    model.load_weights(values, strict=True)


def build_model(config: ModelConfig, seed: int = 0) -> RetentionLLM:
    """A freshly initialised float32 model; the same seed gives the same parameters."""
    mx.random.seed(seed)
    model = RetentionLLM(config)
    init_parameters(model, seed)
    mx.eval(model.parameters())
    return model
