"""Generation glue for MLX (the torch backend has the same functions): runs prefill/step,
evaluates the lazy graph each token (so state graphs never grow), hands logits to the core
loop as float32 NumPy, and converts states to and from PromptState.
The loop itself is retention.generation."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from retention import generation
from retention.prompt_state import PromptState, config_hash
from retention.backends.mlx.model import ModelState

name = "mlx"


def _last_logits(logits) -> np.ndarray:
    logits_BV = logits[:, -1] if logits.ndim == 3 else logits
    return np.array(logits_BV.astype(mx.float32))


def _evaluated(logits, state: ModelState):
    mx.eval(logits, [list(pair) for pair in state.layers])
    return _last_logits(logits), state


def prefill(model, tokens_BT: np.ndarray, state: ModelState | None):
    tokens = mx.array(np.asarray(tokens_BT, dtype=np.int32))
    return _evaluated(*model.prefill(tokens, state))


def step(model, tokens_B: np.ndarray, state: ModelState):
    tokens = mx.array(np.asarray(tokens_B, dtype=np.int32))
    return _evaluated(*model.step(tokens, state))


def select_rows(state: ModelState, rows) -> ModelState:
    if not state.layers or state.layers[0] is None:
        return state
    index = mx.array(np.asarray(rows, dtype=np.int32))
    return ModelState([(S[index], z[index]) for S, z in state.layers], state.offset)


def state_nbytes(state: ModelState) -> int:
    return sum(S.nbytes + z.nbytes for S, z in state.layers if S is not None)


def state_to_numpy(state: ModelState, config=None) -> PromptState:
    layers = [(np.array(S.astype(mx.float32)), np.array(z.astype(mx.float32)))
              for S, z in state.layers]
    return PromptState(layers, state.offset, None,
                       None if config is None else config_hash(config))


def state_from_numpy(model, prompt_state: PromptState) -> ModelState:
    as_mx = lambda a: mx.array(np.asarray(a, dtype=np.float32))  # noqa: E731
    layers = [(as_mx(S), as_mx(z)) for S, z in prompt_state.layers]
    return ModelState(layers, int(prompt_state.offset))


# --- what RetentionLLM.generate / stream_generate / reset_states call ---------------------
def generate(model, tokens, max_new_tokens: int = 256, **kwargs) -> generation.Generation:
    return generation.generate(model, tokens, max_new_tokens, backend=name, **kwargs)


def stream_generate(model, tokens, max_new_tokens: int = 256,
                    **kwargs) -> generation.GenerationStream:
    return generation.stream_generate(model, tokens, max_new_tokens, backend=name, **kwargs)


def reset_states(model) -> None:
    """Generation is stateless (each call starts empty unless state= is given), so there is
    nothing to clear; kept so code written for the guide runs unchanged."""
    return None
