import gzip
import json
import time
from collections import Counter

import pytest

from .helpers import write_jsonl
from retention.data.sources import (BuiltinSource, HFSource, HubUnavailableError, LocalSource,
                                    MixedSource, open_mix, open_source)


def texts(source, n=None):
    out = []
    for record in source:
        out.append(record["text"])
        if n is not None and len(out) == n:
            break
    return out


def rows(n, prefix="doc"):
    return [{"text": f"{prefix} {i}", "id": i} for i in range(n)]


def write_parquet(path, records, row_group_size=4):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def write_zst(path, lines):
    import zstandard
    path.write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode() + b"\n"))
    return path


@pytest.fixture
def files(tmp_path):
    """The same 10 records in every supported format."""
    recs = rows(10)
    lines = [json.dumps(r) for r in recs]
    out = {
        "jsonl": write_jsonl(tmp_path / "a.jsonl", recs),
        "json": tmp_path / "a.json",
        "json_lines": tmp_path / "lines.json",
        "parquet": write_parquet(tmp_path / "a.parquet", recs),
        "gz": tmp_path / "a.jsonl.gz",
        "zst": write_zst(tmp_path / "a.jsonl.zst", lines),
    }
    out["json"].write_text(json.dumps(recs))
    out["json_lines"].write_text("\n".join(lines))
    with gzip.open(out["gz"], "wt") as f:
        f.write("\n".join(lines) + "\n")
    return out


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_lines", "parquet", "gz", "zst"])
def test_every_format_reads_and_resumes_exactly(files, kind):
    expected = [f"doc {i}" for i in range(10)]
    source = LocalSource(files[kind])
    assert texts(source) == expected
    for cut in (0, 1, 3, 4, 9, 10):
        first = LocalSource(files[kind])
        assert texts(first, cut) == expected[:cut] if cut else True
        state = json.loads(json.dumps(first.state_dict()))   # survives a checkpoint
        again = LocalSource(files[kind])
        again.load_state_dict(state)
        assert texts(again) == expected[cut:], (kind, cut)


def test_txt_modes_and_globs(tmp_path):
    (tmp_path / "one.txt").write_text("First paragraph.\n\nSecond paragraph.\nSame para.\n")
    (tmp_path / "two.txt").write_text("Another file.\n")
    assert texts(LocalSource(tmp_path / "*.txt")) == [
        "First paragraph.\n\nSecond paragraph.\nSame para.", "Another file."]
    assert texts(LocalSource(str(tmp_path / "one.txt"), txt_mode="paragraph")) == [
        "First paragraph.", "Second paragraph.\nSame para."]
    assert len(texts(LocalSource(str(tmp_path), txt_mode="line"))) == 4   # a folder
    src = LocalSource(str(tmp_path / "*.txt"), txt_mode="line")
    assert texts(src, 2) == ["First paragraph.", "Second paragraph."]
    rest = LocalSource(str(tmp_path / "*.txt"), txt_mode="line")
    rest.load_state_dict(src.state_dict())
    assert texts(rest) == ["Same para.", "Another file."]


def test_malformed_records_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"text": "good one"}, "{not json", {"title": "no text"}, {"text": 42}, "[1, 2]",
        "", {"text": "   "}, {"text": "good two"}, "\xff\xfe garbage",
    ])
    source = LocalSource(path)
    assert texts(source) == ["good one", "good two"]
    m = source.stats.malformed
    assert m["bad_json"] == 2 and m["missing_field:text"] == 1 and m["wrong_type:text"] == 1
    assert m["not_an_object"] == 1 and m["empty_text"] == 1
    assert source.stats.records == 2 and source.stats.skipped == 6
    # Resuming after a malformed stretch still lands on the right record.
    first = LocalSource(path)
    assert texts(first, 1) == ["good one"]
    second = LocalSource(path)
    second.load_state_dict(first.state_dict())
    assert texts(second) == ["good two"]


def test_text_fields_join_and_raw_records(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"title": "T", "body": "B"}, {"body": "only"}])
    assert texts(LocalSource(path, text_fields=("title", "body"))) == ["T\n\nB", "only"]
    raw = list(LocalSource(path, text_fields=()))
    assert raw == [{"title": "T", "body": "B"}, {"body": "only"}]


def test_missing_and_empty_sources_fail_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        LocalSource(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        LocalSource(str(tmp_path / "*.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        LocalSource(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "junk.jsonl", ["{oops", {"no": "text"}])
    with pytest.raises(ValueError, match="no usable records.*bad_json"):
        list(LocalSource(tmp_path / "junk.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        LocalSource(tmp_path / "data.csv")


def test_hub_ids_fail_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("fineweb-edu", "HuggingFaceFW/fineweb-edu", "someone/some-dataset"):
        start = time.perf_counter()
        with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE.*builtin"):
            open_source(spec)
        assert time.perf_counter() - start < 1.0


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")     # nothing listens there
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="cannot be reached"):
        open_source("someone/some-dataset")
    assert time.perf_counter() - start < 5.0


def test_resolution_errors():
    with pytest.raises(FileNotFoundError, match="fineweb-edu"):
        open_source("finweb-edu")
    with pytest.raises(ValueError, match="blob ids"):
        open_source("the-stack-v2")
    with pytest.raises(ValueError, match="empty source"):
        open_source("  ")


def test_hf_source_streams_a_local_dataset_and_resumes(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_parquet(folder / "part-0.parquet", rows(6, "a"))
    write_parquet(folder / "part-1.parquet", rows(5, "b") + [{"text": None, "id": 99}])
    src = HFSource(str(folder))
    expected = [f"a {i}" for i in range(6)] + [f"b {i}" for i in range(5)]
    assert texts(src) == expected
    assert src.stats.malformed["missing_field:text"] == 1
    for cut in (2, 6, 8):
        first = HFSource(str(folder))
        texts(first, cut)
        state = json.loads(json.dumps(first.state_dict()))
        again = HFSource(str(folder))
        again.load_state_dict(state)
        assert texts(again) == expected[cut:]


def test_builtin_source_and_split():
    train = BuiltinSource("train")
    first = next(iter(train))
    assert first["text"].startswith("Genesis") or first["id"].startswith("kjv/")
    assert open_source("builtin:validation").split == "validation"
    with pytest.raises(ValueError, match="splits"):
        BuiltinSource("dev")


def _mix(tmp_path, seed=0, on_exhausted="drop", sizes=(40, 20, 10), weights=(0.5, 0.3, 0.2)):
    paths = [write_jsonl(tmp_path / f"s{i}.jsonl", rows(n, f"s{i}"))
             for i, n in enumerate(sizes)]
    return MixedSource([LocalSource(p) for p in paths], weights, seed=seed,
                       on_exhausted=on_exhausted)


def test_mixture_is_deterministic_and_follows_weights(tmp_path):
    a = texts(_mix(tmp_path, seed=3))
    assert a == texts(_mix(tmp_path, seed=3))
    assert a != texts(_mix(tmp_path, seed=4))
    assert sorted(a) == sorted([f"s0 {i}" for i in range(40)] + [f"s1 {i}" for i in range(20)]
                               + [f"s2 {i}" for i in range(10)])          # drop: all of each
    # Each source's records come in their own order.
    for s in ("s0", "s1", "s2"):
        mine = [t for t in a if t.startswith(s + " ")]
        assert mine == sorted(mine, key=lambda t: int(t.split()[1]))
    big = texts(_mix(tmp_path, sizes=(3000, 3000, 3000), on_exhausted="stop"))
    share = Counter(t.split()[0] for t in big)
    n = sum(share.values())
    assert abs(share["s0"] / n - 0.5) < 0.05 and abs(share["s2"] / n - 0.2) < 0.05


def test_mixture_resumes_exactly_at_every_cut(tmp_path):
    full = texts(_mix(tmp_path, seed=7))
    for cut in range(0, len(full) + 1, 7):
        first = _mix(tmp_path, seed=7)
        texts(first, cut) if cut else None
        state = json.loads(json.dumps(first.state_dict()))
        again = _mix(tmp_path, seed=7)
        again.load_state_dict(state)
        assert texts(again) == full[cut:], cut


def test_mixture_exhaustion_modes(tmp_path):
    stop = texts(_mix(tmp_path, on_exhausted="stop"))
    assert len(stop) < 70 and stop.count("s2 9") <= 1
    repeat = _mix(tmp_path, on_exhausted="repeat")
    many = texts(repeat, 300)
    assert len(many) == 300 and many.count("s2 0") >= 2
    state = repeat.state_dict()
    assert max(s["epoch"] for s in state["sources"]) >= 1
    with pytest.raises(ValueError, match="weights"):
        MixedSource([LocalSource(tmp_path / "s0.jsonl")], [1, 2])


def test_open_mix_takes_pairs(tmp_path):
    p0 = write_jsonl(tmp_path / "x.jsonl", rows(5, "x"))
    p1 = write_jsonl(tmp_path / "y.jsonl", rows(5, "y"))
    mix = open_mix([(str(p0), 0.9), (str(p1), 0.1)], seed=1)
    assert isinstance(mix, MixedSource) and mix.weights.tolist() == [0.9, 0.1]
    assert len(texts(mix)) == 10
    assert isinstance(open_mix([str(p0)]), LocalSource)
