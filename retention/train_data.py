"""Batches for the training loop: (inputs_BT, targets_BT) NumPy int32 pairs from a stream whose
position is a small JSON object, so a resumed run reads exactly the batches that come next.

`synthetic` is a learnable token stream with no tokenizer (tests, golden losses, smoke runs);
everything else goes through retention.data (sources, tokenizer) and is packed here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SYNTHETIC = "synthetic"
SYNTHETIC_VOCAB = 256


class SyntheticBatches:
    """Rows are arithmetic progressions mod the vocabulary with random start and stride, so the
    next token is predictable after two: the loss falls quickly, and batch i depends only on
    (seed, split, i)."""

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int,
                 split: str = "train"):
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.seed, self.split_id = seed, {"train": 0, "validation": 1}[split]
        self.index = 0

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_id, self.index])
        self.index += 1
        B, T, V = self.batch_size, self.seq_len, self.vocab_size
        start = rng.integers(0, V, size=(B, 1))
        stride = rng.integers(1, min(V, 17), size=(B, 1))
        rows = (start + stride * np.arange(T + 1)[None, :]) % V
        rows = rows.astype(np.int32)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"kind": SYNTHETIC, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


class PipelineBatches:
    """Batches from retention.data: a packer over a document stream (PackedBatches) or
    windows of prepared shards (RandomWindows/SequentialWindows). Each batch dict gives
    (input_ids, labels); labels are -100 where the loss mask is off (chat prompts). The
    position is the pipeline's own state_dict, taken after each batch.

    `restart` (packed sources only) starts another epoch when a single source runs out."""

    def __init__(self, pipeline, restart=None):
        self.pipeline, self.restart = pipeline, restart
        self._iter = None

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        if self._iter is None:
            self._iter = iter(self.pipeline)
        batch = next(self._iter, None)
        if batch is None:
            if self.restart is None:
                raise ValueError("the training data ran out; add data or lower --steps")
            self.restart()
            self._iter = iter(self.pipeline)
            batch = next(self._iter, None)
            if batch is None:
                raise ValueError("the training data holds less than one batch; lower "
                                 "--batch-size or --seq-len")
        return batch["input_ids"], batch["labels"]

    def state_dict(self) -> dict:
        return {"kind": "pipeline", "state": self.pipeline.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.pipeline.load_state_dict(state["state"])
        self._iter = None


class Data:
    """What the loop needs from the data: a train stream, a factory of identical validation
    streams, the vocabulary size and the tokenizer (saved with each checkpoint; None for
    synthetic data)."""

    def __init__(self, train, make_validation, vocab_size: int, tokenizer=None):
        self.train, self.make_validation = train, make_validation
        self.vocab_size, self.tokenizer = vocab_size, tokenizer


def source_names(config) -> list[str]:
    return config.data if isinstance(config.data, list) else [config.data]


def load_run_tokenizer(config):
    """The tokenizer named by config.tokenizer, else the default (built-in corpus) one."""
    from retention.data import tokenizer as tok
    if config.tokenizer:
        return tok.load_tokenizer(config.tokenizer)
    return tok.default_tokenizer()


def eos_id_of(tokenizer) -> int:
    for attr in ("eos_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"tokenizer {tokenizer!r} has no EOS token; documents cannot be packed")


def is_shard_dir(spec: str) -> bool:
    from retention.data.shards import INDEX_FILE
    return Path(spec).is_dir() and (Path(spec) / INDEX_FILE).is_file()


def build_data(config, model_vocab: int | None = None) -> Data:
    """Batch streams for `config.data`: "synthetic"; a directory of prepared shards (`retention
    data prepare`: random windows, its own tokenizer); or sources read through retention.data
    (mixed by config.data_mix, seeded by config.seed) packed with the run's tokenizer."""
    names = source_names(config)
    T, B, seed = config.seq_len, config.batch_size, config.seed
    if names == [SYNTHETIC]:
        vocab = model_vocab or SYNTHETIC_VOCAB
        return Data(SyntheticBatches(vocab, T, B, seed, "train"),
                    lambda: SyntheticBatches(vocab, T, B, seed, "validation"), vocab)
    if SYNTHETIC in names:
        raise ValueError("'synthetic' data cannot be mixed with other sources")
    if len(names) == 1 and is_shard_dir(names[0]):
        return _shard_data(config, names[0])
    if any(is_shard_dir(n) for n in names):
        raise ValueError("a prepared shard directory cannot be mixed with other sources; "
                         "prepare the mix into one directory with `retention data prepare`")
    from retention.data.packing import DocumentStream, PackedBatches
    from retention.data.prepare import DEFAULT_VAL_FRACTION, holdout
    from retention.data.sources import has_own_validation_split, open_mix
    tokenizer = load_run_tokenizer(config)
    eos = eos_id_of(tokenizer)

    def encode(record):
        return tokenizer.encode(record["text"]), None

    # Sources without a validation split of their own (local files, most hub sets) hold out a
    # hash-chosen share of documents, as `retention data prepare` does.
    hash_split = not all(has_own_validation_split(n) for n in names)

    def encode_split(split: str):
        if not hash_split:
            return encode
        want = split == "validation"
        return lambda record: (encode(record) if holdout(record["text"], DEFAULT_VAL_FRACTION)
                               == want else None)

    def stream(split: str) -> PipelineBatches:
        source = open_mix(names, config.data_mix, seed=seed,
                          split="train" if hash_split else split, on_exhausted="repeat")
        docs = DocumentStream(source, encode_split(split))
        packed = PackedBatches(docs, T, B, eos)

        def next_epoch():
            source.restart()
            packed.load_state_dict({"docs": docs.state_dict(), "offset": 0,
                                    "batches": packed.state_dict()["batches"]})
        return PipelineBatches(packed, next_epoch)

    train = stream("train")
    validation_split = "validation"
    try:
        stream(validation_split).next_batch()
    except (ValueError, FileNotFoundError) as e:
        print(f"no validation split ({e}); validation loss is measured on the first training "
              "batches")
        validation_split = "train"
    return Data(train, lambda: stream(validation_split), tokenizer.vocab_size, tokenizer)


def _shard_data(config, directory: str) -> Data:
    from retention.data.shards import RandomWindows, SequentialWindows, ShardDataset
    from retention.data.tokenizer import load_tokenizer
    train_set = ShardDataset(directory, "train")
    tokenizer = load_tokenizer(config.tokenizer or directory)
    if tokenizer.vocab_size != train_set.vocab_size:
        raise ValueError(f"{directory} was tokenized with a {train_set.vocab_size}-token "
                         f"vocabulary but --tokenizer has {tokenizer.vocab_size}; leave "
                         "--tokenizer out to use the shards' own")
    train = PipelineBatches(RandomWindows(train_set, config.seq_len, config.batch_size,
                                          seed=config.seed))
    try:
        val_set = ShardDataset(directory, "validation")
    except ValueError:
        print(f"{directory} has no validation split; validation uses training windows")
        val_set = train_set

    def validation() -> PipelineBatches:
        return PipelineBatches(SequentialWindows(val_set, config.seq_len, config.batch_size,
                                                 repeat=True))
    return Data(train, validation, train_set.vocab_size, tokenizer)
