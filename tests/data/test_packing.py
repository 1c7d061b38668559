import json

import numpy as np
import pytest

from .helpers import write_jsonl
from retention.data.packing import IGNORE_INDEX, DocumentStream, PackedBatches, make_batch
from retention.data.sources import LocalSource

EOS = 0


def int_docs(tmp_path, lengths, seed=0):
    """Documents of given lengths whose tokens are distinct positive ints."""
    rng = np.random.default_rng(seed)
    docs, start = [], 1
    for n in lengths:
        docs.append(list(range(start, start + n)))
        start += n
    rows = [{"text": " ".join(map(str, d))} for d in docs]
    rng.shuffle(rows)
    docs = [[int(x) for x in r["text"].split()] for r in rows]
    return write_jsonl(tmp_path / "ints.jsonl", rows), docs


def encode_ints(record):
    return [int(x) for x in record["text"].split()], None


def packed(path, T, B, limit=None, **kw):
    return PackedBatches(DocumentStream(LocalSource(path), encode_ints, limit=limit), T, B,
                         EOS, **kw)


def test_rows_are_the_eos_joined_stream(tmp_path):
    lengths = [5, 1, 17, 3, 40, 2, 9, 11, 7, 30]
    path, docs = int_docs(tmp_path, lengths)
    T, B = 8, 3
    stream = np.concatenate([[EOS] + d for d in docs])
    batches = list(packed(path, T, B))
    n_rows = (len(stream) - 1) // T
    assert len(batches) == n_rows // B
    for b, batch in enumerate(batches):
        for key in ("input_ids", "labels", "loss_mask", "doc_starts", "segment_ids"):
            assert batch[key].shape == (B, T), key
        assert batch["input_ids"].dtype == np.int32 and batch["labels"].dtype == np.int32
        for r in range(B):
            start = (b * B + r) * T
            assert batch["input_ids"][r].tolist() == stream[start:start + T].tolist()
            assert batch["labels"][r].tolist() == stream[start + 1:start + T + 1].tolist()
            assert (batch["doc_starts"][r] == (batch["input_ids"][r] == EOS)).all()
            seg = batch["segment_ids"][r]
            assert seg[0] == 0 and (np.diff(seg) == batch["doc_starts"][r][1:]).all()
        assert batch["loss_mask"].all()


def test_every_token_is_a_label_once(tmp_path):
    path, docs = int_docs(tmp_path, [13] * 12)
    T = 10
    labels = np.concatenate([b["labels"].ravel() for b in packed(path, T, 1)])
    stream = np.concatenate([[EOS] + d for d in docs])
    assert labels.tolist() == stream[1:1 + len(labels)].tolist()


@pytest.mark.parametrize("T, B", [(4, 1), (7, 2), (16, 3), (50, 2)])
def test_resume_from_any_batch_is_exact(tmp_path, T, B):
    path, _ = int_docs(tmp_path, [3, 25, 1, 8, 60, 4, 4, 19, 2, 33, 5, 12, 70, 6])
    full = list(packed(path, T, B))
    it = packed(path, T, B)
    states = []
    for batch in it:
        states.append(json.loads(json.dumps(it.state_dict())))
    assert len(states) == len(full)
    for k, state in enumerate(states):
        again = packed(path, T, B)
        again.load_state_dict(state)
        rest = list(again)
        assert len(rest) == len(full) - k - 1
        for got, want in zip(rest, full[k + 1:]):
            for key in want:
                assert np.array_equal(got[key], want[key]), (k, key)
        assert len(json.dumps(state)) < 300       # small enough for a checkpoint


def test_limit_and_padding(tmp_path):
    path, docs = int_docs(tmp_path, [5, 6, 7, 8])
    batches = list(packed(path, 16, 4, limit=2, drop_last=False, pad_id=EOS))
    assert len(batches) == 1
    b = batches[0]
    used = len(docs[0]) + len(docs[1]) + 2
    assert b["input_ids"].shape == (1, 16)
    assert b["loss_mask"][0, :used - 1].all() and not b["loss_mask"][0, used - 1:].any()
    assert (b["labels"][0, used - 1:] == IGNORE_INDEX).all()
    assert list(packed(path, 64, 1)) == []          # too few tokens for one full row


def test_make_batch_masks_and_segments():
    tokens = np.array([[0, 5, 6, 0, 7, 8]])
    starts = tokens == 0
    targets = np.array([[False, False, True, False, False, True]])
    b = make_batch(tokens, starts, targets)
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX, 8]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 1, 1]]
    b2 = make_batch(tokens[:, 1:], starts[:, 1:], None)
    assert b2["segment_ids"].tolist() == [[0, 0, 1, 1]]
