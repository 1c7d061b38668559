"""Tokenizer training and tokenizing throughput on the built-in corpus with the default
byte-level BPE (vocab 8192): training from scratch, encode one document at a time (one
thread), encode_batch (Rust threads, every core), and `data prepare` end to end (filters off,
shards written). Prints a table.

    python benchmarks/data_tokenize.py
"""
from __future__ import annotations

import os
import platform
import tempfile
import time

from retention.data import builtin
from retention.data.prepare import prepare_shards
from retention.data.tokenizer import default_tokenizer, train_bpe


def timed(fn):
    """(result, wall seconds, CPU seconds of all threads): CPU time stays meaningful when
    other jobs share the cores."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def row(label, seconds, cpu, tokens, n_bytes):
    rates = f"{tokens:>10} {tokens / seconds:>12,.0f} {tokens / cpu:>12,.0f}" if tokens \
        else f"{'':>10} {'':>12} {'':>12}"
    print(f"{label:<34} {seconds:>8.2f} {cpu:>8.2f} {rates} "
          f"{n_bytes / 1e6 / seconds * 60:>9.1f}")


def main():
    docs = builtin.load_documents(None)
    texts = [d["text"] for d in docs]
    n_bytes = sum(len(t.encode()) for t in texts)
    print(f"built-in corpus: {len(texts)} documents, {n_bytes / 1e6:.2f} MB; "
          f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'step':<34} {'wall s':>8} {'cpu s':>8} {'tokens':>10} {'tokens/s':>12} "
          f"{'tokens/cpu-s':>12} {'MB/min':>9}")

    train_texts = [d["text"] for d in builtin.load_documents("train")]
    _, wall, cpu = timed(lambda: train_bpe(train_texts, 8192))
    row("train BPE 8192 (train split)", wall, cpu, 0,
        sum(len(t.encode()) for t in train_texts))

    tok = default_tokenizer()
    n, wall, cpu = timed(lambda: sum(len(tok.encode(t)) for t in texts))
    row("encode, one document at a time", wall, cpu, n, n_bytes)
    n, wall, cpu = timed(lambda: sum(len(ids) for ids in tok.encode_batch(texts)))
    row("encode_batch (all cores)", wall, cpu, n, n_bytes)

    with tempfile.TemporaryDirectory() as out:
        index, wall, cpu = timed(lambda: prepare_shards("builtin", out, filters=None,
                                                        progress=False))
        n = sum(s["num_tokens"] for s in index["splits"].values())
        row("data prepare builtin (no filters)", wall, cpu, n, n_bytes)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
