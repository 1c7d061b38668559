"""Packing documents into fixed-length training rows, with document boundaries kept.

Layout: every document is written as [EOS] + its tokens, so EOS both ends the previous
document and opens the next one: a model resets its state at each `doc_starts` position
(the EOS) and predicts a document's first token from a clean state. A row holds T+1
consecutive tokens; input_ids = row[:-1], labels = row[1:], and the next row starts where
this one's labels end, so every token is a label exactly once.

Batches are dicts of NumPy arrays, B rows of T tokens:
    input_ids   [B,T] int32
    labels      [B,T] int32, IGNORE_INDEX (-100) where loss_mask is False
    loss_mask   [B,T] bool   (all True for plain text; only replies for chat data)
    doc_starts  [B,T] bool   True where a document begins (reset the recurrent state here)
    segment_ids [B,T] int32  0 for the row's first (possibly partial) document, +1 per start
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

IGNORE_INDEX = -100


def make_batch(tokens: np.ndarray, starts: np.ndarray, targets: np.ndarray | None) -> dict:
    """The batch dict from [B, T+1] tokens, doc-start flags and target flags."""
    tokens = np.asarray(tokens)
    input_ids = tokens[:, :-1].astype(np.int32)
    labels = tokens[:, 1:].astype(np.int32)
    loss_mask = np.ones(labels.shape, dtype=bool) if targets is None \
        else np.asarray(targets[:, 1:], dtype=bool)
    labels = np.where(loss_mask, labels, IGNORE_INDEX).astype(np.int32)
    doc_starts = np.asarray(starts[:, :-1], dtype=bool)
    counts = np.cumsum(doc_starts, axis=1, dtype=np.int32)
    segment_ids = counts - doc_starts[:, :1].astype(np.int32)
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
            "doc_starts": doc_starts, "segment_ids": segment_ids}


def with_separator(ids, targets, eos_id: int, separator_is_target: bool = True):
    """[EOS] + ids, the matching target flags and doc-start flags."""
    ids = np.asarray(ids, dtype=np.int64)
    full = np.empty(len(ids) + 1, dtype=np.int64)
    full[0] = eos_id
    full[1:] = ids
    tgt = np.empty(len(full), dtype=bool)
    tgt[0] = separator_is_target
    tgt[1:] = True if targets is None else np.asarray(targets, dtype=bool)
    starts = np.zeros(len(full), dtype=bool)
    starts[0] = True
    return full, tgt, starts


class DocumentStream:
    """Token documents from a record source: `encode(record)` returns (ids, targets) with
    targets None for plain text, or None to skip the record (filtered or malformed).
    Yields (position before the record, ids, targets); stops after `limit` records."""

    def __init__(self, source, encode: Callable, limit: int | None = None):
        self.source = source
        self.encode = encode
        self.limit = limit
        self._records = 0

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "records": self._records}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self._records = int(state["records"])

    def __iter__(self):
        it = iter(self.source)
        while self.limit is None or self._records < self.limit:
            before = self.state_dict()
            try:
                record = next(it)
            except StopIteration:
                return
            self._records += 1
            out = self.encode(record)
            if out is not None and len(out[0]):
                yield before, out[0], out[1]


class PackedBatches:
    """Resumable batches of packed rows from a DocumentStream.

    `state_dict()` after a batch is {"docs": <stream position before the document the next
    row starts in>, "offset": <tokens of that document already used>, "batches": n}; small
    and JSON-serializable. Restarting from it re-reads that one document and continues with
    exactly the rows that would have come next (filters that remember documents, such as
    dedup, start empty again)."""

    def __init__(self, docs: DocumentStream, seq_len: int, batch_size: int, eos_id: int, *,
                 pad_id: int | None = None, drop_last: bool = True,
                 separator_is_target: bool = True):
        if seq_len < 1 or batch_size < 1:
            raise ValueError("seq_len and batch_size must be positive")
        self.docs = docs
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.eos_id = int(eos_id)
        self.pad_id = int(eos_id if pad_id is None else pad_id)
        self.drop_last = drop_last
        self.separator_is_target = separator_is_target
        self._pos = {"docs": docs.state_dict(), "offset": 0, "batches": 0}

    def state_dict(self) -> dict:
        return {"docs": self._pos["docs"], "offset": self._pos["offset"],
                "batches": self._pos["batches"]}

    def load_state_dict(self, state: dict) -> None:
        self._pos = {"docs": state["docs"], "offset": int(state["offset"]),
                     "batches": int(state.get("batches", 0))}

    def __iter__(self) -> Iterator[dict]:
        T1 = self.seq_len + 1
        self.docs.load_state_dict(self._pos["docs"])
        skip = self._pos["offset"]
        pending: list[list] = []        # [position, tokens, targets, starts]
        head = 0                        # tokens of pending[0] already consumed
        available = 0
        rows: list[tuple] = []
        stream = iter(self.docs)
        exhausted = False
        while True:
            while available < T1 and not exhausted:
                item = next(stream, None)
                if item is None:
                    exhausted = True
                    break
                pos, ids, targets = item
                full, tgt, starts = with_separator(ids, targets, self.eos_id,
                                                   self.separator_is_target)
                pending.append([pos, full, tgt, starts])
                if skip:                # resuming inside this document
                    head, skip = skip, 0
                available += len(full) - (head if len(pending) == 1 else 0)
            if available < T1:
                if not self.drop_last and available >= 2:
                    rows.append(self._take(pending, head, available, pad=True))
                    available = 0
                if rows and not self.drop_last:
                    yield self._emit(rows, pending, head)
                return
            rows.append(self._take(pending, head, T1))
            # Advance by T tokens: the last label token opens the next row.
            head, available = self._advance(pending, head, self.seq_len, available)
            if len(rows) == self.batch_size:
                batch = self._emit(rows, pending, head)
                rows = []
                yield batch

    def _take(self, pending, head, n, pad=False):
        tok, tgt, st = [], [], []
        need, i, start = n, 0, head
        while need > 0 and i < len(pending):
            _, full, targets, starts = pending[i]
            piece = slice(start, min(len(full), start + need))
            tok.append(full[piece])
            tgt.append(targets[piece])
            st.append(starts[piece])
            need -= piece.stop - piece.start
            i, start = i + 1, 0
        tok, tgt, st = np.concatenate(tok), np.concatenate(tgt), np.concatenate(st)
        if pad:
            extra = self.seq_len + 1 - len(tok)
            tok = np.concatenate([tok, np.full(extra, self.pad_id, dtype=tok.dtype)])
            tgt = np.concatenate([tgt, np.zeros(extra, dtype=bool)])
            st = np.concatenate([st, np.zeros(extra, dtype=bool)])
        return tok, tgt, st

    @staticmethod
    def _advance(pending, head, n, available):
        available -= n
        head += n
        while pending and head >= len(pending[0][1]):
            head -= len(pending[0][1])
            pending.pop(0)
        return head, available

    def _emit(self, rows, pending, head) -> dict:
        tokens = np.stack([r[0] for r in rows])
        targets = np.stack([r[1] for r in rows])
        starts = np.stack([r[2] for r in rows])
        self._pos = {"docs": pending[0][0] if pending else self.docs.state_dict(),
                     "offset": head if pending else 0,
                     "batches": self._pos["batches"] + 1}
        return make_batch(tokens, starts, targets)
