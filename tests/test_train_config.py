"""TrainConfig validation, TOML files and the `retention train` flag mapping."""
import argparse

import pytest

from retention.config import ModelConfig, TrainConfig


def test_defaults_round_trip():
    c = TrainConfig()
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert c.tokens_per_step == c.batch_size * c.seq_len * c.grad_accum


@pytest.mark.parametrize("bad, match", [
    (dict(batch_size=0), "batch_size"), (dict(lr=-1), "lr"), (dict(min_lr=1.0), "min_lr"),
    (dict(betas=(0.9, 1.5)), "betas"), (dict(precision="fp8"), "precision"),
    (dict(steps=None), "steps"), (dict(data=["a", "b"], data_mix=[1.0]), "data_mix"),
    (dict(schedule="linear"), "schedule"),
])
def test_validation_names_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_unknown_key_is_rejected():
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_tokens_give_steps():
    c = TrainConfig(steps=None, tokens=10_000, batch_size=2, seq_len=100)
    assert c.total_steps == 50


def test_model_config_from_preset_takes_tokenizer_vocab():
    c = TrainConfig(model="tiny", model_overrides={"n_layers": 2})
    m = c.model_config(vocab_size=8192)
    assert m.vocab_size == 8192 and m.n_layers == 2
    explicit = ModelConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                           head_dim=16, mlp_hidden=64)
    assert TrainConfig(model=explicit).model_config(vocab_size=8192) == explicit


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('steps = 7\nlr = 1e-3\nbetas = [0.9, 0.99]\ndata = ["a.txt", "b.txt"]\n'
                    'data_mix = [3, 1]\n[model]\npreset = "tiny"\nn_layers = 2\n')
    c = TrainConfig.load(path)
    assert c.steps == 7 and c.betas == (0.9, 0.99) and c.data == ["a.txt", "b.txt"]
    assert isinstance(c.model, ModelConfig) and c.model.n_layers == 2
    path.write_text("steps = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        TrainConfig.load(path)


def test_cli_flags_override_the_file(tmp_path):
    from retention.commands.train import add_commands, config_from_args
    path = tmp_path / "run.toml"
    path.write_text('steps = 7\nbatch_size = 3\nseq_len = 64\nout_dir = "runs/a"\n')
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", str(path), "--steps", "11", "--lr", "0.01",
                              "--out", str(tmp_path / "o"), "--save-every", "5", "--seed", "3",
                              "--model", "tiny", "--data", "synthetic", "--resume",
                              "--clip-norm", "0"])
    c = config_from_args(args)
    assert (c.steps, c.batch_size, c.seq_len, c.lr, c.save_every, c.seed) == (11, 3, 64, 0.01, 5, 3)
    assert c.out_dir == str(tmp_path / "o") and c.resume == "latest" and c.clip_norm is None
    assert c.model == "tiny" and c.data == "synthetic"


@pytest.mark.parametrize("module", ["retention.train", "retention.metrics", "retention.schedule",
                                    "retention.plot", "retention.train_data",
                                    "retention.commands.train"])
def test_training_core_imports_no_framework(module):
    import subprocess
    import sys
    code = (f"import sys, {module}\n"
            "bad = [m for m in ('torch', 'mlx', 'matplotlib') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
