"""The backend-neutral generation loop: chunked prefill of each prompt, then one recurrent
step per new token, sampling on host logits (retention.sampling).

Decoding keeps only each layer's (S, z): no work or memory grows with the context.
The framework-specific pieces (running prefill/step without autograd, moving tokens and
logits, slicing states by row) live in retention/backends/<name>/generate.py, which has the
same functions on every backend:

    prefill(model, tokens_BT, state) -> (logits_BV, state)   # numpy in/out, state opaque
    step(model, tokens_B, state) -> (logits_BV, state)
    select_rows(state, rows) -> state
    state_to_numpy(state, config) -> PromptState;  state_from_numpy(model, prompt_state)
    state_nbytes(state) -> int

Ragged batches: prompts of different lengths sit at different RoPE offsets, and a model state
holds one offset, so rows are grouped by prompt length; each group is prefilled and stepped as
one batch (a step per distinct length per token). Rows that stop leave their group.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from retention.prompt_state import PromptState, config_hash
from retention.sampling import Sampler, SamplingParams


# --- inputs -------------------------------------------------------------------------------
def backend_ops(model, backend=None):
    """The generate-glue module for `backend` (a name, a backend module, or None = the
    model's own backend); an object that already has the glue functions is used as is."""
    if all(hasattr(backend, f) for f in ("prefill", "step", "select_rows", "state_nbytes")):
        return backend
    if backend is None:
        from retention.backends import backend_of
        backend = backend_of(model)
    name = backend if isinstance(backend, str) else getattr(backend, "name", None)
    if name not in ("torch", "mlx"):
        raise ValueError(f"unknown backend {backend!r}; use 'torch' or 'mlx'")
    return importlib.import_module(f"retention.backends.{name}.generate")


def normalize_prompts(tokens) -> tuple[list[list[int]], bool]:
    """(rows of token ids, batched?) from a list of ints (one prompt), a list of lists
    (ragged batch), or any array with .tolist() of shape [T] or [B, T] (numpy, torch, mlx)."""
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    if isinstance(tokens, (int, np.integer)):
        raise ValueError("tokens must be a sequence of token ids, not a single int")
    tokens = list(tokens)
    batched = bool(tokens) and not isinstance(tokens[0], (int, np.integer))
    rows = [list(r.tolist() if hasattr(r, "tolist") else r) for r in tokens] if batched \
        else [tokens]
    for r in rows:
        if not all(isinstance(t, (int, np.integer)) and t >= 0 for t in r):
            raise ValueError("prompts must hold non-negative integer token ids; tokenize text "
                             "first (e.g. with the checkpoint's tokenizer.json)")
    return [[int(t) for t in r] for r in rows], batched


def normalize_stop(stop) -> list[tuple[int, ...]]:
    """Stop sequences from None, a token id, or a list of ids and/or lists of ids
    (each int is a one-token stop; each inner list a multi-token stop sequence)."""
    if stop is None:
        return []
    if isinstance(stop, (int, np.integer)):
        return [(int(stop),)]
    out = []
    for s in [stop] if isinstance(stop, str) else stop:
        seq = s.tolist() if hasattr(s, "tolist") else s      # numpy, torch, mlx
        seq = (seq,) if isinstance(seq, (int, np.integer)) else seq
        if isinstance(seq, str) or not all(isinstance(t, (int, np.integer)) for t in seq):
            raise ValueError(f"stop sequences are token ids, got {s!r}; encode text with the "
                             "model's tokenizer first (or match text in the decoded stream)")
        seq = tuple(int(t) for t in seq)
        if not seq:
            raise ValueError("empty stop sequence; give token ids")
        out.append(seq)
    return out


# --- outputs ------------------------------------------------------------------------------
@dataclass
class GenerationStats:
    prompt_tokens: int = 0          # tokens prefilled, all rows
    prefill_seconds: float = 0.0
    new_tokens: int = 0             # tokens sampled, all rows
    decode_seconds: float = 0.0     # sampling + recurrent steps
    state_bytes: int = 0            # recurrent state of all rows (fixed whatever the context)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Generation:
    """Each row's prompt followed by its new tokens. `generated[i]` is row i as an int64
    NumPy array (so the guide's `generated[0].tolist()` works); rows may differ in length
    (ragged prompts, early stops): `padded()` gives a rectangle and the lengths."""
    sequences: list[np.ndarray]
    prompt_lengths: list[int]
    finish_reasons: list[str]       # "stop" (a stop sequence ended it) or "length"
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __getitem__(self, i) -> np.ndarray:
        return self.sequences[i]

    def __len__(self) -> int:
        return len(self.sequences)

    def __iter__(self):
        return iter(self.sequences)

    def new_tokens(self, i: int) -> np.ndarray:
        return self.sequences[i][self.prompt_lengths[i]:]

    def padded(self, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [B, max_len] right-padded with pad_id, lengths [B])."""
        lengths = np.array([len(s) for s in self.sequences], dtype=np.int64)
        out = np.full((len(self.sequences), int(lengths.max(initial=0))), pad_id, np.int64)
        for i, s in enumerate(self.sequences):
            out[i, :len(s)] = s
        return out, lengths


class GenerationStream:
    """Iterate to get tokens as they are sampled; `.result` is the Generation afterwards.

    A single prompt (1-D input) yields ints; a batch (2-D input or list of lists) yields an
    int64 array [B] per step with -1 for rows that have already stopped.
    """

    def __init__(self, steps: Iterator, batched: bool, control: dict | None = None):
        self._steps, self.batched = steps, batched
        self._control = {} if control is None else control
        self.result: Generation | None = None

    def stop(self) -> None:
        """End after the tokens already yielded (e.g. a stop text matched in the decoded
        output); iteration then finishes and sets `.result` ("stop" for the rows cut)."""
        self._control["stop"] = True

    def __iter__(self):
        for tokens_B in self._steps:
            if isinstance(tokens_B, Generation):
                self.result = tokens_B
                return
            yield tokens_B if self.batched else int(tokens_B[0])


# --- the loop -----------------------------------------------------------------------------
@dataclass
class _Group:
    rows: list[int]                 # batch rows decoded together (same offset)
    state: object                   # the backend's ModelState
    logits_BV: np.ndarray           # next-token logits of these rows


def stream_generate(model, tokens, max_new_tokens: int = 256, temperature: float = 1.0,
                    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    repetition_penalty: float = 1.0, stop=None, seed: int | None = None,
                    state: PromptState | None = None, backend=None) -> GenerationStream:
    """Generate lazily; see `generate` for the arguments."""
    params = SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    rows, batched = normalize_prompts(tokens)
    stops = normalize_stop(stop)
    ops = backend_ops(model, backend)
    config = model.config
    if state is not None:
        state.check(config)
        state = state.expand(len(rows))
    for r in rows:
        if any(t >= config.vocab_size for t in r):
            raise ValueError(f"token id >= vocab_size ({config.vocab_size}) in the prompt; "
                             "was it tokenized with this model's tokenizer?")
        if not r and (state is None or state.logits is None):
            raise ValueError("empty prompt: give at least one token, or a prompt state that "
                             "holds its last logits")
    control = {"stop": False}
    steps = _run(model, ops, rows, int(max_new_tokens), params, stops, seed, state, control)
    return GenerationStream(steps, batched, control)


def generate(model, tokens, max_new_tokens: int = 256, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, stop=None, seed: int | None = None,
             state: PromptState | None = None, backend=None) -> Generation:
    """Prompt(s) followed by up to max_new_tokens sampled tokens per row.

    tokens: one prompt (list of ids, or an array [T]) or a batch (list of lists of any
    lengths, or an array [B, T]). temperature 0 = greedy; top_k 0, top_p 1, min_p 0 and
    repetition_penalty 1 are off. stop: token id(s) and/or token-id sequences; a row ends
    after emitting one (the stop tokens are kept in its output). seed: fixes the sampled
    tokens (same on every backend). state: a PromptState to continue from (one row shared
    by all prompts, or one per prompt); the prompts are read after it and the result holds
    only them, not the tokens that built the state (nor does the repetition penalty see
    those).
    """
    stream = stream_generate(model, tokens, max_new_tokens, temperature, top_p, top_k, min_p,
                             repetition_penalty, stop, seed, state, backend)
    for _ in stream:
        pass
    return stream.result


def _prefill_groups(model, ops, rows, state, stats) -> list[_Group]:
    by_length: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_length.setdefault(len(r), []).append(i)
    groups = []
    for length, idx in by_length.items():
        if state is not None and idx != list(range(state.batch_size)):
            start = ops.state_from_numpy(model, state.rows(idx))
        else:
            start = None if state is None else ops.state_from_numpy(model, state)
        if length == 0:
            logits_BV, group_state = state.logits[idx], start
        else:
            tokens_BT = np.array([rows[i] for i in idx], dtype=np.int64)
            logits_BV, group_state = _prefill(model, ops, tokens_BT, start)
            stats.prompt_tokens += tokens_BT.size
        groups.append(_Group(idx, group_state, logits_BV))
    return groups


# Prefill reads a prompt in pieces so its logits [B, piece, V] stay under this budget (a 64k
# prompt at a 50k vocabulary would otherwise need 13 GB of logits for one last row).
LOGITS_BUDGET_BYTES = 256 * 2**20


def prefill_piece_tokens(config, batch: int) -> int:
    """Tokens per prefill call: a multiple of the chunk size (so the chunks fall where a
    single call would put them) whose float32 logits fit LOGITS_BUDGET_BYTES."""
    fit = LOGITS_BUDGET_BYTES // (4 * batch * config.vocab_size)
    return max(config.chunk_size, fit // config.chunk_size * config.chunk_size)


def _prefill(model, ops, tokens_BT: np.ndarray, start_state):
    """(last logits [B, V], state) after reading tokens_BT from start_state, piece by piece."""
    piece = prefill_piece_tokens(model.config, tokens_BT.shape[0])
    state = start_state
    for begin in range(0, tokens_BT.shape[1], piece):
        logits_BV, state = ops.prefill(model, tokens_BT[:, begin:begin + piece], state)
    return logits_BV, state


def _ends_with_stop(seq: list[int], stops) -> bool:
    return any(len(seq) >= len(s) and tuple(seq[-len(s):]) == s for s in stops)


def _run(model, ops, rows, max_new_tokens, params, stops, seed, state, control=None):
    stats = GenerationStats()
    t0 = time.perf_counter()
    groups = _prefill_groups(model, ops, rows, state, stats)
    stats.state_bytes = sum(ops.state_nbytes(g.state) for g in groups if g.state is not None)
    stats.prefill_seconds = time.perf_counter() - t0

    sampler = Sampler(params, model.config.vocab_size, len(rows), seed)
    for i, r in enumerate(rows):
        sampler.observe([i] * len(r), r)
    new = [[] for _ in rows]
    reasons = ["length"] * len(rows)
    t0 = time.perf_counter()
    for n in range(max_new_tokens):
        out_B = np.full(len(rows), -1, dtype=np.int64)
        for g in groups:
            tokens_b = sampler(g.logits_BV, g.rows)
            keep = []
            for j, (row, tok) in enumerate(zip(g.rows, tokens_b)):
                new[row].append(int(tok))
                out_B[row] = tok
                if _ends_with_stop(new[row], stops):
                    reasons[row] = "stop"
                else:
                    keep.append(j)
            stats.new_tokens += len(g.rows)
            if keep and n + 1 < max_new_tokens:  # the last token needs no step
                if len(keep) < len(g.rows):
                    g.state = ops.select_rows(g.state, keep)
                    g.rows = [g.rows[j] for j in keep]
                g.logits_BV, g.state = ops.step(model, tokens_b[keep], g.state)
            else:
                g.rows = [g.rows[j] for j in keep]
        groups = [g for g in groups if g.rows]
        stats.decode_seconds = time.perf_counter() - t0
        yield out_B
        t0 = time.perf_counter() - stats.decode_seconds  # time spent by the consumer is not ours
        if control is not None and control.get("stop"):
            for g in groups:
                for row in g.rows:
                    reasons[row] = "stop"
            break
        if not groups:
            break
    sequences = [np.array(r + s, dtype=np.int64) for r, s in zip(rows, new)]
    yield Generation(sequences, [len(r) for r in rows], reasons, stats)


def prompt_state(model, tokens, state: PromptState | None = None,
                 backend=None) -> PromptState:
    """Prefill `tokens` (one prompt, or a batch of equal-length prompts) after `state` and
    return the state at their end, with their last logits, ready to save or continue from."""
    rows, _ = normalize_prompts(tokens)
    if len({len(r) for r in rows}) != 1 or not rows[0]:
        raise ValueError("prompt_state needs non-empty prompts of one length (a state holds "
                         "one position); make one state per length")
    ops = backend_ops(model, backend)
    start = None
    if state is not None:
        state.check(model.config)
        start = ops.state_from_numpy(model, state.expand(len(rows)))
    logits_BV, model_state = _prefill(model, ops, np.array(rows, dtype=np.int64), start)
    out = ops.state_to_numpy(model_state, model.config)
    out.logits = logits_BV
    return out


def extend_state(model, state: PromptState, tokens, backend=None) -> PromptState:
    """The state after also reading `tokens` (e.g. a generated reply, to continue a chat)."""
    return prompt_state(model, tokens, state=state, backend=backend)


__all__ = ["generate", "stream_generate", "prompt_state", "extend_state", "Generation",
           "GenerationStats", "GenerationStream", "PromptState", "config_hash"]
