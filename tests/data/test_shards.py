import json

import numpy as np
import pytest

from .helpers import write_jsonl
from retention.data.prepare import prepare_shards
from retention.data.shards import (RandomWindows, SequentialWindows, ShardDataset, ShardWriter,
                                   token_dtype)
from retention.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("shards")
    index = prepare_shards("builtin", out, max_docs=120, shard_tokens=30_000, progress=False)
    return out, index


def test_index_and_files(prepared, tok):
    out, index = prepared
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk["dtype"] == "uint16" and on_disk["vocab_size"] == 8192
    assert on_disk["eos_id"] == tok.eos_id and on_disk["validation"] == "builtin split"
    assert on_disk["filters"] is None            # the curated built-in corpus is not filtered
    train = on_disk["splits"]["train"]
    assert len(train["shards"]) > 1 and train["num_docs"] == 120
    for shard in train["shards"]:
        size = (out / shard["file"]).stat().st_size
        assert size == 2 * shard["num_tokens"]
        assert len(np.load(out / shard["docs"])) == shard["num_docs"]
    assert on_disk["splits"]["validation"]["num_tokens"] > 0
    assert on_disk["tokens_per_second"] > 0
    # The tokenizer travels with the shards.
    assert load_tokenizer(out).encode("Let there be light") == tok.encode("Let there be light")


def test_shards_hold_the_documents_in_order(prepared, tok):
    out, _ = prepared
    ds = ShardDataset(out, "train")
    tokens, starts, mask = ds.read(0, ds.num_tokens)
    assert mask is None and starts[0] and tokens[0] == tok.eos_id
    assert (starts == (tokens == tok.eos_id)).all()
    docs = np.split(tokens, np.flatnonzero(starts)[1:])
    from retention.data.builtin import load_documents
    expected = load_documents("train")[:120]
    assert len(docs) == 120
    for doc, ref in zip(docs[:5] + docs[-3:], expected[:5] + expected[-3:]):
        assert tok.decode(doc[1:]) == ref["text"]
    # A read that spans a shard boundary equals the slices on both sides.
    edge = int(ds.starts[1])
    a, _, _ = ds.read(edge - 5, 10)
    assert a.tolist() == tokens[edge - 5:edge + 5].tolist()
    with pytest.raises(IndexError):
        ds.read(ds.num_tokens - 3, 10)


def test_random_windows_are_deterministic_and_resume(prepared, tok):
    out, _ = prepared
    ds = ShardDataset(out)
    it = RandomWindows(ds, seq_len=64, batch_size=4, seed=5)
    first = [next(iter(it)) for _ in range(3)]
    state = json.loads(json.dumps(it.state_dict()))
    fourth = next(iter(it))
    again = RandomWindows(ShardDataset(out), 64, 4, seed=5)
    assert np.array_equal(next(iter(again))["input_ids"], first[0]["input_ids"])
    again.load_state_dict(state)
    assert np.array_equal(next(iter(again))["input_ids"], fourth["input_ids"])
    other = RandomWindows(ds, 64, 4, seed=6)
    assert not np.array_equal(next(iter(other))["input_ids"], first[0]["input_ids"])
    b = first[1]
    assert b["input_ids"].shape == (4, 64) and b["input_ids"].dtype == np.int32
    assert (b["labels"][:, :-1] == b["input_ids"][:, 1:]).all()
    assert (b["doc_starts"] == (b["input_ids"] == tok.eos_id)).all()
    with pytest.raises(ValueError, match="seq_len"):
        RandomWindows(ds, seq_len=10**7, batch_size=1)


def test_sequential_windows_cover_the_split_and_resume(prepared):
    out, _ = prepared
    ds = ShardDataset(out, "validation")
    T, B = 128, 2
    seq = SequentialWindows(ds, T, B)
    batches = list(seq)
    assert len(batches) == seq.num_batches() > 2
    stream, _, _ = ds.read(0, ds.num_tokens)
    inputs = np.concatenate([b["input_ids"].ravel() for b in batches])
    assert inputs.tolist() == stream[:len(inputs)].tolist()
    resumed = SequentialWindows(ds, T, B)
    it = iter(resumed)
    next(it)
    state = resumed.state_dict()
    again = SequentialWindows(ds, T, B)
    again.load_state_dict(state)
    assert all(np.array_equal(a["input_ids"], b["input_ids"])
               for a, b in zip(again, batches[1:]))
    looping = SequentialWindows(ds, T, B, repeat=True)
    many = [b for _, b in zip(range(len(batches) + 2), looping)]
    assert looping.epoch == 1 and np.array_equal(many[-2]["input_ids"], batches[0]["input_ids"])


def test_token_dtype_and_writer_checks(tmp_path):
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(151_936) == np.uint32
    w = ShardWriter(tmp_path, "train", vocab_size=100_000)
    w.add(np.array([0, 70_000, 99_999]))
    info = w.close()
    assert info["num_tokens"] == 3
    assert np.fromfile(tmp_path / "train-00000.bin", dtype=np.uint32).tolist() == \
        [0, 70_000, 99_999]
    with pytest.raises(ValueError, match="vocab_size"):
        ShardWriter(tmp_path, "x", vocab_size=10).add(np.array([0, 10]))


def test_prepare_local_files_filters_and_holds_out(tmp_path, tok):
    good = ("The river town woke slowly under a pale winter sky, and the bakers were first "
            "to light their ovens. ")
    rows = [{"text": good + f"On day {i} the children counted {i} boats along the frozen "
             f"canal, and the farmers sold apples, cheese and bread in the square. The old "
             f"teacher explained why the water froze at the edges first. In the evening the "
             f"lamps were lit one by one. Everyone agreed it was the coldest week of year "
             f"{1900 + i}."} for i in range(300)]
    rows += [rows[0], {"text": "too short"}, "{bad json", {"text": 7}]
    src = write_jsonl(tmp_path / "web.jsonl", rows)
    index = prepare_shards(str(src), tmp_path / "out", val_fraction=0.1, progress=False)
    report = index["filters"]["report"]
    assert index["records_read"] == 302
    assert index["source_stats"]["malformed"] == {"bad_json": 1, "wrong_type:text": 1}
    assert report["dropped"]["exact_dedup:duplicate"]["docs"] >= 1
    assert report["docs_kept"] == index["documents_written"]
    train, val = index["splits"]["train"], index["splits"]["validation"]
    assert train["num_docs"] + val["num_docs"] == report["docs_kept"]
    assert 0 < val["num_docs"] < train["num_docs"]
    with pytest.raises(ValueError, match="overwrite"):
        prepare_shards(str(src), tmp_path / "out", progress=False)
    capped = prepare_shards(str(src), tmp_path / "out", overwrite=True, max_tokens=1000,
                            filters=None, progress=False)
    assert 1000 <= capped["splits"]["train"]["num_tokens"] < 1200


def test_prepare_chat_data_writes_masks(tmp_path, tok):
    rows = [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i + 1)))}
            for i in range(1, 30)]
    src = write_jsonl(tmp_path / "alpaca.jsonl", rows + [{"instruction": "no answer"}])
    index = prepare_shards(str(src), tmp_path / "sft", chat_format="alpaca", val_fraction=0,
                           progress=False)
    assert index["chat_format"] == "alpaca" and index["malformed_chat_records"] == 1
    ds = ShardDataset(tmp_path / "sft")
    assert ds.has_mask
    batch = next(iter(SequentialWindows(ds, 32, 2)))
    mask = batch["loss_mask"]
    assert mask.any() and not mask.all()
    assert (batch["labels"][~mask] == -100).all()
    replies = tok.decode(batch["labels"][mask])
    assert "<|im_end|>" in replies and "Count to" not in replies
    with pytest.raises(ValueError, match="no 'validation' split"):
        ShardDataset(tmp_path / "sft", "validation")
    with pytest.raises(FileNotFoundError, match="data prepare"):
        ShardDataset(tmp_path / "nothing")


def test_chat_format_of_catalog_sources():
    from retention.data.prepare import chat_format_of
    assert chat_format_of(["builtin", "fineweb-edu"]) is None
    assert chat_format_of(["alpaca"]) == "alpaca"
    assert chat_format_of(["alpaca", "alpaca"]) == "alpaca"
    assert chat_format_of(["alpaca", "dolly-15k"]) == "auto"
    with pytest.raises(ValueError, match="cannot mix"):
        chat_format_of(["alpaca", "builtin"])
