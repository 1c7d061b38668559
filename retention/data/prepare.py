"""`retention data prepare`: sources -> filters -> tokenizer -> token shards + index.json.

Documents are tokenized in batches (the Rust tokenizer uses every core) with a progress bar.
The built-in corpus keeps its own train/validation split; other sources hold out
`val_fraction` of documents, chosen by a hash of the text (stable across runs).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from retention.data.catalog import find_dataset
from retention.data.chat import MalformedRecord, encode_chat, to_messages
from retention.data.filters import build_pipeline
from retention.data.packing import with_separator
from retention.data.shards import (DEFAULT_SHARD_TOKENS, FORMAT, INDEX_FILE, VERSION,
                                   ShardWriter, token_dtype, write_json_atomic)
from retention.data.sources import open_mix
from retention.data.tokenizer import load_tokenizer

DEFAULT_VAL_FRACTION = 0.005


def _is_builtin(spec: str) -> bool:
    return spec == "builtin" or spec.startswith("builtin:")


def chat_format_of(specs) -> str | None:
    """The conversation format when every source is an instruct catalog entry."""
    entries = [find_dataset(s) for s in specs]
    chat = [e.format for e in entries if e is not None and e.category == "instruct"]
    if not chat:
        return None
    if len(chat) != len(specs):
        raise ValueError("cannot mix instruction and plain-text sources in one prepare run")
    return chat[0] if len(set(chat)) == 1 else "auto"


def holdout(text: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return (h % 1_000_000) < fraction * 1_000_000


def _clear(out: Path, overwrite: bool) -> None:
    if (out / INDEX_FILE).exists():
        if not overwrite:
            raise ValueError(f"{out} already holds prepared shards; pass --overwrite to "
                             f"replace them or choose another --out")
        for pattern in ("*.bin", "*.docs.npy", INDEX_FILE):
            for f in out.glob(pattern):
                f.unlink()


def prepare_shards(sources, out_dir, *, weights=None, tokenizer=None, filters="auto",
                   max_docs: int | None = None, max_tokens: int | None = None,
                   val_fraction: float | None = None,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, seed: int = 0,
                   chat_format: str | None = None, overwrite: bool = False,
                   progress: bool = True, batch_docs: int = 256) -> dict:
    """Tokenize `sources` (names, paths, or (name, weight) pairs) into shards under
    `out_dir`; returns the index written to out_dir/index.json. `max_docs` caps records
    read from the sources (per split for the built-in corpus), `max_tokens` the train
    tokens written. filters="auto" filters every source but the curated built-in corpus."""
    from tqdm import tqdm
    specs = [sources] if isinstance(sources, str) else list(sources)
    if specs and isinstance(specs[0], (tuple, list)):
        weights = [w for _, w in specs]
        specs = [s for s, _ in specs]
    if not specs:
        raise ValueError("give at least one --source")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear(out, overwrite)
    tok = load_tokenizer(tokenizer)
    fmt = chat_format or chat_format_of(specs)
    if filters == "auto":
        filters = None if all(_is_builtin(s) for s in specs) else "default"
    pipeline = build_pipeline(filters) if filters and fmt is None else None
    builtin_split = all(_is_builtin(s) for s in specs) and val_fraction is None
    fraction = 0.0 if builtin_split else (DEFAULT_VAL_FRACTION if val_fraction is None
                                          else float(val_fraction))
    if not 0 <= fraction < 1:
        raise ValueError("val_fraction must be in [0, 1)")
    text_fields = () if fmt else None
    plan = [("train", open_mix(specs, weights, seed=seed, split="train",
                               text_fields=text_fields))]
    if builtin_split:
        plan.append(("validation", open_mix(specs, weights, seed=seed, split="validation")))
    writers = {name: ShardWriter(out, name, tok.vocab_size, shard_tokens=shard_tokens,
                                 with_mask=fmt is not None)
               for name in ("train", "validation")}
    stats = {"records": 0, "kept": 0, "malformed_chat": 0}
    start = time.perf_counter()

    def full(split_name) -> bool:
        return split_name == "train" and max_tokens is not None and \
            writers["train"].num_tokens >= max_tokens

    def write(split_name, ids, targets, key: str) -> None:
        if fraction and holdout(key, fraction):
            split_name = "validation"
        if full(split_name):
            return
        tokens, tgt, _ = with_separator(ids, targets, tok.eos_id,
                                        separator_is_target=fmt is None)
        writers[split_name].add(tokens, tgt if fmt else None)
        stats["kept"] += 1

    for split_name, source in plan:
        bar = tqdm(total=max_docs, unit="doc", desc=f"prepare {split_name}", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True, mininterval=0.5)
        pending: list[str] = []

        def flush():
            for text, ids in zip(pending, tok.encode_batch(pending)):
                write(split_name, ids, None, text)
            pending.clear()
            bar.set_postfix(tokens=writers["train"].num_tokens, refresh=False)

        read = 0
        for record in source:
            stats["records"] += 1
            read += 1
            bar.update(1)
            if fmt is not None:
                try:
                    ids, targets = encode_chat(tok, to_messages(
                        record, None if fmt == "auto" else fmt))
                except MalformedRecord:
                    stats["malformed_chat"] += 1
                else:
                    write(split_name, ids, targets, json.dumps(record, sort_keys=True,
                                                               default=str))
            else:
                text = pipeline(record["text"]) if pipeline else record["text"]
                if text is not None:
                    pending.append(text)
                    if len(pending) >= batch_docs:
                        flush()
            if full(split_name) or (max_docs is not None and read >= max_docs):
                break
        if pending:
            flush()
        bar.close()
    seconds = time.perf_counter() - start

    splits = {name: w.close() for name, w in writers.items()}
    if splits["train"]["num_tokens"] == 0:
        raise ValueError("no document survived: every record was malformed or filtered "
                         "out; check --source, or relax --filters")
    tok.save(out)
    total_tokens = sum(s["num_tokens"] for s in splits.values())
    source = plan[0][1]
    index = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dtype": token_dtype(tok.vocab_size).name, "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id, "tokenizer": "tokenizer.json", "tokenizer_name": tok.name,
        "sources": [{"spec": s, "weight": None if weights is None else float(w)}
                    for s, w in zip(specs, weights or [None] * len(specs))],
        "seed": seed, "chat_format": fmt,
        "validation": "builtin split" if builtin_split else f"hash holdout {fraction}",
        "records_read": stats["records"], "documents_written": stats["kept"],
        "malformed_chat_records": stats["malformed_chat"],
        "source_stats": getattr(source, "source_stats", None) or source.stats.to_dict(),
        "filters": None if pipeline is None else {
            "names": [getattr(f, "name", str(f)) for f in pipeline.filters],
            "report": pipeline.report.to_dict()},
        "seconds": round(seconds, 3),
        "tokens_per_second": round(total_tokens / seconds) if seconds > 0 else None,
        "splits": splits,
    }
    write_json_atomic(out / INDEX_FILE, index)
    return index

