"""Local files have no validation split of their own: training holds out a hash-chosen share
of their documents (as `retention data prepare` does), so validation never sees training text."""
import json

from retention.config import TrainConfig
from retention.data.prepare import DEFAULT_VAL_FRACTION, holdout
from retention.data.sources import has_own_validation_split
from retention.train_data import build_data


def test_local_files_hold_out_documents_for_validation(tmp_path):
    docs = [f"record {i:05d} says hello to the world and goes on." for i in range(3000)]
    held = {d for d in docs if holdout(d, DEFAULT_VAL_FRACTION)}
    assert 0 < len(held) < 60
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = build_data(TrainConfig(data=str(path), seq_len=32, batch_size=4))
    tok = data.tokenizer

    def seen(stream, n):
        text = "".join(tok.decode([int(t) for t in stream.next_batch()[0].ravel()])
                       for _ in range(n))
        return {f"record {i:05d}" for i in range(3000) if f"record {i:05d}" in text}

    ids = {d[:12]: d in held for d in docs}
    val, train = seen(data.make_validation(), 4), seen(data.train, 20)
    assert val and all(ids[r] for r in val)
    assert train and not any(ids[r] for r in train)


def test_which_sources_have_their_own_split(tmp_path):
    assert has_own_validation_split("builtin")
    assert has_own_validation_split("tinystories")          # the catalog names its split
    assert not has_own_validation_split("fineweb-edu")      # one split only on the hub
    assert not has_own_validation_split(str(tmp_path / "docs.jsonl"))
    assert not has_own_validation_split("someone/some-dataset")
