"""Generation on each backend (float32, tiny shapes): prefill + recurrent decode equals the
full forward at every position, constant state size, ragged batches, prompt states, seeds."""
import numpy as np
import pytest

from retention import get_backend
from retention.config import ModelConfig
from retention.generation import backend_ops, generate, prompt_state, stream_generate
from retention.prompt_state import PromptState

BACKENDS = ["torch", "mlx"]
# Untied head and a large init so greedy continuations are not a repeated token.
CONFIG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, mlp_hidden=64, chunk_size=8, tie_embeddings=False,
                     init_std=0.3)


@pytest.fixture(scope="module", params=BACKENDS)
def model(request):
    backend = get_backend(request.param)
    if request.param == "torch":
        import torch
        torch.set_float32_matmul_precision("highest")
    return backend.build_model(CONFIG, seed=0)


def full_logits(model, tokens):
    """Full chunked forward logits [T, V] as NumPy."""
    name = type(model).__module__.split(".")[2]
    backend = get_backend(name)
    if name == "torch":
        import torch
        with torch.no_grad():
            return backend.to_numpy(model(torch.tensor([tokens])))[0]
    import mlx.core as mx
    return backend.to_numpy(model(mx.array([tokens])))[0]


def tokens_of(n, seed=0):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, n).tolist()


def test_prefill_then_steps_equal_the_full_forward_at_every_position(model):
    tokens = tokens_of(21)
    want_TV = full_logits(model, tokens)
    ops = backend_ops(model)
    logits_BV, state = ops.prefill(model, np.array([tokens[:5]]), None)
    got = [logits_BV[0]]
    for t in tokens[5:]:
        logits_BV, state = ops.step(model, np.array([t]), state)
        got.append(logits_BV[0])
    scale = np.abs(want_TV).max()
    np.testing.assert_allclose(np.stack(got), want_TV[4:], rtol=0, atol=1e-5 * scale)


def test_greedy_tokens_are_the_full_forwards_argmax(model):
    prompt = tokens_of(11, seed=1)
    out = generate(model, prompt, 12, temperature=0)
    logits_TV = full_logits(model, out[0].tolist())
    assert out[0][:11].tolist() == prompt
    np.testing.assert_array_equal(logits_TV[10:-1].argmax(-1), out.new_tokens(0))


def test_prefill_in_pieces_equals_one_call(model, monkeypatch):
    import retention.generation as generation
    tokens = tokens_of(45, seed=9)
    whole = prompt_state(model, tokens)
    monkeypatch.setattr(generation, "LOGITS_BUDGET_BYTES", 1)      # pieces of one chunk
    pieces = prompt_state(model, tokens)
    assert pieces.offset == whole.offset == 45
    np.testing.assert_allclose(pieces.logits, whole.logits, rtol=0,
                               atol=1e-5 * np.abs(whole.logits).max())
    for (S, z), (S2, z2) in zip(pieces.layers, whole.layers):
        np.testing.assert_allclose(S, S2, rtol=1e-5, atol=1e-6 * np.abs(S2).max())
        np.testing.assert_allclose(z, z2, rtol=1e-5, atol=1e-6 * np.abs(z2).max())


def test_state_size_does_not_depend_on_context_length(model):
    short = prompt_state(model, tokens_of(100))
    long = prompt_state(model, tokens_of(5000))
    assert long.offset == 5000 and short.offset == 100
    assert short.nbytes == long.nbytes
    assert [S.shape for S, _ in short.layers] == [S.shape for S, _ in long.layers]
    out_short = generate(model, tokens_of(100), 2, temperature=0)
    out_long = generate(model, tokens_of(5000), 2, temperature=0)
    assert out_short.stats.state_bytes == out_long.stats.state_bytes == short.nbytes


def test_ragged_batch_equals_one_prompt_at_a_time(model):
    prompts = [tokens_of(9, seed=2), tokens_of(3, seed=3), tokens_of(17, seed=4),
               tokens_of(9, seed=5)]
    alone = [generate(model, p, 10, temperature=0)[0] for p in prompts]
    stop = int(alone[1][-7])   # a token row 1 emits mid-way: that row stops early in the batch
    batch = generate(model, prompts, 10, temperature=0, stop=stop)
    for prompt, a, b in zip(prompts, alone, batch):
        new = a[len(prompt):].tolist()
        if stop in new:                       # the batch row ends at its first stop token
            new = new[:new.index(stop) + 1]
        assert b.tolist() == prompt + new
    assert batch.finish_reasons[1] == "stop"


def test_prompt_state_continues_like_the_whole_prompt(model, tmp_path):
    system, user = tokens_of(13, seed=6), tokens_of(4, seed=7)
    whole = generate(model, system + user, 8, temperature=0).new_tokens(0)
    state = prompt_state(model, system)
    state.save(tmp_path / "system.safetensors")
    loaded = PromptState.load(tmp_path / "system.safetensors", CONFIG)
    before = state.copy()
    for s in (state, loaded, state.copy()):
        out = generate(model, user, 8, temperature=0, state=s)
        assert out[0][:4].tolist() == user
        np.testing.assert_array_equal(out.new_tokens(0), whole)
    # One shared state, several continuations; and a continuation with no new prompt tokens.
    other = tokens_of(6, seed=8)
    batch = generate(model, [user, other], 8, temperature=0, state=state)
    np.testing.assert_array_equal(batch.new_tokens(0), whole)
    np.testing.assert_array_equal(
        batch.new_tokens(1), generate(model, system + other, 8, temperature=0).new_tokens(0))
    from_state = generate(model, [], 5, temperature=0, state=prompt_state(model, system + user))
    np.testing.assert_array_equal(from_state.new_tokens(0), whole[:5])
    for (S, z), (S0, z0) in zip(state.layers, before.layers):   # reusable: never mutated
        np.testing.assert_array_equal(S, S0)
        np.testing.assert_array_equal(z, z0)


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    kw = dict(temperature=0.9, top_p=0.95, top_k=40, min_p=0.02, repetition_penalty=1.2)
    a = generate(model, [[1, 2, 3], [4, 5]], 15, seed=11, **kw)
    b = generate(model, [[1, 2, 3], [4, 5]], 15, seed=11, **kw)
    c = generate(model, [[1, 2, 3], [4, 5]], 15, seed=12, **kw)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_model_methods_follow_the_guide(model):
    name = type(model).__module__.split(".")[2]
    if name == "torch":
        import torch
        tokens = torch.tensor([[5, 6, 7]])
    else:
        import mlx.core as mx
        tokens = mx.array([[5, 6, 7]])
    model.reset_states()
    generated = model.generate(tokens, max_new_tokens=6, temperature=0.8, top_p=0.9, seed=0)
    assert len(generated[0].tolist()) == 9 and generated[0][:3].tolist() == [5, 6, 7]
    stream = model.stream_generate([5, 6, 7], 6, temperature=0.8, top_p=0.9, seed=0)
    assert list(stream) == generated[0][3:].tolist()
    assert stream.result.stats.decode_tokens_per_second > 0


def test_stream_generate_matches_generate(model):
    out = generate(model, [[1, 2], [3, 4, 5]], 5, temperature=0)
    steps = list(stream_generate(model, [[1, 2], [3, 4, 5]], 5, temperature=0))
    np.testing.assert_array_equal(np.stack(steps).T, [out.new_tokens(0), out.new_tokens(1)])
