"""The guide's facade: `DataProcessor().prepare_training_data(name, num_samples,
filter_quality=True)` streams a dataset, filters it, tokenizes it and yields packed NumPy
batches (input_ids, labels, loss_mask, doc_starts, segment_ids; see retention.data.packing).
"""
from __future__ import annotations

from retention.data.catalog import find_dataset
from retention.data.chat import (MalformedRecord, encode_chat, encode_preference, to_messages,
                                 to_preference)
from retention.data.filters import build_pipeline
from retention.data.packing import DocumentStream, PackedBatches
from retention.data.sources import open_mix
from retention.data.tokenizer import load_tokenizer

CHAT_FORMATS = ("alpaca", "dolly", "messages", "sharegpt", "auto")
PREFERENCE_FORMATS = ("hh-rlhf", "ultrafeedback", "preference", "auto")


class DataProcessor:
    """Loads, filters, tokenizes and packs training data.

    tokenizer: anything `load_tokenizer` takes (default: the built-in BPE, no network).
    The returned batch iterators are resumable: store `it.state_dict()` in a checkpoint and
    call `it.load_state_dict(state)` on a fresh one to continue where it stopped."""

    def __init__(self, tokenizer=None, seq_len: int = 1024, batch_size: int = 8,
                 seed: int = 0, filters="default"):
        self._tokenizer_spec = tokenizer
        self._tokenizer = None
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.filters = filters
        self.filter_report = None         # the last run's FilterReport
        self.malformed = 0                # chat/preference records that did not parse

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_spec)
        return self._tokenizer

    @staticmethod
    def _names(dataset_name) -> list[str]:
        if isinstance(dataset_name, (list, tuple)):
            return [n if isinstance(n, str) else n[0] for n in dataset_name]
        return [dataset_name]

    def data_format(self, dataset_name) -> str:
        """"text", a chat format or a preference format, from the catalog (local files and
        unknown Hub ids are plain text unless `format=` says otherwise)."""
        formats = set()
        for name in self._names(dataset_name):
            entry = find_dataset(name)
            formats.add(entry.format if entry is not None else "text")
        if len(formats) > 1:
            raise ValueError(f"cannot mix formats {sorted(formats)} in one stream")
        return formats.pop()

    def _source(self, dataset_name, split, raw, weights=None):
        return open_mix(dataset_name if isinstance(dataset_name, (list, tuple))
                        else [dataset_name], weights, seed=self.seed, split=split,
                        text_fields=() if raw else None)

    def prepare_training_data(self, dataset_name, num_samples: int | None = None,
                              filter_quality: bool = True, *, split: str = "train",
                              seq_len: int | None = None, batch_size: int | None = None,
                              weights=None, format: str | None = None,
                              drop_last: bool = True) -> PackedBatches:
        """Packed batches from `num_samples` records (None: all) of a catalog dataset, Hub
        id, local path, "builtin", or a list of them / (name, weight) pairs (a mix).
        Plain text is quality-filtered and deduplicated when `filter_quality`; chat data
        (alpaca, dolly, messages, sharegpt) is rendered with the chat template and only the
        replies carry loss."""
        fmt = format or self.data_format(dataset_name)
        tok = self.tokenizer
        self.malformed = 0
        if fmt in PREFERENCE_FORMATS and fmt != "auto":
            raise ValueError(f"{dataset_name} holds preference pairs; use "
                             f"prepare_preference_data()")
        if fmt == "text":
            pipeline = build_pipeline(self.filters) if filter_quality else None
            self.filter_report = pipeline.report if pipeline is not None else None

            def encode(record):
                text = pipeline(record["text"]) if pipeline is not None else record["text"]
                return None if text is None else (tok.encode(text), None)
            separator_is_target = True
        elif fmt in CHAT_FORMATS:
            def encode(record):
                try:
                    return encode_chat(tok, to_messages(record, None if fmt == "auto" else fmt))
                except MalformedRecord:
                    self.malformed += 1
                    return None
            separator_is_target = False     # only replies carry loss
        else:
            raise ValueError(f"unknown format {fmt!r}; use text or one of {CHAT_FORMATS}")
        source = self._source(dataset_name, split, raw=fmt != "text", weights=weights)
        docs = DocumentStream(source, encode, limit=num_samples)
        return PackedBatches(docs, seq_len or self.seq_len, batch_size or self.batch_size,
                             tok.eos_id, pad_id=tok.pad_id, drop_last=drop_last,
                             separator_is_target=separator_is_target)

    def prepare_preference_data(self, dataset_name, num_samples: int | None = None, *,
                                split: str = "train", format: str | None = None,
                                encode: bool = True):
        """Preference pairs {"prompt", "chosen", "rejected"} (plus chosen_ids/mask and
        rejected_ids/mask when `encode`) from hh-rlhf, UltraFeedback or plain records;
        malformed records are skipped and counted in `self.malformed`."""
        fmt = format or self.data_format(dataset_name)
        if fmt == "text":
            fmt = "auto"
        if fmt not in PREFERENCE_FORMATS:
            raise ValueError(f"{dataset_name} is not preference data (format {fmt!r})")
        source = self._source(dataset_name, split, raw=True)
        self.malformed = 0
        taken = 0
        for record in source:
            if num_samples is not None and taken >= num_samples:
                return
            taken += 1
            try:
                pair = to_preference(record, None if fmt == "auto" else fmt)
            except MalformedRecord:
                self.malformed += 1
                continue
            if encode:
                pair.update(encode_preference(self.tokenizer, pair))
            yield pair
