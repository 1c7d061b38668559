"""Token shards on disk and the readers that train from them.

A prepared folder holds, per split, shards `{split}-00000.bin` (the token stream, uint16 when
the vocabulary fits, else uint32; each document written as [EOS] + tokens, never split across
shards), `{split}-00000.docs.npy` (int64 offsets where documents start) and, for chat data,
`{split}-00000.mask.bin` (uint8 target flags); plus `index.json` with the counts, dtype,
vocabulary, sources and filter report, and the tokenizer's files. Readers memory-map the
shards, so a random window costs a copy of T+1 tokens.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from retention.data.packing import make_batch

INDEX_FILE = "index.json"
FORMAT = "retention-token-shards"
VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in 16 bits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class ShardWriter:
    """Appends documents of one split to shards of about `shard_tokens` tokens."""

    def __init__(self, directory, split: str, vocab_size: int, *,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, with_mask: bool = False):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.shard_tokens = int(shard_tokens)
        self.with_mask = with_mask
        self.shards: list[dict] = []
        self._file = self._mask = None
        self._doc_offsets: list[int] = []
        self._tokens = 0

    def _open(self):
        stem = f"{self.split}-{len(self.shards):05d}"
        self._stem = stem
        self._file = open(self.directory / f"{stem}.bin", "wb")
        self._mask = open(self.directory / f"{stem}.mask.bin", "wb") if self.with_mask else None
        self._doc_offsets, self._tokens = [], 0

    def _close_shard(self):
        if self._file is None:
            return
        self._file.close()
        if self._mask is not None:
            self._mask.close()
        np.save(self.directory / f"{self._stem}.docs.npy",
                np.asarray(self._doc_offsets, dtype=np.int64))
        self.shards.append({"file": f"{self._stem}.bin", "docs": f"{self._stem}.docs.npy",
                            "mask": f"{self._stem}.mask.bin" if self.with_mask else None,
                            "num_tokens": self._tokens, "num_docs": len(self._doc_offsets)})
        self._file = self._mask = None
        self._doc_offsets, self._tokens = [], 0

    @property
    def num_tokens(self) -> int:
        """Tokens written so far, the open shard included."""
        return sum(s["num_tokens"] for s in self.shards) + self._tokens

    def add(self, tokens, targets=None) -> None:
        """One document, already laid out as [EOS] + ids (see packing.with_separator)."""
        tokens = np.asarray(tokens)
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} >= vocab_size {self.vocab_size}")
        if self._file is None:
            self._open()
        self._doc_offsets.append(self._tokens)
        self._file.write(tokens.astype(self.dtype).tobytes())
        if self._mask is not None:
            mask = np.ones(len(tokens), bool) if targets is None else np.asarray(targets)
            self._mask.write(mask.astype(np.uint8).tobytes())
        self._tokens += len(tokens)
        if self._tokens >= self.shard_tokens:
            self._close_shard()

    def close(self) -> dict:
        self._close_shard()
        return {"num_tokens": sum(s["num_tokens"] for s in self.shards),
                "num_docs": sum(s["num_docs"] for s in self.shards), "shards": self.shards}


class ShardDataset:
    """The shards of one split, memory-mapped, addressed as one stream of tokens."""

    def __init__(self, directory, split: str = "train"):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found; prepare shards with "
                                    f"`retention data prepare --source ... --out {directory}`")
        with open(index_path, encoding="utf-8") as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_path} is not a retention shard index")
        splits = self.index["splits"]
        if split not in splits or not splits[split]["shards"]:
            raise ValueError(f"{directory} has no {split!r} split; it has "
                             f"{[s for s in splits if splits[s]['shards']]}")
        self.split = split
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size = int(self.index["vocab_size"])
        self.eos_id = int(self.index["eos_id"])
        self.tokens, self.doc_offsets, self.masks = [], [], []
        for shard in splits[split]["shards"]:
            self.tokens.append(np.memmap(self.directory / shard["file"], dtype=self.dtype,
                                         mode="r"))
            self.doc_offsets.append(np.load(self.directory / shard["docs"]))
            self.masks.append(np.memmap(self.directory / shard["mask"], dtype=np.uint8,
                                        mode="r") if shard.get("mask") else None)
        self.lengths = np.array([len(t) for t in self.tokens], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        self.num_tokens = int(self.starts[-1])
        self.has_mask = all(m is not None for m in self.masks)

    def read(self, start: int, length: int):
        """(tokens int64, doc-start flags, target flags or None) of [start, start+length) of
        the split's token stream, crossing shard boundaries."""
        tok, st, tgt = [], [], []
        pos, end = int(start), int(start) + int(length)
        if start < 0 or end > self.num_tokens:
            raise IndexError(f"window [{start}, {end}) outside 0..{self.num_tokens}")
        while pos < end:
            s = int(np.searchsorted(self.starts, pos, side="right")) - 1
            a = pos - int(self.starts[s])
            b = min(int(self.lengths[s]), a + end - pos)
            tok.append(np.asarray(self.tokens[s][a:b], dtype=np.int64))
            flags = np.zeros(b - a, dtype=bool)
            offs = self.doc_offsets[s]
            lo, hi = np.searchsorted(offs, a), np.searchsorted(offs, b)
            flags[offs[lo:hi] - a] = True
            st.append(flags)
            if self.has_mask:
                tgt.append(np.asarray(self.masks[s][a:b], dtype=bool))
            pos += b - a
        return (np.concatenate(tok), np.concatenate(st),
                np.concatenate(tgt) if self.has_mask else None)

    def __len__(self) -> int:
        return self.num_tokens


def _batch_from_windows(dataset: ShardDataset, starts, length: int) -> dict:
    rows = [dataset.read(s, length) for s in starts]
    tokens = np.stack([r[0] for r in rows])
    flags = np.stack([r[1] for r in rows])
    targets = np.stack([r[2] for r in rows]) if dataset.has_mask else None
    return make_batch(tokens, flags, targets)


class RandomWindows:
    """Endless batches of windows at random offsets inside one shard each. Batch k depends
    only on (seed, k): position {"step": k} resumes exactly."""

    def __init__(self, dataset: ShardDataset, seq_len: int, batch_size: int, seed: int = 0):
        self.dataset, self.seq_len, self.batch_size = dataset, int(seq_len), int(batch_size)
        self.seed = int(seed)
        room = np.maximum(dataset.lengths - self.seq_len, 0).astype(np.float64)
        if room.sum() <= 0:
            raise ValueError(f"no shard of {dataset.directory} ({dataset.split}) holds "
                             f"seq_len + 1 = {self.seq_len + 1} tokens; use a shorter seq_len")
        self._p = room / room.sum()
        self._room = room.astype(np.int64)
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        shards = rng.choice(len(self._p), size=self.batch_size, p=self._p)
        offsets = (rng.random(self.batch_size) * self._room[shards]).astype(np.int64)
        starts = self.dataset.starts[shards] + offsets
        return _batch_from_windows(self.dataset, starts, self.seq_len + 1)

    def __iter__(self):
        while True:
            batch = self.batch(self.step)
            self.step += 1
            yield batch


class SequentialWindows:
    """Consecutive windows through the split (each token a label once per epoch). Position
    {"offset", "epoch"}; `repeat=True` starts another epoch at the end."""

    def __init__(self, dataset: ShardDataset, seq_len: int, batch_size: int, *,
                 repeat: bool = False):
        self.dataset, self.seq_len, self.batch_size = dataset, int(seq_len), int(batch_size)
        self.repeat = repeat
        if dataset.num_tokens < self.seq_len + 1:
            raise ValueError(f"{dataset.directory} ({dataset.split}) has {dataset.num_tokens} "
                             f"tokens, fewer than seq_len + 1 = {self.seq_len + 1}")
        self.offset, self.epoch = 0, 0

    def state_dict(self) -> dict:
        return {"offset": self.offset, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.offset, self.epoch = int(state["offset"]), int(state["epoch"])

    def num_batches(self) -> int:
        return (self.dataset.num_tokens - 1) // self.seq_len // self.batch_size

    def __iter__(self):
        T = self.seq_len
        while True:
            if self.offset + self.batch_size * T + 1 > self.dataset.num_tokens:
                if not self.repeat:
                    return
                self.offset, self.epoch = 0, self.epoch + 1
            starts = self.offset + T * np.arange(self.batch_size)
            batch = _batch_from_windows(self.dataset, starts, T + 1)
            self.offset += self.batch_size * T
            yield batch
