"""`retention info` and `retention convert` (a checkpoint re-saved in another dtype, on either
backend)."""
import pytest

from retention import ModelConfig
from retention.checkpoint import read_checkpoint
from retention.cli import main

CONFIG = ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                     head_dim=8, mlp_hidden=32, chunk_size=8)


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "default backend" in out and "torch" in out and "mlx" in out


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_convert_to_bfloat16_and_back(tmp_path, backend):
    import retention
    model = retention.get_backend("torch").build_model(CONFIG, seed=0)
    retention.save_model(model, tmp_path / "f32")
    assert main(["convert", str(tmp_path / "f32"), str(tmp_path / "bf16"), "--dtype",
                 "bfloat16", "--backend", backend]) == 0
    assert set(read_checkpoint(tmp_path / "bf16").dtypes.values()) == {"BF16"}
    assert main(["convert", str(tmp_path / "bf16"), str(tmp_path / "back"), "--dtype",
                 "float32", "--backend", backend]) == 0
    assert set(read_checkpoint(tmp_path / "back").dtypes.values()) == {"F32"}
    assert read_checkpoint(tmp_path / "back").config == CONFIG


def test_convert_missing_source_exits_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_convert_keeps_the_tokenizer_files(tmp_path):
    import retention
    model = retention.get_backend("torch").build_model(CONFIG, seed=0)
    retention.save_model(model, tmp_path / "f32")
    (tmp_path / "f32" / "tokenizer.json").write_text('{"fake": true}')
    (tmp_path / "f32" / "tokenizer_config.json").write_text('{"eos_token": "x"}')
    assert main(["convert", str(tmp_path / "f32"), str(tmp_path / "bf16"), "--dtype",
                 "bfloat16", "--backend", "torch"]) == 0
    assert (tmp_path / "bf16" / "tokenizer.json").read_text() == '{"fake": true}'
    assert (tmp_path / "bf16" / "tokenizer_config.json").read_text() == '{"eos_token": "x"}'
