"""Record sources: Hugging Face datasets (streamed), local files and globs, the built-in
corpus, and a seeded mixture of several.

Every source iterates dict records and has `state_dict()` / `load_state_dict()`: a small
JSON-serializable position, updated before each record is handed out, so a run that stores
it after record r and restarts from it gets exactly the records after r. Malformed records
(bad JSON, missing or non-string text field, not an object) are skipped and counted in
`source.stats`; they never stop a run. A missing file, a source with no usable record and a
Hub id without network fail at once with a message that says what to do.

Records are {"text": str, ...} when the source extracts text (the default), or the original
record dict when `text_fields=()` (instruction and preference data, see retention.data.chat).
"""
from __future__ import annotations

import copy
import glob
import gzip
import io
import json
import os
import re
import socket
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from retention.data import builtin
from retention.data.catalog import DatasetInfo, closest_names, find_dataset

# Plain text, markup and source code: read as text (one file = one document by default).
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".tex", ".html", ".py", ".c", ".h", ".cc",
                 ".cpp", ".hpp", ".cu", ".rs", ".go", ".java", ".js", ".ts", ".swift", ".rb",
                 ".sh", ".metal", ".toml", ".yaml", ".yml")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GLOB_CHARS = set("*?[")


class HubUnavailableError(ValueError):
    """A Hub dataset or tokenizer was asked for but the Hub cannot be reached."""


class SourceStats:
    """Counts of records handed out and skipped, with the reason for each skip."""

    def __init__(self):
        self.records = 0
        self.malformed: Counter = Counter()

    def skip(self, reason: str) -> None:
        self.malformed[reason] += 1

    @property
    def skipped(self) -> int:
        return sum(self.malformed.values())

    def to_dict(self) -> dict:
        return {"records": self.records, "skipped": self.skipped,
                "malformed": dict(self.malformed)}

    def describe(self) -> str:
        if not self.malformed:
            return f"{self.records} records, none malformed"
        reasons = ", ".join(f"{k}: {v}" for k, v in self.malformed.most_common())
        return f"{self.records} records, {self.skipped} malformed skipped ({reasons})"


def _truthy(value: str | None) -> bool:
    return str(value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or \
        _truthy(os.environ.get("HF_DATASETS_OFFLINE"))


def check_hub_reachable(what: str, timeout: float = 3.0) -> None:
    """Fail at once, not after the Hub client's retries, when `what` (a Hub id) cannot be
    fetched: offline mode is on, or the endpoint does not answer within `timeout` seconds."""
    hint = ("use a local path (txt, jsonl, json, parquet, .gz/.zst) or `--source builtin`, "
            "which needs no network")
    if hub_offline():
        raise HubUnavailableError(
            f"{what!r} is not a local path, so it names a Hugging Face Hub repo, but "
            f"HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and the Hub needs the network; unset "
            f"it, or {hint}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^\w+://", "", endpoint).split("/")[0]
    host, _, port = host.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout).close()
    except OSError as e:
        raise HubUnavailableError(
            f"{what!r} is not a local path, so it names a Hugging Face Hub repo, but {host} "
            f"cannot be reached ({e}); check the network, or {hint}") from None


def extract_text(record, text_fields: Sequence[str], stats: SourceStats):
    """The record as {"text": ...} (fields joined by a blank line), the record itself when
    `text_fields` is empty, or None (counted in `stats`) when it is malformed."""
    if not isinstance(record, dict):
        stats.skip("not_an_object")
        return None
    if not text_fields:
        return record
    parts = []
    for name in text_fields:
        value = record.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            stats.skip(f"wrong_type:{name}")
            return None
        if value.strip():
            parts.append(value)
    if not parts:
        missing = all(record.get(n) is None for n in text_fields)
        stats.skip(f"missing_field:{text_fields[0]}" if missing else "empty_text")
        return None
    out = {"text": "\n\n".join(parts)}
    if "id" in record:
        out["id"] = record["id"]
    return out


class Source:
    """Base class: subclasses implement `_records()` (one pass from the current position,
    updating `self._pos` before each yield), `_restart()` and `_at_start()`."""

    name = "source"

    def __init__(self):
        self.stats = SourceStats()

    def __iter__(self) -> Iterator[dict]:
        fresh = self._at_start()
        count = 0
        for record in self._records():
            count += 1
            self.stats.records += 1
            yield record
        if fresh and count == 0:
            raise ValueError(f"source {self.name!r} has no usable records "
                             f"({self.stats.describe()}); check the path, the format and "
                             f"the text field")

    def state_dict(self) -> dict:
        return copy.deepcopy(self._pos)

    def load_state_dict(self, state: dict) -> None:
        self._pos = copy.deepcopy(dict(state))

    def restart(self) -> None:
        """Go back to the first record for another epoch."""
        epoch = self._pos.get("epoch", 0) + 1
        self._restart()
        self._pos["epoch"] = epoch

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ---------------------------------------------------------------------------------------------
# Local files


def file_kind(path: Path) -> tuple[str, str | None]:
    """(format, compression) from the file name: jsonl, json, txt or parquet."""
    name = path.name.lower()
    compression = None
    for ext, comp in COMPRESSIONS.items():
        if name.endswith(ext):
            compression, name = comp, name[: -len(ext)]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(".json"):
        return "json", compression
    if name.endswith(TEXT_SUFFIXES):
        return "txt", compression
    if name.endswith(".parquet") and compression is None:
        return "parquet", None
    raise ValueError(f"{path}: unsupported file type; use .jsonl, .json, .parquet or text "
                     f"({', '.join(TEXT_SUFFIXES)}); jsonl/json/text may end in .gz or .zst")


def _open_binary(path: Path, compression: str | None):
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"),
                                                                            closefd=True))
    return open(path, "rb")


def expand_paths(patterns: str | Sequence[str]) -> list[Path]:
    """Files matching the paths, globs or folders (a folder means every supported file
    below it), sorted, each once."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in map(str, patterns):
        p = Path(pattern).expanduser()
        if p.is_dir():
            found = [f for f in sorted(p.rglob("*")) if f.is_file() and _supported(f)]
        elif _GLOB_CHARS & set(pattern):
            found = [Path(f) for f in sorted(glob.glob(str(p), recursive=True))
                     if Path(f).is_file()]
        else:
            found = [p] if p.is_file() else []
        if not found:
            raise FileNotFoundError(f"no file matches {pattern!r}; give an existing file, "
                                    f"folder or glob (txt, jsonl, json, parquet, .gz/.zst)")
        files.extend(found)
    seen, out = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


def _supported(path: Path) -> bool:
    try:
        file_kind(path)
        return True
    except ValueError:
        return False


class LocalSource(Source):
    """Records from local files: JSON lines, JSON (an array, one object or JSON lines),
    text and parquet; jsonl/json/txt may be gzip- or zstd-compressed.

    txt_mode: "document" (a file is one record), "paragraph" (blank-line separated) or
    "line". Position: {"file", "record", "byte", "epoch"}; uncompressed files resume by byte
    offset, compressed ones by skipping `record` records."""

    def __init__(self, paths, *, text_fields: Sequence[str] = ("text",), txt_mode="document",
                 name: str | None = None):
        super().__init__()
        if txt_mode not in ("document", "paragraph", "line"):
            raise ValueError("txt_mode must be 'document', 'paragraph' or 'line'")
        self.files = expand_paths(paths)
        for f in self.files:
            file_kind(f)
        if all(f.stat().st_size == 0 for f in self.files):
            raise ValueError(f"source {paths!r}: every matching file is empty")
        self.text_fields = tuple(text_fields)
        self.txt_mode = txt_mode
        self.name = name or (str(paths) if isinstance(paths, (str, os.PathLike))
                             else ",".join(map(str, paths)))
        self._restart()

    def _restart(self):
        self._pos = {"file": 0, "record": 0, "byte": 0, "epoch": 0}

    def _at_start(self):
        return self._pos["file"] == 0 and self._pos["record"] == 0

    def _records(self):
        while self._pos["file"] < len(self.files):
            index = self._pos["file"]
            path = self.files[index]
            kind, compression = file_kind(path)
            reader = {"jsonl": self._jsonl, "json": self._json, "txt": self._txt,
                      "parquet": self._parquet}[kind]
            for record, next_record, next_byte in reader(path, compression):
                self._pos.update(record=next_record, byte=next_byte)
                if record is None:          # malformed, already counted by the reader
                    continue
                out = extract_text(record, self.text_fields, self.stats) \
                    if kind != "txt" else record
                if out is not None:
                    yield out
            self._pos.update(file=index + 1, record=0, byte=0)

    # Each reader yields (record or None, index of the next record, byte offset of it or None)
    # starting at self._pos; a None record was malformed and has been counted.

    def _jsonl(self, path, compression):
        start_record, start_byte = self._pos["record"], self._pos["byte"]
        with _open_binary(path, compression) as f:
            seekable = compression is None
            if seekable:
                f.seek(start_byte)
            offset, n = (start_byte if seekable else 0), (start_record if seekable else 0)
            for line in f:
                offset += len(line)
                n += 1
                if not seekable and n <= start_record:
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (UnicodeDecodeError, ValueError):
                    self.stats.skip("bad_json")
                    record = None
                else:
                    if not isinstance(record, dict):
                        self.stats.skip("not_an_object")
                        record = None
                yield record, n, offset if seekable else None

    def _json(self, path, compression):
        with _open_binary(path, compression) as f:
            data = f.read()
        try:
            parsed = json.loads(data)
            records = parsed if isinstance(parsed, list) else [parsed]
        except (UnicodeDecodeError, ValueError):
            # Not one JSON value: read it as JSON lines instead.
            records = []
            for line in data.splitlines():
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except (UnicodeDecodeError, ValueError):
                    records.append(_BAD_JSON)
        for i in range(self._pos["record"], len(records)):
            record = records[i]
            if record is _BAD_JSON:
                self.stats.skip("bad_json")
                record = None
            elif not isinstance(record, dict):
                self.stats.skip("not_an_object")
                record = None
            yield record, i + 1, None

    def _txt(self, path, compression):
        with _open_binary(path, compression) as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.stats.skip("bad_utf8")
            return
        if self.txt_mode == "document":
            pieces = [text]
        elif self.txt_mode == "paragraph":
            pieces = re.split(r"\n\s*\n", text)
        else:
            pieces = text.splitlines()
        for i in range(self._pos["record"], len(pieces)):
            piece = pieces[i].strip("\n")
            if piece.strip():
                yield {"text": piece}, i + 1, None
            else:
                self.stats.skip("empty_text")
                yield None, i + 1, None

    def _parquet(self, path, compression):
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        columns = [c for c in self.text_fields if c in names] if self.text_fields else None
        if self.text_fields and not columns:
            columns = []
        start = self._pos["record"]
        # Skip whole row groups before the position without reading them.
        first_row, group = 0, 0
        while group < pf.num_row_groups and \
                first_row + pf.metadata.row_group(group).num_rows <= start:
            first_row += pf.metadata.row_group(group).num_rows
            group += 1
        n = first_row
        for batch in pf.iter_batches(batch_size=1024, row_groups=range(group, pf.num_row_groups),
                                     columns=columns):
            rows = batch.to_pylist() if batch.num_columns else [{}] * batch.num_rows
            for row in rows:
                n += 1
                if n <= start:
                    continue
                yield row, n, None


_BAD_JSON = object()


# ---------------------------------------------------------------------------------------------
# Built-in corpus and Hugging Face datasets


class BuiltinSource(Source):
    """The built-in offline corpus (retention.data.builtin), one split."""

    def __init__(self, split: str = "train"):
        super().__init__()
        self.split = split
        self.name = f"builtin:{split}"
        self.documents = builtin.load_documents(split)
        self._restart()

    def _restart(self):
        self._pos = {"index": 0, "epoch": 0}

    def _at_start(self):
        return self._pos["index"] == 0

    def _records(self):
        while self._pos["index"] < len(self.documents):
            doc = self.documents[self._pos["index"]]
            self._pos["index"] += 1
            yield {"text": doc["text"], "id": doc["id"]}


class HFSource(Source):
    """A Hugging Face dataset, streamed (nothing is downloaded whole). `path` is a Hub id or a
    local dataset folder. Position: the datasets library's own iterable state plus epoch."""

    def __init__(self, path: str, config: str | None = None, *, split: str = "train",
                 text_fields: Sequence[str] = ("text",), name: str | None = None,
                 **load_kwargs):
        super().__init__()
        self.path, self.config, self.split = path, config, split
        self.text_fields = tuple(text_fields)
        self.name = name or path
        if not Path(path).expanduser().exists():
            check_hub_reachable(path)
        import datasets
        try:
            self._ds = datasets.load_dataset(path, config, split=split, streaming=True,
                                             **load_kwargs)
        except ConnectionError as e:
            raise HubUnavailableError(f"cannot stream {path!r}: {e}") from None
        self._initial = copy.deepcopy(self._ds.state_dict())
        self._pos = {"hf": copy.deepcopy(self._initial), "epoch": 0, "fresh": True}

    def _restart(self):
        self._pos = {"hf": copy.deepcopy(self._initial), "epoch": 0, "fresh": True}

    def _at_start(self):
        return self._pos.get("fresh", False)

    def _records(self):
        self._ds.load_state_dict(copy.deepcopy(self._pos["hf"]))
        for record in self._ds:
            self._pos = {"hf": copy.deepcopy(self._ds.state_dict()),
                         "epoch": self._pos["epoch"], "fresh": False}
            out = extract_text(record, self.text_fields, self.stats)
            if out is not None:
                yield out


# ---------------------------------------------------------------------------------------------
# Mixtures


class MixedSource(Source):
    """Records drawn from several sources with probabilities proportional to `weights`.

    The choice at step k depends only on (seed, k) and which sources are exhausted, so the
    position {"step", "done", "sources": [...]} restores the exact sequence.
    on_exhausted: "drop" (go on with the others, renormalized), "stop" (end when any source
    ends) or "repeat" (restart that source: another epoch)."""

    BLOCK = 4096

    def __init__(self, sources: Sequence[Source], weights: Sequence[float] | None = None, *,
                 seed: int = 0, on_exhausted: str = "drop"):
        super().__init__()
        if not sources:
            raise ValueError("a mixture needs at least one source")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
        if on_exhausted not in ("drop", "stop", "repeat"):
            raise ValueError("on_exhausted must be 'drop', 'stop' or 'repeat'")
        self.sources = list(sources)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.seed = int(seed)
        self.on_exhausted = on_exhausted
        self.name = "mix(" + ", ".join(f"{s.name}:{w:g}" for s, w in zip(sources, weights)) + ")"
        self._iters: list = [None] * len(sources)
        self._block = (-1, None)
        self._pos = {"step": 0, "done": [w == 0 for w in weights]}

    def _uniform(self, step: int) -> float:
        block = step // self.BLOCK
        if self._block[0] != block:
            self._block = (block, np.random.default_rng([self.seed, block]).random(self.BLOCK))
        return float(self._block[1][step % self.BLOCK])

    def _at_start(self):
        return self._pos["step"] == 0

    def _restart(self):
        for s in self.sources:
            s.restart()
        self._iters = [None] * len(self.sources)
        self._pos = {"step": 0, "done": [w == 0 for w in self.weights]}

    def _pull(self, i: int):
        if self._iters[i] is None:
            self._iters[i] = iter(self.sources[i])
        try:
            return next(self._iters[i])
        except StopIteration:
            self._iters[i] = None
            return None

    def _records(self):
        while True:
            done = self._pos["done"]
            active = [i for i in range(len(self.sources)) if not done[i]]
            if not active:
                return
            w = self.weights[active]
            u = self._uniform(self._pos["step"])
            j = int(np.searchsorted(np.cumsum(w) / w.sum(), u, side="right"))
            i = active[min(j, len(active) - 1)]
            record = self._pull(i)
            if record is None and self.on_exhausted == "repeat":
                self.sources[i].restart()
                record = self._pull(i)
                if record is None:
                    raise ValueError(f"source {self.sources[i].name!r} yields nothing")
            if record is None:
                if self.on_exhausted == "stop":
                    self._pos["done"] = [True] * len(self.sources)
                    return
                self._pos["done"][i] = True
                continue        # same step, same draw, among the sources that are left
            self._pos["step"] += 1
            yield record

    def state_dict(self) -> dict:
        return {"step": self._pos["step"], "done": list(self._pos["done"]),
                "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["sources"]) != len(self.sources):
            raise ValueError(f"position has {len(state['sources'])} sources, the mixture "
                             f"{len(self.sources)}")
        for s, sub in zip(self.sources, state["sources"]):
            s.load_state_dict(sub)
        self._iters = [None] * len(self.sources)
        self._pos = {"step": int(state["step"]), "done": [bool(d) for d in state["done"]]}

    def restart(self) -> None:
        self._restart()

    @property
    def source_stats(self) -> dict[str, dict]:
        return {s.name: s.stats.to_dict() for s in self.sources}


# ---------------------------------------------------------------------------------------------
# Resolving a name or path


def _looks_local(spec: str) -> bool:
    p = Path(spec).expanduser()
    if p.exists() or _GLOB_CHARS & set(spec) or spec.startswith((".", "/", "~")):
        return True
    try:
        file_kind(p)
        return True
    except ValueError:
        return False


def _hf_split(entry: DatasetInfo, split: str) -> str:
    if split == "train":
        return entry.split
    if split == "validation":
        if entry.validation_split is None:
            raise ValueError(f"{entry.name} has no validation split; hold documents out of "
                             f"train instead (prepare --val-fraction)")
        return entry.validation_split
    return split


def has_own_validation_split(spec: str) -> bool:
    """Whether `spec` publishes a validation split: the built-in corpus, and catalog datasets
    that name one. Local files and other hub ids do not."""
    spec = str(spec).strip()
    if spec == "builtin" or spec.startswith("builtin:"):
        return True
    entry = find_dataset(spec)
    return entry is not None and not _looks_local(spec) and (
        entry.name == "builtin" or entry.validation_split is not None)


def open_source(spec: str, *, split: str = "train", text_fields: Sequence[str] | None = None,
                txt_mode: str = "document", **hf_kwargs) -> Source:
    """A source for a catalog name, a Hub id, a local path/glob/folder, or "builtin"
    ("builtin:validation" for that split). `text_fields=()` hands out whole records (for
    instruction and preference data); None uses the catalog's field or "text"."""
    spec = str(spec).strip()
    if not spec:
        raise ValueError("empty source; give a catalog name, a Hub id, a path or 'builtin'")
    if spec == "builtin" or spec.startswith("builtin:"):
        return BuiltinSource(spec.partition(":")[2] or split)
    entry = find_dataset(spec)
    if entry is not None and not _looks_local(spec):
        if entry.name == "builtin":
            return BuiltinSource(split)
        fields = entry.text_fields if text_fields is None else tuple(text_fields)
        if not fields and entry.format == "text":
            raise ValueError(f"{entry.name} holds no text to stream: {entry.notes}")
        return HFSource(entry.hf_path, entry.config, split=_hf_split(entry, split),
                        text_fields=fields, name=entry.name, **hf_kwargs)
    fields = ("text",) if text_fields is None else tuple(text_fields)
    if _looks_local(spec):
        return LocalSource(spec, text_fields=fields, txt_mode=txt_mode)
    if _HUB_ID.match(spec):
        return HFSource(spec, hf_kwargs.pop("config", None), split=split, text_fields=fields,
                        **hf_kwargs)
    close = closest_names(spec)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise FileNotFoundError(f"{spec!r} is neither a file, a catalog dataset nor a Hub id "
                            f"(owner/name){hint}")


def open_mix(specs: Sequence[str] | Sequence[tuple[str, float]],
             weights: Sequence[float] | None = None, *, seed: int = 0, split: str = "train",
             on_exhausted: str = "drop", **kwargs) -> Source:
    """One source, or a MixedSource over several. `specs` may be names or (name, weight)
    pairs, such as `get_recommended_mix("10B")`."""
    specs = list(specs)
    if specs and isinstance(specs[0], (tuple, list)):
        weights = [w for _, w in specs]
        specs = [s for s, _ in specs]
    if len(specs) == 1 and weights is None:
        return open_source(specs[0], split=split, **kwargs)
    sources = [open_source(s, split=split, **kwargs) for s in specs]
    return MixedSource(sources, weights, seed=seed, on_exhausted=on_exhausted)
