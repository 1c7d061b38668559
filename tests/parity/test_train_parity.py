"""Training parity between MLX and torch (float32, CPU): the same AdamW steps from the same
parameters on the same batches, and checkpoints that resume on the other backend."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retention.config import ModelConfig, TrainConfig
from retention.schedule import learning_rate, schedule_for
from retention.train import train
from retention.train_data import SyntheticBatches

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                   mlp_hidden=64, chunk_size=8)


@pytest.fixture(autouse=True)
def one_thread():
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_num_threads(before)


def tiny_config(out=None, **kw):
    args = dict(model=TINY, data="synthetic", seq_len=16, batch_size=2, steps=6, lr=1e-2,
                min_lr=1e-3, warmup_steps=2, weight_decay=0.1, clip_norm=0.5, eval_every=0,
                save_every=3, keep_last=0, log_interval=100, out_dir=str(out or "unused"),
                progress=False, tensorboard=False)
    args.update(kw)
    return TrainConfig(**args)


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_adamw_five_steps_match_across_backends():
    from retention.backends.mlx.trainer import Trainer as MlxTrainer
    from retention.backends.torch.trainer import Trainer as TorchTrainer
    config = tiny_config(grad_accum=2, lr=1e-3, min_lr=1e-4)
    t, m = TorchTrainer(TINY, config), MlxTrainer(TINY, config)
    m.load_parameters_numpy(t.parameters_numpy())       # same starting checkpoint
    data = SyntheticBatches(TINY.vocab_size, config.seq_len, config.batch_size, seed=1)
    schedule = schedule_for(config)
    clipped = 0
    for step in range(5):
        micro = [data.next_batch() for _ in range(config.grad_accum)]
        lr = learning_rate(step, **schedule)
        rt, rm = t.train_step(micro, lr), m.train_step(micro, lr)
        assert rm["loss"] == pytest.approx(rt["loss"], rel=1e-5)
        assert rm["grad_norm"] == pytest.approx(rt["grad_norm"], rel=1e-4)
        clipped += rt["grad_norm"] > config.clip_norm
    assert clipped > 0, "the test should exercise clipping"
    assert t.optimizer_step == m.optimizer_step == 5
    pt, pm = t.parameters_numpy(), m.parameters_numpy()
    errors = {n: rel_err(pm[n], pt[n]) for n in pt}
    assert max(errors.values()) <= 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    ot, om = t.optimizer_state_numpy(), m.optimizer_state_numpy()
    assert set(ot) == set(om)
    assert max(rel_err(om[n], ot[n]) for n in ot) <= 1e-3


def test_weight_decay_only_where_documented():
    """With zero gradients AdamW leaves only the decoupled decay: matrices shrink, norms and
    the gate projection do not."""
    from retention.backends.mlx.trainer import Trainer as MlxTrainer
    from retention.backends.torch.trainer import Trainer as TorchTrainer
    from retention.params import decays
    for cls in (TorchTrainer, MlxTrainer):
        tr = cls(TINY, tiny_config(weight_decay=0.5))
        before = tr.parameters_numpy()
        grads = {n: np.zeros_like(p) for n, p in before.items()}
        if cls is TorchTrainer:
            import torch
            for n, p in tr.params.items():
                p.grad = torch.from_numpy(grads[n])
            tr.apply_update(lr=0.1, grad_norm=0.0)
        else:
            import mlx.core as mx
            tr.apply_update({n: mx.array(g) for n, g in grads.items()}, lr=0.1, grad_norm=0.0)
        after = tr.parameters_numpy()
        for n in before:
            factor = 1 - 0.1 * 0.5 if decays(n) else 1.0
            np.testing.assert_allclose(after[n], before[n] * factor, rtol=1e-6, err_msg=n)
        assert not decays("model.layers.0.self_attn.g_proj.weight")
        assert not decays("model.norm.weight") and decays("model.embed_tokens.weight")


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads,
                                                (Path(out) / "metrics.jsonl").read_text().split("\n")[:-1])}


def _branch(src: Path, dst: Path, step: int) -> None:
    """Copy run `src` to `dst` keeping only checkpoint `step`, pointed at by latest."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").glob("step_*"):
        if p.name != f"step_{step:08d}":
            shutil.rmtree(p)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")


@pytest.mark.parametrize("first, second", [("torch", "mlx"), ("mlx", "torch")])
def test_checkpoint_resumes_on_the_other_backend(tmp_path, first, second):
    full = tmp_path / "full"
    train(tiny_config(full), first)
    same, other = tmp_path / "same", tmp_path / "other"
    _branch(full, same, 3)
    _branch(full, other, 3)
    train(tiny_config(same, resume="latest"), first)
    result = train(tiny_config(other, resume="latest"), second)
    assert result.backend == second and result.step == 6
    a, b = _losses(same), _losses(other)
    assert a == _losses(full)                     # same backend: bitwise
    assert [s for s in b] == list(range(1, 7))
    for step in (4, 5, 6):
        assert abs(b[step] - a[step]) <= 1e-3 * abs(a[step]), (step, a[step], b[step])
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["backend"] == second and state["optimizer_step"] == 6
