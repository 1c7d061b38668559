"""In-place recurrent step, positions as tensors, and GraphDecoder (static buffers; a CUDA
graph on CUDA). The CPU tests check every piece except the capture; the CUDA test checks that
graph decode equals eager decode token for token."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from retention import ModelConfig
from retention.backends.torch import build_model
from retention.backends.torch import generate as torch_glue
from retention.backends.torch.graph_decode import GraphDecoder, graphs_enabled
from retention.backends.torch.model import ModelState, rope_cos_sin
from retention.backends.torch.power_retention import (power_retention_step,
                                                      power_retention_step_,
                                                      power_retention_step_ops)
from retention.generation import generate
from retention.reference import power_retention as reference

torch.set_float32_matmul_precision("highest")

CONFIG = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, mlp_hidden=48, chunk_size=8, tie_embeddings=False,
                     init_std=0.3)


def rel_err(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def inputs(B=3, T=9, Hq=4, H=2, d=8, seed=0):
    r = np.random.default_rng(seed)
    q, k, v = r.normal(size=(B, T, Hq, d)), r.normal(size=(B, T, H, d)), r.normal(size=(B, T, H, d))
    return q, k, v, np.log(r.uniform(0.7, 1.0, size=(B, T, H)))


def t32(a):
    return torch.tensor(a, dtype=torch.float32)


# --- the in-place step -------------------------------------------------------------------
def test_in_place_step_equals_functional_step_and_reference():
    q, k, v, log_g = inputs()
    want, (S_ref, z_ref) = reference(q, k, v, log_g, form="recurrent", return_state=True)
    B, _, _, H, d = *q.shape[:3], k.shape[2], q.shape[3]
    D = d * (d + 1) // 2
    S, z = torch.zeros(B, H, D, d), torch.zeros(B, H, D)
    S_ptr, z_ptr = S.data_ptr(), z.data_ptr()
    functional = None
    with torch.no_grad():
        for t in range(q.shape[1]):
            args = (t32(q[:, t]), t32(k[:, t]), t32(v[:, t]), t32(log_g[:, t]))
            y_f, functional = power_retention_step_ops(*args, functional)
            y = power_retention_step_(*args, (S, z), impl="ops")
            assert torch.equal(y, y_f)                     # same arithmetic, same bits
            assert torch.equal(S, functional[0]) and torch.equal(z, functional[1])
            assert rel_err(y, want[:, t]) <= 1e-5
    assert (S.data_ptr(), z.data_ptr()) == (S_ptr, z_ptr)  # written where it was
    assert rel_err(S, S_ref) <= 1e-5 and rel_err(z, z_ref) <= 1e-5


def test_functional_step_leaves_its_input_state_alone():
    q, k, v, log_g = inputs(T=2)
    args = lambda t: (t32(q[:, t]), t32(k[:, t]), t32(v[:, t]), t32(log_g[:, t]))  # noqa: E731
    _, state = power_retention_step(*args(0), None)
    before = tuple(a.clone() for a in state)
    power_retention_step(*args(1), state)
    assert torch.equal(state[0], before[0]) and torch.equal(state[1], before[1])


def test_in_place_step_rejects_a_state_it_cannot_write_into():
    q, k, v, log_g = (t32(a[:, 0]) for a in inputs(T=1))
    D = 36
    with pytest.raises(ValueError, match="contiguous"):
        power_retention_step_(q, k, v, log_g, (torch.zeros(3, 2, D, 8, dtype=torch.float64),
                                               torch.zeros(3, 2, D)))
    with pytest.raises(ValueError, match="contiguous"):
        power_retention_step_(q, k, v, log_g, (torch.zeros(3, 2, 8, D).transpose(-1, -2),
                                               torch.zeros(3, 2, D)))
    with pytest.raises(ValueError, match="state must be"):
        power_retention_step_(q, k, v, log_g, (torch.zeros(3, 2, D, 4), torch.zeros(3, 2, D)))


INTERPRETED = """
import torch
from retention.backends.torch.power_retention import (power_retention_step,
    power_retention_step_, power_retention_step_ops)
torch.manual_seed(0)
B, Hq, H, d = 2, 4, 2, 64                 # d 64: two value tiles read the same z
D = d * (d + 1) // 2
S0 = torch.randn(B, H, D, d) * 0.1
z0 = torch.rand(B, H, D) + 1.0
S, z = S0.clone(), z0.clone()
state_f = state_o = (S0, z0)
for t in range(3):
    q, k, v = torch.randn(B, Hq, d), torch.randn(B, H, d), torch.randn(B, H, d)
    g = torch.rand(B, H) * -0.1
    y = power_retention_step_(q, k, v, g, (S, z), impl="kernel")
    y_f, state_f = power_retention_step(q, k, v, g, state_f, impl="kernel")
    y_o, state_o = power_retention_step_ops(q, k, v, g, state_o)
    assert torch.equal(y, y_f) and torch.equal(S, state_f[0]) and torch.equal(z, state_f[1])
    assert (y - y_o).abs().max() <= 1e-4 * y_o.abs().max(), (y - y_o).abs().max()
    assert (z - state_o[1]).abs().max() <= 1e-5 * state_o[1].abs().max()
print("inplace-kernel-ok")
"""


def test_in_place_kernel_step_through_the_triton_interpreter():
    # The Triton decode kernel writing S over itself (z from a copy) == the functional kernel
    # op bit for bit; a fresh process, since Triton reads TRITON_INTERPRET at import.
    pytest.importorskip("triton", reason="triton ships for Linux x86-64 only")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "inplace-kernel-ok" in out.stdout, out.stderr[-3000:]


# --- positions as tensors ------------------------------------------------------------------
@pytest.mark.parametrize("offset", [0, 7, 65_535])
def test_rope_from_a_position_tensor_equals_the_int_path(offset):
    for T in (1, 5):
        cos, sin = rope_cos_sin(offset, T, 16, 10000.0, "cpu")
        cos_t, sin_t = rope_cos_sin(torch.tensor(offset), T, 16, 10000.0, "cpu")
        assert torch.equal(cos, cos_t) and torch.equal(sin, sin_t)


def test_model_step_with_a_tensor_offset_equals_the_int_offset():
    model = build_model(CONFIG, seed=1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=gen)
    with torch.no_grad():
        _, state = model.prefill(tokens[:, :10])
        want, s_int = model.step(tokens[:, 10], state)
        got, s_ten = model.step(tokens[:, 10], ModelState(state.layers, torch.tensor(10)))
    assert torch.equal(got, want) and int(s_ten.offset) == s_int.offset == 11


# --- the decoder without a graph (CPU) -----------------------------------------------------
def eager_logits(model, state, tokens_BT):
    out = []
    with torch.no_grad():
        for t in range(tokens_BT.shape[1]):
            logits, state = model.step(tokens_BT[:, t], state)
            out.append(logits)
    return torch.stack(out, 1), state


def test_decoder_without_graph_equals_model_step_and_keeps_its_buffers():
    model = build_model(CONFIG, seed=2)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 20), generator=gen)
    with torch.no_grad():
        _, state = model.prefill(tokens[:, :9])
    before = [(S.clone(), z.clone()) for S, z in state.layers]
    want, want_state = eager_logits(model, state, tokens[:, 9:])
    decoder = GraphDecoder(model, state)
    assert not decoder.graph_enabled                       # CPU: no capture, same buffers
    ptrs = [S.data_ptr() for S, _ in decoder.layers]
    got = torch.stack([decoder.step(tokens[:, t]).clone() for t in range(9, 20)], 1)
    assert rel_err(got, want) <= 1e-6
    assert decoder.offset == want_state.offset == 20 and int(decoder.position) == 20
    assert [S.data_ptr() for S, _ in decoder.layers] == ptrs
    for (S, z), (S2, z2) in zip(decoder.layers, want_state.layers):
        assert rel_err(S, S2) <= 1e-6 and rel_err(z, z2) <= 1e-6
    for (S, z), (S0, z0) in zip(state.layers, before):     # the prefill state was copied
        assert torch.equal(S, S0) and torch.equal(z, z0)
    copy = decoder.state()
    decoder.step(tokens[:, 0])
    assert copy.offset == 20 and not torch.equal(copy.layers[0][0], decoder.layers[0][0])


@pytest.mark.parametrize("compile", [False, True])
def test_fused_layers_equal_model_step(compile):
    # fuse=True: one q/k/v/g and one gate/up matmul per layer; compile=True: the same through
    # torch.compile (inductor; compiled once per process, so a second decoder reuses it).
    model = build_model(CONFIG, seed=2)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 16), generator=gen)
    with torch.no_grad():
        _, state = model.prefill(tokens[:, :9])
    want, want_state = eager_logits(model, state, tokens[:, 9:])
    for _ in range(2 if compile else 1):
        decoder = GraphDecoder(model, state, fuse=True, compile=compile)
        got = torch.stack([decoder.step(tokens[:, t]).clone() for t in range(9, 16)], 1)
        assert rel_err(got, want) <= 1e-5
        assert rel_err(decoder.layers[-1][0], want_state.layers[-1][0]) <= 1e-5


def test_decoder_from_an_empty_state_and_its_errors():
    model = build_model(CONFIG, seed=2)
    tokens = torch.tensor([[3, 5, 7, 11]])
    want, _ = eager_logits(model, None, tokens)
    decoder = GraphDecoder(model, None, batch_size=1)
    got = torch.stack([decoder.step(tokens[:, t]).clone() for t in range(4)], 1)
    assert rel_err(got, want) <= 1e-6
    with pytest.raises(ValueError, match="batch_size"):
        GraphDecoder(model, None)
    with pytest.raises(ValueError, match="steps 1 rows"):
        decoder.step(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecoder(model, None, batch_size=1, graph=True)


def test_generate_through_the_decoder_equals_generate_with_model_step(monkeypatch):
    model = build_model(CONFIG, seed=4)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [4, 4, 4, 4, 4], [6]]   # ragged: three groups
    stops = [int(t) for t in range(0, CONFIG.vocab_size, 7)]     # some rows stop early
    kwargs = dict(temperature=0.9, top_k=20, seed=3, stop=stops)
    got = generate(model, prompts, 14, **kwargs)
    greedy = generate(model, prompts, 14, temperature=0)

    @torch.inference_mode()
    def eager_step(model, tokens_B, state):
        logits, state = model.step(torch.as_tensor(np.asarray(tokens_B)), state)
        return logits.float().numpy(), state
    monkeypatch.setattr(torch_glue, "step", eager_step)
    want = generate(model, prompts, 14, **kwargs)
    want_greedy = generate(model, prompts, 14, temperature=0)
    for a, b in ((got, want), (greedy, want_greedy)):
        assert [s.tolist() for s in a] == [s.tolist() for s in b]
        assert a.finish_reasons == b.finish_reasons
    assert "stop" in got.finish_reasons                    # select_rows ran on a decoder


def test_graphs_are_off_without_cuda_and_can_be_switched_off(monkeypatch):
    model = build_model(CONFIG)
    assert not graphs_enabled(model)                       # a CPU model
    if torch.cuda.is_available():
        model = model.to("cuda")
        assert graphs_enabled(model)
        monkeypatch.setenv("RETENTION_CUDA_GRAPHS", "0")
        assert not graphs_enabled(model)
        monkeypatch.delenv("RETENTION_CUDA_GRAPHS")
        model.cuda_graphs = False
        assert not graphs_enabled(model)


# --- CUDA: graph replay == eager decode ----------------------------------------------------
def same_greedy_tokens(got_TBV, want_TBV, tol):
    """argmax equal at every step and row, except where want's top two are within tol (a
    near-tie that rounding may break either way)."""
    top2 = want_TBV.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > tol * want_TBV.abs().amax()
    agree = got_TBV.argmax(-1) == want_TBV.argmax(-1)
    return bool((agree | ~clear).all()) and bool(clear.float().mean() > 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager_decode(dtype):
    # head_dim 64 (two value tiles in the decode kernel), GQA, the Triton path on CUDA.
    # Greedy eager decode with the functional model.step; the decoder (one warm-up step,
    # then capture and replays) is fed the same tokens and must pick the same ones.
    config = CONFIG.replace(vocab_size=509, d_model=256, n_layers=3, n_heads=4, n_kv_heads=2,
                            head_dim=64, mlp_hidden=512, chunk_size=64, init_std=0.1)
    model = build_model(config, seed=5, device="cuda").to(dtype).eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (2, 100), generator=gen).cuda()
    with torch.inference_mode():
        _, state = model.prefill(prompt)
        feed, eager_state, eager_logits = [prompt[:, -1]], state, []
        for _ in range(25):
            logits, eager_state = model.step(feed[-1], eager_state)
            eager_logits.append(logits.float())
            feed.append(logits.argmax(-1))
        decoder = GraphDecoder(model, state, graph=True)
        graph_logits = [decoder.step(tok).float().clone() for tok in feed[:-1]]
        assert decoder.captured
    got, want = torch.stack(graph_logits).cpu(), torch.stack(eager_logits).cpu()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(got, want) <= tol
    assert same_greedy_tokens(got, want, 1e-5 if dtype == torch.float32 else 1e-2)
    assert decoder.offset == eager_state.offset == 125
    for (S, z), (S2, z2) in zip(decoder.layers, eager_state.layers):
        assert rel_err(S.cpu(), S2.cpu()) <= 1e-4 and rel_err(z.cpu(), z2.cpu()) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_with_compiled_layers_follows_eager_logits():
    # Teacher-forced (fused rounding may flip a near-tie argmax): feed the same tokens to the
    # eager model.step and to a compiled, captured decoder; float32 logits agree.
    config = CONFIG.replace(vocab_size=509, d_model=256, n_layers=3, n_heads=4, n_kv_heads=2,
                            head_dim=64, mlp_hidden=512, chunk_size=64, init_std=0.1)
    model = build_model(config, seed=7, device="cuda").eval()
    gen = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (2, 90), generator=gen).cuda()
    with torch.inference_mode():
        _, state = model.prefill(tokens[:, :64])
        want, _ = eager_logits(model, state, tokens[:, 64:])
        decoder = GraphDecoder(model, state, graph=True, compile=True)
        got = torch.stack([decoder.step(tokens[:, t]).clone() for t in range(64, 90)], 1)
        assert decoder.captured
    assert rel_err(got.cpu(), want.cpu()) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_generate_with_graphs_equals_generate_without():
    config = CONFIG.replace(vocab_size=509, d_model=128, n_heads=4, n_kv_heads=2, head_dim=32,
                            mlp_hidden=256, chunk_size=32, init_std=0.1)
    model = build_model(config, seed=6, device="cuda")
    prompts = [list(range(1, 40)), list(range(5, 25)), list(range(2, 41))]
    with_graph = generate(model, prompts, 20, temperature=0.8, seed=1)
    model.cuda_graphs = False
    without = generate(model, prompts, 20, temperature=0.8, seed=1)
    assert [s.tolist() for s in with_graph] == [s.tolist() for s in without]
