"""Data pipeline: catalog and mixes, sources (Hub streaming, local files, the built-in
offline corpus), quality filters and dedup, tokenizers, packing, token shards, chat and
preference formats, and the guide's DataProcessor facade.

Imports neither torch nor mlx; datasets, pyarrow, zstandard and datasketch are imported
only inside the functions that need them.
"""
from retention.data.catalog import (CATALOG, DatasetInfo, get_dataset, get_recommended_mix,
                                    list_datasets, mix_reasons)
from retention.data.chat import (encode_chat, encode_preference, to_messages,
                                 to_preference)
from retention.data.filters import (C4Quality, ExactDedup, FilterPipeline, FilterReport,
                                    FineWebQuality, GopherQuality, GopherRepetition, NearDedup,
                                    build_pipeline, make_filter)
from retention.data.packing import IGNORE_INDEX, DocumentStream, PackedBatches, make_batch
from retention.data.prepare import prepare_shards
from retention.data.processor import DataProcessor
from retention.data.shards import RandomWindows, SequentialWindows, ShardDataset
from retention.data.sources import (BuiltinSource, HFSource, HubUnavailableError,
                                    LocalSource, MixedSource, open_mix, open_source)
from retention.data.tokenizer import (Tokenizer, default_tokenizer, load_tokenizer,
                                      train_bpe)

__all__ = [
    "CATALOG", "DatasetInfo", "list_datasets", "get_dataset", "get_recommended_mix",
    "mix_reasons", "open_source", "open_mix", "LocalSource", "HFSource", "BuiltinSource",
    "MixedSource", "HubUnavailableError", "GopherQuality", "GopherRepetition", "C4Quality",
    "FineWebQuality", "ExactDedup", "NearDedup", "FilterPipeline", "FilterReport",
    "build_pipeline", "make_filter", "Tokenizer", "load_tokenizer", "default_tokenizer",
    "train_bpe", "DocumentStream", "PackedBatches", "make_batch", "IGNORE_INDEX",
    "ShardDataset", "RandomWindows", "SequentialWindows", "prepare_shards", "to_messages",
    "encode_chat", "to_preference", "encode_preference", "DataProcessor",
]
