"""Every rule gets a document that trips it and one that passes (GOOD passes them all)."""
import pytest

from retention.data.filters import (C4Quality, ExactDedup, FilterReport, FineWebQuality,
                                    GopherQuality, GopherRepetition, NearDedup, build_pipeline,
                                    make_filter, normalize_text)

LINES = [
    "The river town woke slowly under a pale winter sky, and the bakers were first to light "
    "their ovens.",
    "Children walked to school along the frozen canal, counting the boats that had been "
    "pulled onto the bank.",
    "By noon the market square was full of farmers selling apples, cheese and heavy loaves "
    "of dark bread.",
    "An old teacher explained to her class why the water froze at the edges before it froze "
    "in the middle.",
    "In the evening the lamps along the bridge were lit one by one, and the streets grew "
    "quiet again.",
    "Most people agreed that it had been the coldest week of the year, though nobody could "
    "remember the date.",
]
GOOD = "\n".join(LINES)
MORE = ("Merchants from the coast arrived on Thursday with barrels of salted fish and bolts "
        "of blue cloth. The mayor gave a short speech about the new school roof, which had "
        "finally been repaired after the autumn storms. Somebody's dog chased a goose across "
        "the square while the musicians tuned their fiddles. Later that night snow began to "
        "fall again, covering the footprints, the cart tracks and the bare gardens behind the "
        "church.")
PHRASE = "seven silver lanterns swung above narrow crooked alleys beside quiet harbour walls"


def reason(f, text):
    verdict = f(text)
    return None if verdict.keep else verdict.reason


@pytest.mark.parametrize("f", [GopherQuality(), GopherRepetition(), C4Quality(),
                               FineWebQuality()])
def test_good_document_passes_every_rule(f):
    verdict = f(GOOD)
    assert verdict.keep and verdict.text is None, verdict
    assert f(GOOD + "\n" + MORE).keep


# --- Gopher quality -------------------------------------------------------------------------

NO_STOP_WORDS = " ".join(
    f"Bright sunlight warms green fields while farmers gather ripe apples {w} quickly."
    for w in ("north", "south", "east", "west", "early", "late"))


@pytest.mark.parametrize("text, rule, options", [
    (LINES[0], "too_few_words", {}),
    (GOOD, "too_many_words", {"max_doc_words": 50}),
    (" ".join(["I am at it, so we go up to an ox by my car."] * 8), "short_mean_word_length",
     {}),
    (" ".join(["Internationalization considerations notwithstanding, "
               "telecommunications infrastructure modernization accelerates."] * 10),
     "long_mean_word_length", {}),
    (GOOD + " #news" * 20, "hash_ratio", {}),
    (GOOD + " ..." * 20, "ellipsis_ratio", {}),
    ("\n".join("- " + line for line in LINES), "bullet_lines", {}),
    ("\n".join(line[:-1] + "..." if i % 2 else line for i, line in enumerate(LINES)),
     "ellipsis_lines", {}),
    (GOOD + " 1234" * 60, "few_alpha_words", {}),
    (NO_STOP_WORDS, "few_stop_words", {}),
])
def test_gopher_quality_rules(text, rule, options):
    assert reason(GopherQuality(**options), text) == f"gopher_quality:{rule}"
    assert reason(GopherQuality(**options), GOOD + "\n" + MORE) is None or options


# --- Gopher repetition ----------------------------------------------------------------------

PARAS = [LINES[0] + " " + LINES[1], LINES[2] + " " + LINES[3], LINES[4] + " " + LINES[5]]
LONG_LINE = " ".join(LINES[:3])


@pytest.mark.parametrize("text, rule", [
    ("\n\n".join(PARAS + ["Read more."] * 3), "dup_para_frac"),
    ("\n\n".join([GOOD, "A short note follows.", "Another short note.", "The end is near.",
                  GOOD]), "dup_para_char_frac"),
    (GOOD + "\nShare this.\nShare this.\nShare this.\nShare this.\nShare this.",
     "dup_line_frac"),
    ("\n".join([LONG_LINE] + LINES + [LONG_LINE]), "dup_line_char_frac"),
    (LINES[0] + " big cat" * 40, "top_2_gram"),
])
def test_gopher_repetition_default_rules(text, rule):
    assert reason(GopherRepetition(), text) == f"gopher_repetition:{rule}"


@pytest.mark.parametrize("n, frac", [(2, 0.2), (3, 0.18), (4, 0.16)])
def test_gopher_top_ngram_rules(n, frac):
    f = GopherRepetition(top_n_grams=((n, frac),), dup_n_grams=())
    assert reason(f, LINES[0] + " big red cat sat" * 30) == f"gopher_repetition:top_{n}_gram"
    assert reason(f, GOOD + " " + MORE) is None


@pytest.mark.parametrize("n, frac", [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11),
                                     (10, 0.10)])
def test_gopher_duplicate_ngram_rules(n, frac):
    f = GopherRepetition(top_n_grams=(), dup_n_grams=((n, frac),))
    fillers = ["Meanwhile", "Afterwards", "Nevertheless", "Eventually", "Suddenly"]
    text = " ".join(LINES) + " " + " ".join(f"{w} {PHRASE}." for w in fillers)
    assert reason(f, text) == f"gopher_repetition:dup_{n}_gram"
    assert reason(f, " ".join(LINES) + " " + PHRASE + ".") is None


# --- C4 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, rule", [
    ("x" * 1001 + " is a very long word indeed.", "too_long_word"),
    ("Click here to subscribe to the newsletter", "no_terminal_punct"),
    ("Thanks so.", "too_few_words"),
    ("Please enable JavaScript to view the comments.", "javascript"),
    ("Read our privacy policy before you continue.", "policy"),
    ("This site uses cookies to improve your experience.", "policy"),
])
def test_c4_line_rules_remove_the_line_and_keep_the_document(extra, rule):
    verdict = C4Quality()(GOOD + "\n" + extra)
    assert verdict.keep
    assert verdict.text == GOOD
    assert list(verdict.line_drops) == [f"c4_line:{rule}"]
    assert verdict.line_drops[f"c4_line:{rule}"][0] == 1


def test_c4_citations_are_cut_and_terminal_rule_is_configurable():
    verdict = C4Quality()(GOOD.replace("dark bread.", "dark bread[12].").replace(
        "again.", "again[edit]."))
    assert verdict.keep and verdict.text == GOOD
    loose = C4Quality(filter_no_terminal_punct=False)
    verdict = loose(GOOD + "\nNo punctuation at the end here")
    assert verdict.keep and verdict.text is None        # unchanged


@pytest.mark.parametrize("text, rule", [
    (GOOD + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "lorem_ipsum"),
    (GOOD + "\nThe function body is { return x; } in this example.", "curly_bracket"),
    ("\n".join(LINES[:2]), "too_few_sentences"),
    ("Short\nlines only", "no_lines_left"),
])
def test_c4_document_rules(text, rule):
    assert reason(C4Quality(), text) == f"c4:{rule}"


# --- FineWeb --------------------------------------------------------------------------------

LIST = "\n".join(f"Extraordinarily magnificent {w}." for w in
                 ("elephants", "butterflies", "mountains", "rivers", "libraries", "orchards",
                  "lighthouses", "cathedrals", "waterfalls", "harbours", "vineyards"))


@pytest.mark.parametrize("text, rule", [
    ("\n".join(line.rstrip(".") + " and so on" for line in LINES), "line_punct_ratio"),
    ("\n".join(f"Short line number {w}." for w in
               ("one", "two", "three", "four", "five", "six")), "short_line_ratio"),
    (GOOD + "\n" + LINES[2], "char_dup_ratio"),
    (LIST, "list_ratio"),
])
def test_fineweb_rules(text, rule):
    assert reason(FineWebQuality(), text) == f"fineweb:{rule}"


def test_fineweb_thresholds_are_configurable():
    assert reason(FineWebQuality(new_line_ratio=0.5), LIST) is None
    assert reason(FineWebQuality(char_duplicates_ratio=0.5), GOOD + "\n" + LINES[2]) is None


# --- Dedup ----------------------------------------------------------------------------------

def test_exact_dedup_uses_normalized_text():
    d = ExactDedup()
    assert d(GOOD).keep
    variant = "  " + GOOD.upper().replace(",", " ,").replace("\n", "   \n ") + "!!"
    assert normalize_text(variant) == normalize_text(GOOD)
    assert reason(d, variant) == "exact_dedup:duplicate"
    assert d(MORE).keep


def test_near_dedup_catches_small_edits_only():
    d = NearDedup(threshold=0.8, num_perm=128, ngram=5)
    doc = GOOD + "\n" + MORE
    assert d(doc).keep
    edited = doc.replace("pale winter sky", "grey winter sky").replace("blue cloth", "red cloth")
    assert reason(d, edited) == "near_dedup:near_duplicate"
    assert d("\n".join(LINES[:3]) + "\n" + NO_STOP_WORDS).keep          # half new: distinct
    assert NearDedup(threshold=0.95)(doc).keep                          # fresh index


# --- Pipeline and report --------------------------------------------------------------------

def test_pipeline_report_counts_documents_and_characters():
    p = build_pipeline("default")
    names = [f.name for f in p.filters]
    assert names == ["gopher_repetition", "gopher_quality", "c4", "fineweb", "exact_dedup",
                     "near_dedup"]
    docs = [GOOD, GOOD, LINES[0], GOOD + "\nRead our privacy policy before you continue.",
            MORE + "\n" + GOOD]
    kept = list(p.filter_records({"text": t} for t in docs))
    r = p.report
    assert [k["text"] for k in kept] == [GOOD, MORE + "\n" + GOOD]
    assert r.docs_in == 5 and r.docs_kept == 2
    assert r.chars_in == sum(map(len, docs))
    assert r.chars_kept == len(GOOD) + len(MORE) + 1 + len(GOOD)
    assert r.dropped["exact_dedup:duplicate"] == [2, 2 * len(GOOD)]
    assert r.dropped["gopher_quality:too_few_words"] == [1, len(LINES[0])]
    assert sum(d for d, _ in r.dropped.values()) == 3
    assert r.trimmed["c4_line:policy"][0] == 1
    table = r.format()
    assert "exact_dedup:duplicate" in table and "kept" in table
    assert FilterReport.from_dict(r.to_dict()) == r


def test_pipeline_specs_and_errors():
    assert build_pipeline("none").filters == []
    assert [f.name for f in build_pipeline("c4,exact_dedup").filters] == ["c4", "exact_dedup"]
    custom = build_pipeline(["gopher_quality"], gopher_quality={"min_doc_words": 5})
    assert custom(LINES[0]) == LINES[0]
    assert make_filter("c4", min_num_sentences=1)(LINES[0]).keep
    with pytest.raises(ValueError, match="choose from"):
        make_filter("perplexity")
    with pytest.raises(ValueError, match="no option"):
        make_filter("c4", min_sentences=3)


@pytest.mark.parametrize("f", [GopherQuality(min_doc_words=0), GopherRepetition(),
                               C4Quality(min_num_sentences=0), FineWebQuality()])
@pytest.mark.parametrize("text", ["", " \n ", "--- ... ***", "\n\n\n", "#"])
def test_odd_text_gets_a_verdict_not_a_crash(f, text):
    assert isinstance(f(text).keep, bool)
