"""`retention quickstart` end to end (2 steps): built-in corpus, default tokenizer, checkpoint
with tokenizer, a generated sample, the plot, and where everything is."""
import pytest


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_quickstart_runs_end_to_end(tmp_path, capsys):
    from retention.cli import main
    out = tmp_path / "qs"
    assert main(["quickstart", "--steps", "2", "--out", str(out), "--backend", "torch"]) == 0
    text = capsys.readouterr().out
    assert "backend: torch; device: torch" in text
    assert "A sample (temperature 0.8):" in text and "In the beginning" in text
    for label in ("checkpoint:", "metrics:", "plot:"):
        assert label in text
    ckpt = out / "checkpoints" / "step_00000002"
    assert (ckpt / "tokenizer.json").exists() and (ckpt / "optimizer.safetensors").exists()
    assert (out / "training.png").exists() and (out / "metrics.jsonl").exists()
    from retention.config import ModelConfig
    config = ModelConfig.load(ckpt)
    assert config.vocab_size == 8192 and config.n_layers == 4 and config.d_model == 256


def test_quickstart_never_deletes_a_folder_that_is_not_a_run(tmp_path, capsys):
    from retention.cli import main
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    assert main(["quickstart", "--steps", "1", "--out", str(precious)]) == 2
    assert "holds no earlier run" in capsys.readouterr().err
    assert (precious / "thesis.txt").read_text() == "keep me"
