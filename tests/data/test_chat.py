import numpy as np
import pytest

from .helpers import write_jsonl
from retention.data import DataProcessor
from retention.data.chat import (MalformedRecord, detect_format, encode_chat,
                                 encode_preference, pad_sequences, parse_hh, to_messages,
                                 to_preference)

ALPACA = {"instruction": "Give a synonym.", "input": "happy", "output": "Glad."}
DOLLY = {"instruction": "Summarize.", "context": "Rivers flow to the sea.",
         "response": "Rivers reach the sea.", "category": "summarization"}
CHAT = {"messages": [{"role": "user", "content": "Hi!"},
                     {"role": "assistant", "content": "Hello."},
                     {"role": "user", "content": "Bye."},
                     {"role": "assistant", "content": "Goodbye."}]}
SHAREGPT = {"conversations": [{"from": "system", "value": "Be kind."},
                              {"from": "human", "value": "Hi!"},
                              {"from": "gpt", "value": "Hello."}]}
HH = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.",
      "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\n"
                  "Assistant: Seven, probably."}
UF = {"prompt": "Capital of France?",
      "chosen": [{"role": "user", "content": "Capital of France?"},
                 {"role": "assistant", "content": "Paris."}],
      "rejected": [{"role": "user", "content": "Capital of France?"},
                   {"role": "assistant", "content": "Lyon."}],
      "score_chosen": 9.0, "score_rejected": 2.0}


def test_formats_become_conversations():
    assert detect_format(ALPACA) == "alpaca" and detect_format(DOLLY) == "dolly"
    assert to_messages(ALPACA) == [{"role": "user", "content": "Give a synonym.\n\nhappy"},
                                   {"role": "assistant", "content": "Glad."}]
    assert to_messages({**ALPACA, "input": ""})[0]["content"] == "Give a synonym."
    assert to_messages(DOLLY)[0]["content"] == "Summarize.\n\nRivers flow to the sea."
    assert to_messages(CHAT) == CHAT["messages"]
    assert [m["role"] for m in to_messages(SHAREGPT)] == ["system", "user", "assistant"]


@pytest.mark.parametrize("record", [
    {"instruction": "x"}, {"instruction": 3, "output": "y"}, {"messages": []},
    {"messages": [{"role": "user", "content": "only a question"}]},
    {"messages": [{"role": "wizard", "content": "hm"}]},
    {"conversations": [{"from": "alien", "value": "?"}]}, {"nothing": "here"},
    {"instruction": "  ", "output": "y"},
])
def test_malformed_conversations_raise(record):
    with pytest.raises(MalformedRecord):
        to_messages(record)


def test_loss_mask_covers_only_the_replies(tok):
    messages = to_messages(CHAT)
    ids, target = encode_chat(tok, messages)
    assert ids.dtype == np.int32 and target.dtype == bool and len(ids) == len(target)
    assert tok.decode(ids) == tok.apply_chat_template(messages)
    # The target tokens are exactly the two replies with their end-of-turn markers.
    runs, current = [], []
    for i, t in zip(ids, target):
        if t:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    assert runs == ["Hello.<|im_end|>\n", "Goodbye.<|im_end|>\n"]
    assert "Hi!" in tok.decode(ids[~target]) and "Hello." not in tok.decode(ids[~target])


def test_loss_mask_with_a_foreign_jinja_template(small_tok):
    pytest.importorskip("jinja2")
    template = ("{{ bos_token }}{% for m in messages %}"
                "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    saved = small_tok.chat_template
    small_tok.chat_template = template
    try:
        ids, target = encode_chat(small_tok, to_messages(CHAT))
        assert small_tok.decode(ids[target]) == "Hello.<|endoftext|>Goodbye.<|endoftext|>"
    finally:
        small_tok.chat_template = saved


def test_preference_normalization():
    assert parse_hh(HH["chosen"])[-1] == {"role": "assistant", "content": "6."}
    hh = to_preference(HH)
    assert hh["chosen"] == "6." and hh["rejected"] == "Seven, probably."
    assert [m["role"] for m in hh["prompt"]] == ["user", "assistant", "user"]
    uf = to_preference(UF)
    assert uf == {"prompt": [{"role": "user", "content": "Capital of France?"}],
                  "chosen": "Paris.", "rejected": "Lyon."}
    plain = to_preference({"prompt": "Q?", "chosen": "A.", "rejected": "B."})
    assert plain["prompt"] == [{"role": "user", "content": "Q?"}]
    for bad in ({"chosen": "no turns", "rejected": "x"},
                {"chosen": UF["chosen"], "rejected": [{"role": "user", "content": "other"},
                                                      {"role": "assistant", "content": "x"}]},
                {"prompt": "Q", "chosen": "", "rejected": "B"}):
        with pytest.raises(MalformedRecord):
            to_preference(bad)


def test_encode_preference_shares_the_prompt(tok):
    enc = encode_preference(tok, to_preference(UF))
    c, r = enc["chosen_ids"], enc["rejected_ids"]
    prompt_len = int(np.argmax(enc["chosen_mask"]))
    assert prompt_len > 0 and np.array_equal(c[:prompt_len], r[:prompt_len])
    assert tok.decode(c[enc["chosen_mask"]]) == "Paris.<|im_end|>\n"
    assert tok.decode(r[enc["rejected_mask"]]) == "Lyon.<|im_end|>\n"
    padded = pad_sequences([c, r], tok.pad_id)
    assert padded.shape == (2, max(len(c), len(r)))


def test_processor_instruction_batches_mask_prompts(tok, tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl",
                       [ALPACA, {"broken": True}, DOLLY | {"instruction": "Twice."}, ALPACA])
    dp = DataProcessor(seq_len=32, batch_size=2)
    batches = list(dp.prepare_training_data(str(path), format="auto", drop_last=False))
    assert dp.malformed == 1
    ids = np.concatenate([b["input_ids"].ravel() for b in batches])
    mask = np.concatenate([b["loss_mask"].ravel() for b in batches])
    labels = np.concatenate([b["labels"].ravel() for b in batches])
    assert (labels[~mask] == -100).all() and (labels[mask] >= 0).all()
    replies = tok.decode(labels[mask])
    assert replies == "Glad.<|im_end|>\nRivers reach the sea.<|im_end|>\nGlad.<|im_end|>\n"
    assert "Give a synonym" in tok.decode(ids)


def test_processor_preference_pairs(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [HH, UF, {"chosen": 1, "rejected": 2}])
    dp = DataProcessor()
    pairs = list(dp.prepare_preference_data(str(path)))
    assert [p["chosen"] for p in pairs] == ["6.", "Paris."]
    assert dp.malformed == 1
    assert all(p["chosen_mask"].any() and p["rejected_mask"].any() for p in pairs)
    with pytest.raises(ValueError, match="preference"):
        DataProcessor().prepare_training_data("hh-rlhf")
