"""`retention generate` end to end on a tiny checkpoint with its own tokenizer.json."""
import io

import numpy as np
import pytest

from retention.cli import main
from retention.config import ModelConfig
from retention.prompt_state import PromptState

TEXT = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today"] * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXT, trainer=trainer)
    config = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=2,
                         n_kv_heads=2, head_dim=8, mlp_hidden=64, chunk_size=16)
    from retention.backends import get_backend
    torch_backend = get_backend("torch")
    path = tmp_path_factory.mktemp("ck") / "tiny"
    torch_backend.save_model(torch_backend.build_model(config, seed=0), path)
    tok.save(str(path / "tokenizer.json"))
    return path


def run(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_streams_text_and_reports_speed_and_state(checkpoint, capsys):
    code, out, err = run(capsys, "--checkpoint", checkpoint, "--prompt", "the cat",
                         "--max-new-tokens", 8, "--temperature", 0, "--backend", "torch",
                         "--ignore-eos")
    assert code == 0, err
    assert out.strip()
    assert "prefill:" in err and "tokens/s" in err and "decode: 8 tokens" in err
    assert "state: " in err and "MiB" in err


def test_reads_the_prompt_from_a_file_and_stdin(checkpoint, capsys, tmp_path, monkeypatch):
    argv = ["--checkpoint", checkpoint, "--max-new-tokens", 5, "--temperature", 0,
            "--backend", "torch", "--ignore-eos"]
    (tmp_path / "p.txt").write_text("the cat\n")      # as an editor saves it
    _, from_arg, _ = run(capsys, *argv, "--prompt", "the cat")
    _, from_file, _ = run(capsys, *argv, "--prompt-file", tmp_path / "p.txt")
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat\n"))   # as `echo` sends it
    _, from_stdin, _ = run(capsys, *argv)
    assert from_arg == from_file == from_stdin


def test_saved_state_continues_on_the_other_backend(checkpoint, capsys, tmp_path):
    state_file = tmp_path / "system.safetensors"
    common = ["--checkpoint", checkpoint, "--temperature", 0, "--ignore-eos"]
    code, _, err = run(capsys, *common, "--prompt", "the dog ran", "--max-new-tokens", 0,
                       "--save-state", state_file, "--backend", "torch")
    assert code == 0, err
    assert state_file.exists()
    state = PromptState.load(state_file)
    assert state.offset > 0 and state.logits is not None
    _, whole, _ = run(capsys, *common, "--prompt", "the dog ran in the", "--max-new-tokens", 6,
                      "--backend", "torch")
    code, resumed, err = run(capsys, *common, "--prompt", " in the", "--max-new-tokens", 6,
                             "--load-state", state_file, "--backend", "mlx")
    assert code == 0, err
    assert resumed == whole and "after a saved state" in err


def test_user_errors_exit_2_with_a_message(checkpoint, capsys, tmp_path):
    code, _, err = run(capsys, "--checkpoint", tmp_path / "nope", "--prompt", "x")
    assert code == 2 and "no checkpoint at" in err
    code, _, err = run(capsys, "--checkpoint", checkpoint, "--prompt", "x", "--top-p", 0,
                       "--backend", "torch")
    assert code == 2 and "top_p" in err
    bad = tmp_path / "bad.safetensors"
    PromptState([(np.zeros((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1), np.float32))], 3
                ).save(bad)
    code, _, err = run(capsys, "--checkpoint", checkpoint, "--prompt", "x", "--load-state", bad,
                       "--backend", "torch")
    assert code == 2 and "layers" in err


def test_streamer_does_not_print_the_eos_that_stopped_generation(checkpoint):
    from retention.commands.generate import TextStreamer, encode, eos_id, \
        load_checkpoint_tokenizer
    tok = load_checkpoint_tokenizer(checkpoint)
    out = io.StringIO()
    streamer = TextStreamer(tok, out)
    for t in encode(tok, "the cat") + [eos_id(tok)]:
        streamer.put(t)
    streamer.end()
    assert out.getvalue() == "the cat\n"


def test_stop_text_matches_however_it_was_tokenized(checkpoint, capsys):
    # The tiny model repeats " cat": "cat" alone tokenizes differently from " cat", yet the
    # text "cat" appears after the first new token, so generation stops there.
    common = ["--checkpoint", checkpoint, "--prompt", "the cat", "--max-new-tokens", 12,
              "--temperature", 0, "--backend", "torch", "--ignore-eos"]
    _, full, _ = run(capsys, *common)
    assert full.startswith(" cat cat")
    code, out, err = run(capsys, *common, "--stop", "cat")
    assert code == 0, err
    assert out == " cat\n" and "decode: 1 tokens" in err
    _, out, err = run(capsys, *common, "--stop", "t c")      # spans two tokens
    assert out == " cat cat\n" and "decode: 2 tokens" in err


def test_report_names_the_loaded_state_length_when_also_saving(checkpoint, capsys, tmp_path):
    common = ["--checkpoint", checkpoint, "--temperature", 0, "--ignore-eos",
              "--max-new-tokens", 1, "--backend", "torch"]
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run(capsys, *common, "--prompt", "the dog ran", "--save-state", first)
    n = PromptState.load(first).offset
    code, _, err = run(capsys, *common, "--prompt", " in the", "--load-state", first,
                       "--save-state", second)
    assert code == 0, err
    assert f"after a saved state of {n} tokens" in err
    assert PromptState.load(second).offset > n


def test_prompt_and_stop_text_may_hold_special_tokens(checkpoint):
    # A chat prompt written out by hand ("...<|im_end|>") must reach the model as the
    # special ids it was trained on, and a --stop on a special token must match that id.
    from retention.commands.generate import encode, eos_id, load_checkpoint_tokenizer
    tok = load_checkpoint_tokenizer(checkpoint)
    assert encode(tok, "the cat<|endoftext|>") == encode(tok, "the cat") + [eos_id(tok)]
    assert encode(tok, "<|endoftext|>") == [eos_id(tok)]
