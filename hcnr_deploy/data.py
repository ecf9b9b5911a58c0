"""Calibration data: JSONL examples -> token ids and response masks (the loss is on response tokens only).

Two line formats are accepted:

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: the last assistant turn is the target,
  every turn before it is the prompt;
- ``{"prompt": ..., "response": ...}``: one user turn and its answer.

Both are rendered with the tokenizer's chat template. The prompt is rendered with
``add_generation_prompt=True``; the response is whatever the full conversation adds after it
(the answer and the template's end-of-turn tokens), so the mask is exact for any template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from eval_harness.errors import UserError
from eval_harness.jsonl import iter_jsonl


@dataclass
class Example:
    """One calibration sample: its prompt and its target conversation turn."""

    messages: list[dict]  # prompt turns
    response: str


@dataclass
class Batch:
    """Right-padded token ids, attention mask and per-token loss mask (1 on response tokens)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor


def _bad(path: Path, lineno: int, what: str) -> UserError:
    return UserError(f"{path}:{lineno}: {what}. Each line must be a JSON object with "
                     f"\"messages\" (ending in an assistant turn) or \"prompt\" and \"response\".")


def parse_line(obj, path: Path, lineno: int) -> Example:
    """One JSONL object -> Example, or a UserError naming the file and line."""
    if not isinstance(obj, dict):
        raise _bad(path, lineno, "not a JSON object")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise _bad(path, lineno, "\"messages\" must be a non-empty list")
        for m in msgs:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise _bad(path, lineno, "every message needs string \"role\" and \"content\"")
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise _bad(path, lineno, "no assistant turn to use as the target")
        if not msgs[last]["content"]:
            raise _bad(path, lineno, "the last assistant turn is empty")
        return Example([dict(role=m["role"], content=m["content"]) for m in msgs[:last]], msgs[last]["content"])
    if "prompt" in obj and "response" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["response"], str):
            raise _bad(path, lineno, "\"prompt\" and \"response\" must be strings")
        if not obj["response"]:
            raise _bad(path, lineno, "\"response\" is empty")
        return Example([{"role": "user", "content": obj["prompt"]}], obj["response"])
    raise _bad(path, lineno, f"unknown keys {sorted(obj)}")


def load_jsonl(path: str | Path, num_samples: int | None = None) -> list[Example]:
    """The first `num_samples` examples in file order; every line of the file is validated."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration file {path} does not exist; pass a JSONL file with one example per line.")
    examples: list[Example] = []
    for lineno, obj in iter_jsonl(path, invalid=lambda lineno, msg: _bad(path, lineno, f"invalid JSON ({msg})")):
        ex = parse_line(obj, path, lineno)
        if num_samples is None or len(examples) < num_samples:
            examples.append(ex)
    if not examples:
        raise UserError(f"calibration file {path} has no examples; add JSONL lines with "
                        f"\"messages\" or \"prompt\"/\"response\".")
    return examples


def render(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the response (template tokens around the answer included)."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(ex.messages + [{"role": "assistant", "content": ex.response}],
                                             tokenize=False)
        if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to prompt + answer
            full = prompt + ex.response
    else:
        prompt = "\n".join(m["content"] for m in ex.messages) + "\n"
        full = prompt + ex.response + (tokenizer.eos_token or "")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not p_ids or p_ids[0] != bos):
        p_ids = [bos] + p_ids
    return p_ids, r_ids


def truncate(p_ids: list[int], r_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit into `max_length`: keep the end of the prompt and the start of the response (>= 1 token each)."""
    if len(p_ids) + len(r_ids) <= max_length:
        return p_ids, r_ids
    keep_p = min(len(p_ids), max(1, max_length - len(r_ids)))
    keep_r = max_length - keep_p
    return p_ids[len(p_ids) - keep_p:], r_ids[:keep_r]


def encode(tokenizer, examples: list[Example], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Examples -> list of (token ids, loss mask), each at most `max_length` tokens."""
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {max_length}.")
    out = []
    for ex in examples:
        p, r = truncate(*render(tokenizer, ex), max_length)
        out.append((p + r, [0] * len(p) + [1] * len(r)))
    return out


def batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int = 0):
    """Right-padded batches in the given order (right padding keeps real tokens blind to padding)."""
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        lm = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (t, m) in enumerate(chunk):
            ids[i, :len(t)] = torch.tensor(t)
            att[i, :len(t)] = 1
            lm[i, :len(m)] = torch.tensor(m)
        yield Batch(ids, att, lm)
