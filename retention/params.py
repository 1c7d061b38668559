"""Canonical parameter names and shapes (Hugging Face Llama/Qwen3 convention, DESIGN section 2).

Both backends expose exactly these names, so a checkpoint is the same file whoever wrote it.
"""
from __future__ import annotations

import math

from retention.config import ModelConfig


def layer_parameter_shapes(config: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    c, p = config, f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (c.d_model,),
        p + "self_attn.q_proj.weight": (c.q_dim, c.d_model),
        p + "self_attn.k_proj.weight": (c.kv_dim, c.d_model),
        p + "self_attn.v_proj.weight": (c.kv_dim, c.d_model),
        p + "self_attn.g_proj.weight": (c.n_kv_heads, c.d_model),
        p + "self_attn.q_norm.weight": (c.head_dim,),
        p + "self_attn.k_norm.weight": (c.head_dim,),
        p + "self_attn.o_proj.weight": (c.d_model, c.q_dim),
        p + "post_attention_layernorm.weight": (c.d_model,),
        p + "mlp.gate_proj.weight": (c.mlp_hidden, c.d_model),
        p + "mlp.up_proj.weight": (c.mlp_hidden, c.d_model),
        p + "mlp.down_proj.weight": (c.d_model, c.mlp_hidden),
    }


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model, name -> shape, in a fixed order."""
    shapes = {"model.embed_tokens.weight": (config.vocab_size, config.d_model)}
    for i in range(config.n_layers):
        shapes.update(layer_parameter_shapes(config, i))
    shapes["model.norm.weight"] = (config.d_model,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.d_model)
    return shapes


def count_parameters(config: ModelConfig) -> int:
    return sum(math.prod(s) for s in parameter_shapes(config).values())


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def init_std(name: str, config: ModelConfig) -> float | None:
    """Standard deviation of the normal init for `name`; None means initialise to ones.

    Residual output projections are scaled by 1/sqrt(2 * n_layers) (GPT-2) so the residual
    stream's variance does not grow with depth.
    """
    if is_norm(name):
        return None
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return config.init_std / math.sqrt(2 * config.n_layers)
    return config.init_std


def decays(name: str) -> bool:
    """Whether AdamW applies weight decay: matrices yes; norms and the gate projection no."""
    return not is_norm(name) and not name.endswith("g_proj.weight")
