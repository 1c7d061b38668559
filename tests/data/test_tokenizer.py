import json
import time

import pytest

from .helpers import write_jsonl
from retention.data.cli import build_parser
from retention.data.sources import HubUnavailableError
from retention.data.tokenizer import (CHATML_TEMPLATE, PLAIN_TEMPLATE, default_tokenizer,
                                      default_tokenizer_dir, load_tokenizer, render_jinja,
                                      train_bpe)

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a river."},
            {"role": "assistant", "content": "The Nile."},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "The Amazon."}]


def test_default_tokenizer_is_trained_once_and_cached(tok, offline_env):
    assert tok.vocab_size == 8192
    assert tok.eos_id == tok.bos_id == tok.pad_id == 0
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    folder = default_tokenizer_dir()
    assert folder.is_relative_to(offline_env / "retention-cache")
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    start = time.perf_counter()
    again = default_tokenizer()
    assert time.perf_counter() - start < 0.5
    assert (folder / "tokenizer.json").stat().st_mtime_ns == mtime
    assert again.encode("In the beginning") == tok.encode("In the beginning")
    assert load_tokenizer("default") is again and load_tokenizer(None) is again


def test_encode_decode_round_trip_and_special_tokens(tok):
    text = ("In the beginning God created the heaven and the earth. Ünïcödé → 中文 🙂\n"
            "\tdef f(): pass")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert max(ids) < tok.vocab_size
    # Special tokens written in a document are text, unless asked for (chat templates).
    assert tok.eos_id not in tok.encode("end <|endoftext|> start")
    assert tok.encode("<|endoftext|>", special=True) == [tok.eos_id]
    assert tok.encode("Hi", add_bos=True, add_eos=True)[::len(tok.encode("Hi")) + 1] == \
        [tok.bos_id, tok.eos_id]
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]
    # Common words are single tokens: the BPE has learned English.
    assert len(tok.encode(" the")) == 1 and len(tok.encode(" beginning")) == 1


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "tokenizer.json", "tokenizer_config.json"]
    back = load_tokenizer(tmp_path / "ckpt")
    text = "And God said, Let there be light: and there was light."
    assert back.encode(text) == tok.encode(text)
    assert back.eos_id == tok.eos_id and back.chat_template == CHATML_TEMPLATE
    config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["chat_template"] == CHATML_TEMPLATE
    # A bare tokenizer.json (no config beside it) still finds EOS and the ChatML template.
    (tmp_path / "ckpt" / "tokenizer_config.json").unlink()
    bare = load_tokenizer(tmp_path / "ckpt" / "tokenizer.json")
    assert bare.eos_token == "<|endoftext|>" and bare.chat_template == CHATML_TEMPLATE


def test_transformers_reads_the_saved_folder(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    text = "Blessed are the meek: for they shall inherit the earth."
    assert hf.encode(text) == tok.encode(text)
    assert hf.eos_token == "<|endoftext|>"
    assert hf.apply_chat_template(MESSAGES, tokenize=False) == \
        tok.apply_chat_template(MESSAGES)


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, PLAIN_TEMPLATE])
def test_python_renderers_match_jinja(small_tok, template):
    pytest.importorskip("jinja2")
    small_tok.chat_template = template
    for gen in (False, True):
        assert small_tok.apply_chat_template(MESSAGES, gen) == render_jinja(
            template, MESSAGES, gen, eos_token=small_tok.eos_token,
            bos_token=small_tok.bos_token)
    small_tok.chat_template = CHATML_TEMPLATE


def test_gpt2_from_local_vocab_and_merges(tmp_path, monkeypatch):
    # A miniature GPT-2-format vocabulary: bytes as GPT-2 maps them, one merge.
    vocab = {c: i for i, c in enumerate("abcdehlorwĠ")}
    vocab.update({"he": 11, "<|endoftext|>": 12})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\n")
    monkeypatch.setenv("RETENTION_GPT2_DIR", str(tmp_path))
    gpt2 = load_tokenizer("gpt2")
    assert gpt2.eos_id == 12 and gpt2.vocab_size == 13
    ids = gpt2.encode("hello world")
    assert ids[0] == 11 and gpt2.decode(ids) == "hello world"
    assert gpt2.chat_template == PLAIN_TEMPLATE
    assert load_tokenizer(tmp_path).encode("he") == [11]


def test_gpt2_and_hub_ids_fail_fast_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("RETENTION_GPT2_DIR", str(tmp_path))         # empty folder
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE"):
        load_tokenizer("gpt2")
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE"):
        load_tokenizer("meta-llama/Llama-3.2-1B")
    assert time.perf_counter() - start < 1.0
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer("./no/such/tokenizer.json")


def test_train_bpe_sizes():
    small = train_bpe(["aaa bbb ccc aaa"] * 10, vocab_size=300)
    assert small.vocab_size <= 300 and small.decode(small.encode("abc cab")) == "abc cab"
    with pytest.raises(ValueError, match="at least"):
        train_bpe(["x"], vocab_size=100)


def test_tokenizer_train_command(tmp_path, capsys):
    rows = [{"text": f"Document number {i} talks about rivers, hills and valleys."}
            for i in range(200)]
    src = write_jsonl(tmp_path / "docs.jsonl", rows)
    out = tmp_path / "tok"
    args = build_parser().parse_args(["tokenizer", "train", "--source", str(src),
                                      "--vocab-size", "400", "--out", str(out)])
    assert args.func(args) == 0
    assert "400" in capsys.readouterr().out
    trained = load_tokenizer(out)
    assert trained.vocab_size <= 400 and trained.eos_token == "<|endoftext|>"
    assert trained.decode(trained.encode("rivers and hills")) == "rivers and hills"


def test_other_hugging_face_folders_load_through_transformers(tmp_path):
    pytest.importorskip("transformers")
    # A WordPiece folder with no tokenizer.json: transformers builds the fast tokenizer.
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nworld\n##s\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "eos_token": "[SEP]", "do_lower_case": True}))
    bert = load_tokenizer(tmp_path)
    assert bert.encode("Hello worlds") == [5, 6, 7] and bert.eos_id == 3
    bert.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").encode("hello worlds") == [5, 6, 7]


def test_jinja_templates_may_use_loop_controls_as_in_transformers():
    pytest.importorskip("jinja2")
    from retention.data.tokenizer import render_jinja
    # e.g. templates that find the last user turn with {% break %}
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% break %}{% endif %}"
                "{{ m['content'] }}|{% endfor %}")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
    assert render_jinja(template, msgs) == "a|"
