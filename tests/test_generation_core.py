"""The backend-neutral generation loop (retention.generation) on a NumPy stand-in model, and
PromptState files. No framework needed: the backends' glue is replaced by FakeOps."""
from dataclasses import dataclass

import numpy as np
import pytest

from retention.config import ModelConfig
from retention.generation import generate, normalize_prompts, normalize_stop, stream_generate
from retention.prompt_state import PromptState, config_hash
from retention.reference import feature_dim

V = 11


class CountingModel:
    """Predicts (last token + 1) mod V with certainty: continuations are easy to read."""
    config = ModelConfig(vocab_size=V, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1,
                         head_dim=4, mlp_hidden=8)


@dataclass
class FakeState:
    last_B: np.ndarray
    offset: int


class FakeOps:
    def __init__(self):
        self.prefills, self.step_batches = [], []

    @staticmethod
    def _logits(last_B):
        logits = np.zeros((len(last_B), V), dtype=np.float32)
        logits[np.arange(len(last_B)), (last_B + 1) % V] = 10.0
        return logits

    def prefill(self, model, tokens_BT, state):
        self.prefills.append(tokens_BT.shape)
        offset = (0 if state is None else state.offset) + tokens_BT.shape[1]
        return self._logits(tokens_BT[:, -1]), FakeState(tokens_BT[:, -1], offset)

    def step(self, model, tokens_B, state):
        self.step_batches.append(len(tokens_B))
        return self._logits(tokens_B), FakeState(tokens_B, state.offset + 1)

    def select_rows(self, state, rows):
        return FakeState(state.last_B[rows], state.offset)

    def state_nbytes(self, state):
        return 64 * len(state.last_B)


def run(tokens, n, **kw):
    ops = FakeOps()
    return generate(CountingModel(), tokens, n, temperature=0, backend=ops, **kw), ops


def test_single_prompt_is_prompt_then_new_tokens():
    out, ops = run([3, 4], 4)
    assert out[0].tolist() == [3, 4, 5, 6, 7, 8]
    assert out.new_tokens(0).tolist() == [5, 6, 7, 8]
    assert out.finish_reasons == ["length"]
    assert ops.step_batches == [1, 1, 1]          # no step after the last token
    assert out.stats.prompt_tokens == 2 and out.stats.new_tokens == 4
    assert out.stats.state_bytes == 64


def test_stream_yields_ints_for_one_prompt_and_arrays_for_a_batch():
    stream = stream_generate(CountingModel(), [1], 3, temperature=0, backend=FakeOps())
    got = list(stream)
    assert got == [2, 3, 4] and all(isinstance(t, int) for t in got)
    assert stream.result[0].tolist() == [1, 2, 3, 4]
    stream = stream_generate(CountingModel(), np.array([[1], [5]]), 2, temperature=0,
                             backend=FakeOps())
    got = list(stream)
    assert [g.tolist() for g in got] == [[2, 6], [3, 7]]


def test_ragged_batch_groups_rows_by_length():
    out, ops = run([[1, 2, 3], [7], [4, 5, 6]], 2)
    assert [s.tolist() for s in out] == [[1, 2, 3, 4, 5], [7, 8, 9], [4, 5, 6, 7, 8]]
    assert sorted(ops.prefills) == [(1, 1), (2, 3)]       # one prefill per distinct length
    tokens, lengths = out.padded(pad_id=-1)
    assert lengths.tolist() == [5, 3, 5]
    assert tokens[1].tolist() == [7, 8, 9, -1, -1]


def test_stop_token_ends_only_its_row_and_is_kept():
    stream = stream_generate(CountingModel(), [[1], [6]], 5, temperature=0, stop=4,
                             backend=FakeOps())
    steps = [s.tolist() for s in stream]
    out = stream.result
    assert out[0].tolist() == [1, 2, 3, 4]
    assert out[1].tolist() == [6, 7, 8, 9, 10, 0]
    assert out.finish_reasons == ["stop", "length"]
    assert steps[3] == [-1, 10]                              # finished rows report -1


def test_finished_rows_leave_the_batch():
    out, ops = run([[1], [6]], 5, stop=[3])
    assert ops.step_batches == [2, 1, 1, 1]
    assert out[0].tolist() == [1, 2, 3]


def test_multi_token_stop_sequence_and_all_rows_stopping_ends_early():
    stream = stream_generate(CountingModel(), [0], 50, temperature=0, stop=[[5, 6], 99],
                             backend=FakeOps())
    assert list(stream) == [1, 2, 3, 4, 5, 6]
    assert stream.result.finish_reasons == ["stop"]


def test_long_prompts_are_prefilled_in_chunk_aligned_pieces(monkeypatch):
    import retention.generation as generation
    chunk = CountingModel.config.chunk_size
    monkeypatch.setattr(generation, "LOGITS_BUDGET_BYTES", 2 * chunk * 4 * V + 1)
    assert generation.prefill_piece_tokens(CountingModel.config, 1) == 2 * chunk
    assert generation.prefill_piece_tokens(CountingModel.config, 8) == chunk   # at least one
    prompt = [t % V for t in range(5 * chunk + 3)]
    out, ops = run(prompt, 2)
    assert ops.prefills == [(1, 2 * chunk), (1, 2 * chunk), (1, chunk + 3)]
    assert out.new_tokens(0).tolist() == [(prompt[-1] + 1) % V, (prompt[-1] + 2) % V]


def test_zero_new_tokens_returns_the_prompts():
    out, _ = run([[1, 2], [3]], 0)
    assert [s.tolist() for s in out] == [[1, 2], [3]]


def test_prompt_normalisation():
    assert normalize_prompts([1, 2]) == ([[1, 2]], False)
    assert normalize_prompts(np.array([[1, 2]])) == ([[1, 2]], True)
    assert normalize_prompts([[1], [2, 3]]) == ([[1], [2, 3]], True)
    assert normalize_stop(None) == [] and normalize_stop(3) == [(3,)]
    assert normalize_stop([3, [4, 5]]) == [(3,), (4, 5)]


@pytest.mark.parametrize("tokens", [[], [[1], []], [1, V], ["a"], [-1]])
def test_bad_prompts_raise_value_error(tokens):
    with pytest.raises(ValueError):
        run(tokens, 2)


# --- PromptState ---------------------------------------------------------------------------
def make_state(config, batch=1, offset=7, seed=0):
    rng = np.random.default_rng(seed)
    D = feature_dim(config.head_dim, config.degree)
    H, d = config.n_kv_heads, config.head_dim
    layers = [(rng.random((batch, H, D, d), dtype=np.float32),
               rng.random((batch, H, D), dtype=np.float32)) for _ in range(config.n_layers)]
    logits = rng.random((batch, config.vocab_size), dtype=np.float32)
    return PromptState(layers, offset, logits, config_hash(config))


def test_prompt_state_save_load_round_trip(tmp_path):
    config = ModelConfig(vocab_size=13, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1,
                         head_dim=4, mlp_hidden=8)
    state = make_state(config, batch=2)
    state.save(tmp_path / "s.safetensors")
    back = PromptState.load(tmp_path / "s.safetensors", config)
    assert back.offset == 7 and back.config_hash == state.config_hash
    for (S, z), (S2, z2) in zip(state.layers, back.layers):
        np.testing.assert_array_equal(S, S2)
        np.testing.assert_array_equal(z, z2)
    np.testing.assert_array_equal(state.logits, back.logits)
    assert back.nbytes == state.nbytes == 2 * 2 * (10 * 4 + 10) * 4


def test_prompt_state_copy_rows_and_expand():
    config = CountingModel.config
    state = make_state(config)
    copy = state.copy()
    copy.layers[0][0][...] = 0
    assert state.layers[0][0].any()
    wide = state.expand(3)
    assert wide.batch_size == 3 and state.batch_size == 1
    np.testing.assert_array_equal(wide.layers[0][0][2], state.layers[0][0][0])
    with pytest.raises(ValueError, match="rows"):
        wide.expand(2)


def test_prompt_state_rejects_another_models_state(tmp_path):
    config = CountingModel.config
    state = make_state(config)
    with pytest.raises(ValueError, match="different config"):
        state.check(config.replace(vocab_size=12))
    state.config_hash = None
    with pytest.raises(ValueError, match="layers"):
        state.check(config.replace(n_layers=2))
    with pytest.raises(ValueError, match="shapes"):
        state.check(config.replace(head_dim=8))


def test_prompt_state_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        PromptState.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="readable"):
        PromptState.load(bad)
    from safetensors.numpy import save_file
    other = tmp_path / "other.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, str(other))
    with pytest.raises(ValueError, match="not a retention prompt state"):
        PromptState.load(other)


@pytest.mark.parametrize("module", ["retention.sampling", "retention.generation",
                                    "retention.prompt_state", "retention.commands.generate"])
def test_generation_core_pulls_in_no_framework(module):
    import subprocess
    import sys
    code = (f"import sys, {module}\n"
            "bad = [m for m in ('torch', 'mlx', 'triton') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stream_stop_ends_after_the_tokens_yielded():
    ops = FakeOps()
    stream = stream_generate(CountingModel(), [[3], [5, 6]], 10, temperature=0, backend=ops)
    seen = []
    for tokens_B in stream:
        seen.append(tokens_B.tolist())
        if len(seen) == 2:
            stream.stop()
    assert seen == [[4, 7], [5, 8]]
    assert [s.tolist() for s in stream.result] == [[3, 4, 5], [5, 6, 7, 8]]
    assert stream.result.finish_reasons == ["stop", "stop"]


@pytest.mark.parametrize("stop", ["\n", ["</s>"], [[1, "x"]]])
def test_text_stops_say_to_encode_them_first(stop):
    with pytest.raises(ValueError, match="token id"):
        normalize_stop(stop)
