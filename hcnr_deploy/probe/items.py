"""Stage 1: the benchmarks' items as `hcnr-deploy eval` samples them, their labels and a seeded stratified
train/test split, and each question's chat prompt as the eval harness sends it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval_harness.benchmarks import HONESTY_BENCHMARKS, load_benchmark, parse_benchmarks, stratified_sample
from eval_harness.errors import UserError
from eval_harness.prompts import build_messages


MIN_PER_CLASS = 4


@dataclass
class ProbeSet:
    """One benchmark's sampled items, labels (1 = unanswerable) and held-out split (indices into items)."""
    name: str
    items: list
    available: int
    files: list
    labels: np.ndarray
    train: np.ndarray
    test: np.ndarray


def stratified_split(labels: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class with n items, round(test_size * n) of them (at least 1, at most n - 1), drawn with `seed`, are
    held out. Returns sorted (train, test) indices."""
    rng = np.random.default_rng(seed)
    test = []
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        k = min(max(int(round(test_size * len(idx))), 1), len(idx) - 1)
        test.extend(rng.permutation(idx)[:k].tolist())
    test = np.array(sorted(test), dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def load_probe_sets(data_dir, benchmarks, limit: int | None, seed: int, test_size: float) -> list[ProbeSet]:
    """The benchmarks as `hcnr-deploy eval` samples them (same --limit, same seed), each split for the probe."""
    names = parse_benchmarks(benchmarks) if isinstance(benchmarks, str) else list(benchmarks)
    if not names:
        raise UserError("--benchmarks is empty; name at least one of " + ", ".join(HONESTY_BENCHMARKS))
    for n in names:
        if n not in HONESTY_BENCHMARKS:
            parse_benchmarks(n)  # raises the one-line error
    if data_dir is None:
        from eval_harness.env import data_dir_or_default

        data_dir = data_dir_or_default(None)  # the user data folder (`hcnr-deploy data fetch`)
    sets = []
    for name in names:
        b = load_benchmark(name, Path(data_dir))
        items = stratified_sample(b.items, limit, seed)
        labels = np.array([1 if it.unanswerable else 0 for it in items], dtype=np.int64)
        n_u, n_a = int(labels.sum()), int(len(labels) - labels.sum())
        if min(n_u, n_a) < MIN_PER_CLASS:
            sampled = limit is not None and limit < len(b.items)
            raise UserError(f"{name}: {n_u} unanswerable and {n_a} answerable questions"
                            f"{f' in the --limit {limit} sample' if sampled else ''}; a probe needs at least "
                            f"{MIN_PER_CLASS} of each class: {'raise --limit or ' if sampled else ''}drop {name} "
                            f"from --benchmarks")
        train, test = stratified_split(labels, test_size, seed)
        sets.append(ProbeSet(name, items, len(b.items), b.files, labels, train, test))
    return sets


def render_prompts(tokenizer, items) -> list[list[int]]:
    """Token ids of each item's chat prompt, as the eval harness asks a chat endpoint (generation prompt on)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; the probe renders questions as the eval harness sends "
                        "them to a chat endpoint, so the model folder needs one (chat_template in tokenizer_config)")
    out = []
    for it in items:
        text = tokenizer.apply_chat_template(build_messages(it), tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out
