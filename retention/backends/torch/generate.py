"""Generation glue for torch (the MLX backend has the same functions): runs prefill/step
without autograd on the model's device, hands logits to the core loop as float32 NumPy, and
converts states to and from PromptState. The loop itself is retention.generation.

Decode steps go through a GraphDecoder (graph_decode.py): the state lives in fixed buffers
updated in place and, on CUDA, each step is one CUDA-graph replay (model.cuda_graphs = False
or RETENTION_CUDA_GRAPHS=0 turns capture off). `step` therefore returns the decoder as the
new state and advances it in place when it is given one back: the state handed to `step`
is consumed, as in the core loop."""
from __future__ import annotations

import numpy as np
import torch

from retention import generation
from retention.prompt_state import PromptState, config_hash
from retention.backends.torch.graph_decode import GraphDecoder
from retention.backends.torch.model import ModelState

name = "torch"


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _last_logits(logits) -> np.ndarray:
    logits_BV = logits[:, -1] if logits.ndim == 3 else logits
    return logits_BV.float().cpu().numpy()


@torch.inference_mode()
def prefill(model, tokens_BT: np.ndarray, state: ModelState | None):
    tokens = torch.from_numpy(np.asarray(tokens_BT, dtype=np.int64)).to(_device(model))
    logits, new_state = model.prefill(tokens, state)
    return _last_logits(logits), new_state


@torch.inference_mode()
def step(model, tokens_B: np.ndarray, state):
    """(logits [B, V], decoder): a ModelState (or None) is copied into a new GraphDecoder
    once; a GraphDecoder from the previous step is advanced in place."""
    tokens = torch.from_numpy(np.asarray(tokens_B, dtype=np.int64).reshape(-1))
    if not isinstance(state, GraphDecoder) or state.batch_size != tokens.shape[0]:
        state = GraphDecoder(model, state, batch_size=tokens.shape[0])
    return _last_logits(state.step(tokens)), state


def select_rows(state, rows) -> ModelState:
    """The rows' state as a ModelState (from a ModelState or a GraphDecoder)."""
    if not state.layers or state.layers[0] is None:
        return state
    index = torch.as_tensor(rows, dtype=torch.long, device=state.layers[0][0].device)
    return ModelState([(S.index_select(0, index), z.index_select(0, index))
                       for S, z in state.layers], state.offset)


def state_nbytes(state) -> int:
    return sum(S.numel() * S.element_size() + z.numel() * z.element_size()
               for S, z in state.layers if S is not None)


def state_to_numpy(state, config=None) -> PromptState:
    layers = [(S.detach().float().cpu().numpy(), z.detach().float().cpu().numpy())
              for S, z in state.layers]
    return PromptState(layers, state.offset, None,
                       None if config is None else config_hash(config))


def state_from_numpy(model, prompt_state: PromptState) -> ModelState:
    # copy=True: a step that updated its state in place must never write into the PromptState.
    device = _device(model)
    as_torch = lambda a: torch.from_numpy(  # noqa: E731
        np.ascontiguousarray(a, dtype=np.float32)).to(device, copy=True)
    layers = [(as_torch(S), as_torch(z)) for S, z in prompt_state.layers]
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
