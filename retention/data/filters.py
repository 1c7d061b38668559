"""Quality filters and deduplication: the Gopher quality and repetition rules (Rae et al.
2021, appendix A), the C4 line and document rules (Raffel et al. 2020), the FineWeb rules
(Penedo et al. 2024), exact dedup by normalized-text hash and near dedup with MinHash-LSH.

Each filter is a small configurable object: `filter(text) -> Verdict(keep, reason, text)`,
where `reason` is "<filter>:<rule>" when the document is dropped and `text` is set when a
line-level rule (C4) removed lines. The thresholds default to the published values, as
datatrove implements them. `FilterPipeline` chains filters and keeps a `FilterReport` of
documents and characters kept and dropped per rule.
"""
from __future__ import annotations

import hashlib
import inspect
import re
from collections import Counter
from dataclasses import dataclass, field, fields

# Gopher's stop words and the C4 / FineWeb punctuation sets.
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
END_PUNCTUATION = (".", "?", "!", '"', "'")
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "\u201d", "\u2019", "\u2026", "\u3002",
                        "\uff01", "\uff1f", ")", ";", ":")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                     "use of cookies", "use cookies")

_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_SYMBOL_WORD = re.compile(r"(?<!\S)[^\w\s]+(?!\S)")
_ALPHA_WORD = re.compile(r"\S*[^\W\d_]\S*")
_STOP_WORD = re.compile(r"(?<![\w'])(?:the|be|to|of|and|that|have|with)(?![\w'])",
                        re.IGNORECASE)
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
_NOT_WORD = re.compile(r"[^\w\s]+")


@dataclass
class Verdict:
    keep: bool
    reason: str | None = None            # "<filter>:<rule>" when dropped
    text: str | None = None              # the modified text, when lines were removed
    line_drops: dict | None = None       # rule -> [lines, chars] removed (doc kept)


KEEP = Verdict(True)


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items seen before, characters in them)."""
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_items, dup_chars


def top_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by the most frequent word n-gram (counted with its spaces); 0 when
    no n-gram repeats (datatrove counts a unique n-gram too, which drops short documents
    for repetition they do not have)."""
    if len(words) < n:
        return 0
    counts = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = counts.most_common(1)[0]
    return (sum(map(len, gram)) + n - 1) * count if count > 1 else 0


def duplicate_ngram_chars(words: list[str], n: int, stop_above: float = float("inf")) -> int:
    """Characters in word n-grams that repeat an earlier n-gram, overlaps not double
    counted (Gopher's rule, as datatrove's find_all_duplicate); stops early past
    `stop_above`."""
    seen: set[tuple] = set()
    lengths = [len(w) for w in words]
    repeated, i, last = 0, 0, len(words) - n + 1
    while i < last:
        gram = tuple(words[i:i + n])
        if gram in seen:
            repeated += sum(lengths[i:i + n])
            if repeated > stop_above:
                return repeated
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated


# ---------------------------------------------------------------------------------------------
# Gopher


@dataclass
class GopherQuality:
    """Gopher quality rules: word count, mean word length, symbol ratios, bullet and ellipsis
    lines, words with letters, stop words."""
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    name = "gopher_quality"

    def __call__(self, text: str) -> Verdict:
        words = text.split()
        n_words = len(words)
        if n_words == 0:
            return Verdict(False, f"{self.name}:empty")
        symbol_words = _SYMBOL_WORD.findall(text)
        n_content = n_words - len(symbol_words)
        if n_content < max(1, self.min_doc_words):   # 0 content words: no mean length
            return Verdict(False, f"{self.name}:too_few_words")
        if n_content > self.max_doc_words:
            return Verdict(False, f"{self.name}:too_many_words")
        mean_len = (sum(map(len, words)) - sum(map(len, symbol_words))) / n_content
        if mean_len < self.min_avg_word_length:
            return Verdict(False, f"{self.name}:short_mean_word_length")
        if mean_len > self.max_avg_word_length:
            return Verdict(False, f"{self.name}:long_mean_word_length")
        if text.count("#") / n_words > self.max_symbol_word_ratio:
            return Verdict(False, f"{self.name}:hash_ratio")
        if (text.count("...") + text.count("\u2026")) / n_words > self.max_symbol_word_ratio:
            return Verdict(False, f"{self.name}:ellipsis_ratio")
        lines = text.splitlines() or [text]
        bullets = sum(1 for s in lines if s.lstrip().startswith(("\u2022", "-", "*")))
        if bullets / len(lines) > self.max_bullet_lines_ratio:
            return Verdict(False, f"{self.name}:bullet_lines")
        ellipsis = sum(1 for s in lines if s.rstrip().endswith(("...", "\u2026")))
        if ellipsis / len(lines) > self.max_ellipsis_lines_ratio:
            return Verdict(False, f"{self.name}:ellipsis_lines")
        if len(_ALPHA_WORD.findall(text)) / n_words < self.min_alpha_words_ratio:
            return Verdict(False, f"{self.name}:few_alpha_words")
        if self.min_stop_words:
            found = 0
            for _ in _STOP_WORD.finditer(text):
                found += 1
                if found >= self.min_stop_words:
                    break
            if found < self.min_stop_words:
                return Verdict(False, f"{self.name}:few_stop_words")
        return KEEP


@dataclass
class GopherRepetition:
    """Gopher repetition rules: duplicate lines and paragraphs (by count and characters),
    the most frequent 2-4-grams, and characters in repeated 5-10-grams."""
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: tuple = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    name = "gopher_repetition"

    def __call__(self, text: str) -> Verdict:
        n_chars = len(text)
        if n_chars == 0:
            return Verdict(False, f"{self.name}:empty")
        paragraphs = _PARAGRAPHS.split(text.strip())
        dup, chars = find_duplicates(paragraphs)
        if dup / len(paragraphs) > self.dup_para_frac:
            return Verdict(False, f"{self.name}:dup_para_frac")
        if chars / n_chars > self.dup_para_char_frac:
            return Verdict(False, f"{self.name}:dup_para_char_frac")
        lines = _LINES.split(text)
        dup, chars = find_duplicates(lines)
        if dup / len(lines) > self.dup_line_frac:
            return Verdict(False, f"{self.name}:dup_line_frac")
        if chars / n_chars > self.dup_line_char_frac:
            return Verdict(False, f"{self.name}:dup_line_char_frac")
        words = text.split()
        for n, frac in self.top_n_grams:
            if top_ngram_chars(words, n) / n_chars > frac:
                return Verdict(False, f"{self.name}:top_{n}_gram")
        for n, frac in self.dup_n_grams:
            if duplicate_ngram_chars(words, n, frac * n_chars) / n_chars > frac:
                return Verdict(False, f"{self.name}:dup_{n}_gram")
        return KEEP


# ---------------------------------------------------------------------------------------------
# C4


def count_sentences(line: str) -> int:
    return max(1, len(_SENTENCE_END.findall(line)))


@dataclass
class C4Quality:
    """C4 rules. Line rules remove a line (too long a word, no terminal punctuation, fewer
    than 3 words, 'javascript', policy/cookie notices; citation markers are cut); document
    rules drop it ('lorem ipsum', a curly bracket, fewer than 5 sentences left)."""
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    name = "c4"

    def __call__(self, text: str) -> Verdict:
        kept: list[str] = []
        drops: dict[str, list[int]] = {}
        sentences = 0

        def drop_line(rule: str, line: str) -> None:
            entry = drops.setdefault(f"{self.name}_line:{rule}", [0, 0])
            entry[0] += 1
            entry[1] += len(line) + 1

        for raw in text.splitlines():
            line = raw.strip()
            if not line:
                continue
            words = line.split()
            if self.max_word_length > 0 and any(len(w) > self.max_word_length for w in words):
                drop_line("too_long_word", raw)
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION)
                                                  or line.endswith("...")):
                drop_line("no_terminal_punct", raw)
                continue
            if len(words) < self.min_words_per_line:
                drop_line("too_few_words", raw)
                continue
            lower = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lower:
                return Verdict(False, f"{self.name}:lorem_ipsum")
            if self.filter_javascript and "javascript" in lower:
                drop_line("javascript", raw)
                continue
            if self.filter_curly_bracket and "{" in line:
                return Verdict(False, f"{self.name}:curly_bracket")
            if self.filter_policy and any(p in lower for p in POLICY_SUBSTRINGS):
                drop_line("policy", raw)
                continue
            sentences += count_sentences(line)
            kept.append(line)
        if not kept:
            return Verdict(False, f"{self.name}:no_lines_left")
        if sentences < self.min_num_sentences:
            return Verdict(False, f"{self.name}:too_few_sentences")
        new_text = "\n".join(kept)
        if new_text == text:
            return KEEP
        return Verdict(True, None, new_text, drops or None)


# ---------------------------------------------------------------------------------------------
# FineWeb


@dataclass
class FineWebQuality:
    """FineWeb's own rules: share of lines ending in punctuation, share of short lines,
    characters in duplicated lines, newlines per word (lists)."""
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3
    stop_chars: tuple = TERMINAL_PUNCTUATION
    name = "fineweb"

    def __call__(self, text: str) -> Verdict:
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return Verdict(False, f"{self.name}:empty")
        ratio = sum(1 for line in lines if line.rstrip().endswith(self.stop_chars)) / len(lines)
        if ratio <= self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return Verdict(False, f"{self.name}:line_punct_ratio")
        ratio = sum(1 for line in lines if len(line) <= self.short_line_length) / len(lines)
        if ratio >= self.short_line_thr:
            return Verdict(False, f"{self.name}:short_line_ratio")
        _, dup_chars = find_duplicates(lines)
        if dup_chars / max(1, len(text.replace("\n", ""))) >= self.char_duplicates_ratio:
            return Verdict(False, f"{self.name}:char_dup_ratio")
        n_words = len(text.split())
        if n_words == 0 or text.count("\n") / n_words > self.new_line_ratio:
            return Verdict(False, f"{self.name}:list_ratio")
        return KEEP


# ---------------------------------------------------------------------------------------------
# Dedup


def normalize_text(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: what dedup compares."""
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


@dataclass
class ExactDedup:
    """Drops a document whose normalized text was seen before (16-byte BLAKE2b hashes)."""
    name = "exact_dedup"
    seen: set = field(default_factory=set, repr=False)

    def __call__(self, text: str) -> Verdict:
        key = hashlib.blake2b(normalize_text(text).encode(), digest_size=16).digest()
        if key in self.seen:
            return Verdict(False, f"{self.name}:duplicate")
        self.seen.add(key)
        return KEEP


class NearDedup:
    """Drops a document whose MinHash-LSH neighbors include an earlier document (estimated
    Jaccard similarity of word n-gram sets above `threshold`); first seen is kept."""
    name = "near_dedup"

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
                 seed: int = 1):
        from datasketch import MinHash, MinHashLSH
        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        self._MinHash = MinHash
        # datasketch >= 2 wants the scheme named when permutations are passed in.
        self._scheme = {"scheme": "affine32"} \
            if "scheme" in inspect.signature(MinHash).parameters else {}
        # Permutations built once and shared: MinHash() would rebuild them per document.
        self._perms = MinHash(num_perm=num_perm, seed=seed, **self._scheme).permutations
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._count = 0

    def __repr__(self) -> str:
        return (f"NearDedup(threshold={self.threshold}, num_perm={self.num_perm}, "
                f"ngram={self.ngram})")

    def signature(self, text: str):
        words = normalize_text(text).split()
        n = self.ngram
        if len(words) < n:
            shingles = {" ".join(words)}
        else:
            shingles = {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}
        m = self._MinHash(num_perm=self.num_perm, seed=self.seed, permutations=self._perms,
                          **self._scheme)
        m.update_batch([s.encode("utf-8") for s in shingles])
        return m

    def __call__(self, text: str) -> Verdict:
        m = self.signature(text)
        if self.lsh.query(m):
            return Verdict(False, f"{self.name}:near_duplicate")
        self.lsh.insert(str(self._count), m, check_duplication=False)
        self._count += 1
        return KEEP


# ---------------------------------------------------------------------------------------------
# Registry, pipeline and report

FILTERS = {"gopher_quality": GopherQuality, "gopher_repetition": GopherRepetition,
           "c4": C4Quality, "fineweb": FineWebQuality, "exact_dedup": ExactDedup,
           "near_dedup": NearDedup}
# FineWeb's order and settings: repetition, quality, C4 without the terminal-punctuation line
# rule (it removed too much valid text in their ablations), FineWeb rules, then dedup.
DEFAULT_FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb", "exact_dedup",
                   "near_dedup")
DEFAULT_OPTIONS = {"c4": {"filter_no_terminal_punct": False}}


def make_filter(name: str, **options):
    """A filter by registry name with its options (the dataclass fields)."""
    if name not in FILTERS:
        raise ValueError(f"unknown filter {name!r}; choose from {', '.join(FILTERS)}")
    cls = FILTERS[name]
    if cls is not NearDedup and hasattr(cls, "__dataclass_fields__"):
        known = {f.name for f in fields(cls)}
        bad = set(options) - known
        if bad:
            raise ValueError(f"{name} has no option {sorted(bad)}; options: {sorted(known)}")
    return cls(**options)


@dataclass
class FilterReport:
    """Documents and characters in, kept, dropped per rule and trimmed by line rules."""
    docs_in: int = 0
    chars_in: int = 0
    docs_kept: int = 0
    chars_kept: int = 0
    dropped: dict = field(default_factory=dict)     # rule -> [docs, chars]
    trimmed: dict = field(default_factory=dict)     # line rule -> [lines, chars]

    def to_dict(self) -> dict:
        return {"docs_in": self.docs_in, "chars_in": self.chars_in,
                "docs_kept": self.docs_kept, "chars_kept": self.chars_kept,
                "dropped": {k: {"docs": v[0], "chars": v[1]} for k, v in self.dropped.items()},
                "trimmed": {k: {"lines": v[0], "chars": v[1]} for k, v in self.trimmed.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "FilterReport":
        return cls(d["docs_in"], d["chars_in"], d["docs_kept"], d["chars_kept"],
                   {k: [v["docs"], v["chars"]] for k, v in d["dropped"].items()},
                   {k: [v["lines"], v["chars"]] for k, v in d["trimmed"].items()})

    def format(self) -> str:
        def pct(a, b):
            return f"{100 * a / b:6.2f}%" if b else "   n/a"
        rows = [f"{'rule':<44} {'docs':>9} {'docs %':>8} {'chars':>12} {'chars %':>8}",
                f"{'input':<44} {self.docs_in:>9} {'':>8} {self.chars_in:>12}",
                f"{'kept':<44} {self.docs_kept:>9} {pct(self.docs_kept, self.docs_in):>8} "
                f"{self.chars_kept:>12} {pct(self.chars_kept, self.chars_in):>8}"]
        for rule, (docs, chars) in sorted(self.dropped.items(), key=lambda kv: -kv[1][1]):
            rows.append(f"{'dropped ' + rule:<44} {docs:>9} {pct(docs, self.docs_in):>8} "
                        f"{chars:>12} {pct(chars, self.chars_in):>8}")
        for rule, (lines, chars) in sorted(self.trimmed.items(), key=lambda kv: -kv[1][1]):
            rows.append(f"{'lines cut ' + rule:<44} {str(lines) + ' ln':>9} {'':>8} "
                        f"{chars:>12} {pct(chars, self.chars_in):>8}")
        return "\n".join(rows)


class FilterPipeline:
    """Filters applied in order; the first that drops a document names the reason."""

    def __init__(self, filters):
        self.filters = list(filters)
        self.report = FilterReport()

    def __call__(self, text: str) -> str | None:
        """The text to keep (possibly trimmed by line rules), or None when dropped."""
        report = self.report
        report.docs_in += 1
        report.chars_in += len(text)
        for f in self.filters:
            verdict = f(text)
            if not verdict.keep:
                entry = report.dropped.setdefault(verdict.reason, [0, 0])
                entry[0] += 1
                entry[1] += len(text)      # lines cut before are counted in `trimmed`
                return None
            if verdict.text is not None:
                for rule, (lines, chars) in (verdict.line_drops or {}).items():
                    entry = report.trimmed.setdefault(rule, [0, 0])
                    entry[0] += lines
                    entry[1] += chars
                text = verdict.text
        report.docs_kept += 1
        report.chars_kept += len(text)
        return text

    def filter_records(self, records):
        """Records with their "text" filtered; dropped ones are left out."""
        for record in records:
            text = self(record["text"])
            if text is not None:
                if text is not record["text"]:
                    record = {**record, "text": text}
                yield record

    def __repr__(self) -> str:
        return f"FilterPipeline({[getattr(f, 'name', f) for f in self.filters]})"


def build_pipeline(spec="default", **options) -> FilterPipeline:
    """A pipeline from "default", "none", a comma-separated string or a list of names.
    `options` maps a filter name to its keyword options, e.g. c4={"min_num_sentences": 3}."""
    if isinstance(spec, FilterPipeline):
        return spec
    if spec is None or spec == "none":
        names: list[str] = []
    elif spec == "default":
        names = list(DEFAULT_FILTERS)
    elif isinstance(spec, str):
        names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = list(spec)
    filters = []
    for name in names:
        if not isinstance(name, str):
            filters.append(name)          # an already built filter
            continue
        opts = dict(DEFAULT_OPTIONS.get(name, {})) if spec == "default" else {}
        opts.update(options.get(name, {}))
        filters.append(make_filter(name, **opts))
    return FilterPipeline(filters)
