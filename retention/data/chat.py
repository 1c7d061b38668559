"""Instruction and preference data: Alpaca, Dolly, chat-message and ShareGPT records become
conversations ([{role, content}, ...]) rendered through the tokenizer's chat template, with a
loss mask that covers only the assistant's reply tokens; hh-rlhf, UltraFeedback and plain
(prompt, chosen, rejected) records become one preference form.
"""
from __future__ import annotations

import re

import numpy as np

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
                   "bard": "assistant", "system": "system"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


class MalformedRecord(ValueError):
    """A record that does not fit its format; sources skip and count these."""


def detect_format(record: dict) -> str:
    """alpaca, dolly, messages, sharegpt, ultrafeedback, hh-rlhf or preference."""
    if not isinstance(record, dict):
        raise MalformedRecord("not an object")
    keys = set(record)
    if {"chosen", "rejected"} <= keys:
        if isinstance(record["chosen"], list):
            return "ultrafeedback"
        return "preference" if "prompt" in keys else "hh-rlhf"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    raise MalformedRecord(f"unknown record format with fields {sorted(keys)}")


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise MalformedRecord(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise MalformedRecord(f"field {key!r} is {type(value).__name__}, not a string")
    return value


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise MalformedRecord("messages must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or \
                not isinstance(m.get("content"), str):
            raise MalformedRecord(f"bad message {m!r}: need role in {ROLES} and string content")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise MalformedRecord("conversation has no assistant reply")
    return out


def to_messages(record: dict, fmt: str | None = None) -> list[dict]:
    """The record as a conversation. Alpaca's input and Dolly's context follow the
    instruction after a blank line."""
    fmt = fmt or detect_format(record)
    if not isinstance(record, dict):
        raise MalformedRecord("not an object")
    if fmt in ("alpaca", "dolly"):
        extra_key, answer_key = ("input", "output") if fmt == "alpaca" else \
            ("context", "response")
        prompt = _text(record, "instruction")
        extra = _text(record, extra_key, required=False).strip()
        answer = _text(record, answer_key)
        if not prompt.strip() or not answer.strip():
            raise MalformedRecord("empty instruction or answer")
        user = f"{prompt}\n\n{extra}" if extra else prompt
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if fmt == "messages":
        return _check_messages(record.get("messages"))
    if fmt == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list):
            raise MalformedRecord("conversations must be a list")
        messages = []
        for t in turns:
            if not isinstance(t, dict):
                raise MalformedRecord("a turn is not an object")
            if "role" in t:        # some ShareGPT dumps already use role/content
                messages.append({"role": t.get("role"), "content": t.get("content")})
                continue
            role = _SHAREGPT_ROLES.get(str(t.get("from", "")).lower())
            if role is None:
                raise MalformedRecord(f"unknown ShareGPT speaker {t.get('from')!r}")
            messages.append({"role": role, "content": t.get("value")})
        return _check_messages(messages)
    raise MalformedRecord(f"format {fmt!r} is not a conversation format")


def encode_chat(tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, target bool) for a conversation: target is True on the tokens of each
    assistant reply, including the template's end-of-turn marker, and False on everything
    the model is given (system, user, role headers).

    Built segment by segment from rendered prefixes, so it works for any template that
    renders a conversation as an extension of its prefixes (ChatML and most HF templates)."""
    messages = _check_messages(messages)
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        full = tokenizer.apply_chat_template(messages[: i + 1])
        if m["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError("this chat template does not render a conversation as an "
                                 "extension of its prefixes; cannot build a loss mask")
            segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        else:
            if not full.startswith(done):
                raise ValueError("this chat template does not render a conversation as an "
                                 "extension of its prefixes; cannot build a loss mask")
            segments.append((full[len(done):], False))
        done = full
    ids: list[int] = []
    target: list[bool] = []
    for text, is_target in segments:
        if text:
            piece = tokenizer.encode(text, special=True)
            ids += piece
            target += [is_target] * len(piece)
    return np.asarray(ids, dtype=np.int32), np.asarray(target, dtype=bool)


# ---------------------------------------------------------------------------------------------
# Preference data


def parse_hh(transcript: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' as messages."""
    if not isinstance(transcript, str):
        raise MalformedRecord("hh-rlhf transcript is not a string")
    parts = _HH_TURN.split("\n\n" + transcript.lstrip("\n"))
    # parts: [before, speaker, text, speaker, text, ...]
    if len(parts) < 3:
        raise MalformedRecord("no Human:/Assistant: turns in transcript")
    messages = []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant",
                         "content": text.strip()})
    return messages


def _last_reply(messages: list[dict]) -> tuple[list[dict], str]:
    if not messages or messages[-1]["role"] != "assistant":
        raise MalformedRecord("a preference side must end with an assistant reply")
    return messages[:-1], messages[-1]["content"]


def to_preference(record: dict, fmt: str | None = None) -> dict:
    """{"prompt": [messages], "chosen": reply, "rejected": reply} from hh-rlhf (two whole
    transcripts), UltraFeedback-binarized (message lists) or a plain record with prompt,
    chosen and rejected strings."""
    fmt = fmt or detect_format(record)
    if fmt == "hh-rlhf":
        prompt, chosen = _last_reply(parse_hh(_text(record, "chosen")))
        rejected_prompt, rejected = _last_reply(parse_hh(_text(record, "rejected")))
    elif fmt == "ultrafeedback":
        chosen_msgs = _check_messages(record.get("chosen"))
        rejected_msgs = _check_messages(record.get("rejected"))
        prompt, chosen = _last_reply(chosen_msgs)
        rejected_prompt, rejected = _last_reply(rejected_msgs)
    elif fmt == "preference":
        p = record.get("prompt")
        prompt = [{"role": "user", "content": _text(record, "prompt")}] if isinstance(p, str) \
            else _check_prompt(p)
        chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
        rejected_prompt = prompt
    else:
        raise MalformedRecord(f"format {fmt!r} is not a preference format")
    if not prompt:
        raise MalformedRecord("preference pair without a prompt")
    if rejected_prompt != prompt:
        raise MalformedRecord("chosen and rejected answer different prompts")
    if not chosen.strip() or not rejected.strip():
        raise MalformedRecord("empty chosen or rejected reply")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _check_prompt(messages) -> list[dict]:
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in messages):
        raise MalformedRecord("prompt must be a string or a list of {role, content}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode_preference(tokenizer, pair: dict) -> dict:
    """Token ids and reply masks of both sides: {"chosen_ids", "chosen_mask",
    "rejected_ids", "rejected_mask"} (int32 / bool), sharing the prompt tokens."""
    out = {}
    for side in ("chosen", "rejected"):
        ids, mask = encode_chat(tokenizer, pair["prompt"] + [{"role": "assistant",
                                                              "content": pair[side]}])
        out[f"{side}_ids"], out[f"{side}_mask"] = ids, mask
    return out


def pad_sequences(seqs: list[np.ndarray], pad_value, dtype=None) -> np.ndarray:
    """Right-pad 1-D arrays into one [N, max_len] array."""
    length = max((len(s) for s in seqs), default=0)
    dtype = dtype or (seqs[0].dtype if seqs else np.int32)
    out = np.full((len(seqs), length), pad_value, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out
