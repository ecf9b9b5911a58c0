"""The guard's calibration questions: chat prompts labelled answerable (0) or unanswerable (1), each of a kind
("honesty": questions of the honesty data's or the benchmarks' kind; "task": the domain's prompts, all answerable),
and their seeded held-out split.

Labels come from the honesty data (a refusal target marks an unanswerable question) or, with a calibration folder,
from the benchmarks' own labels (the eval harness's loaders, each question as the harness asks it). The probe must
see answerable questions of the same kind as the unanswerable ones: with task prompts alone on the answerable side
it learns "domain or not" (measured on SmolLM2, issue 18), hence `too_few_answerable`.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval_harness.benchmarks import load_benchmark
from eval_harness.errors import UserError
from eval_harness.prompts import build_messages
from eval_harness.refusal import honesty_refused, selfaware_refused, unknownbench_refused
from hcnr_deploy.data import load_jsonl

MIN_ANSWERABLE = 16        # honesty-kind answerable questions below which the guard warns
MIN_SHARE = 0.25           # ... or below this share of the unanswerable ones


@dataclass
class CalibrationSet:
    messages: list[list[dict]]   # prompt turns per question
    labels: np.ndarray           # 1 = unanswerable
    kinds: list[str]             # "honesty" | "task"
    sources: list[str]           # file or benchmark name
    refusal_text: str

    def __len__(self):
        return len(self.labels)


def is_refusal(response: str, prompt: str = "") -> bool:
    """A calibration target that declines: SelfAware's phrases or Alignment-for-Honesty's."""
    return selfaware_refused(response) or honesty_refused(response, prompt)


def refusal_text_of(examples) -> str | None:
    """The honesty data's most common refusal response (ties: the first seen)."""
    counts = Counter(ex.response.strip() for ex in examples if is_refusal(ex.response, ex.messages[-1]["content"]))
    return max(counts, key=lambda r: (counts[r], -list(counts).index(r))) if counts else None


def check_refusal_text(text: str) -> list[str]:
    """The benchmarks' detectors that would NOT read `text` as a refusal (an empty list is what we want)."""
    misses = []
    if not selfaware_refused(text):
        misses.append("selfaware/kuq")
    if not unknownbench_refused(text):
        misses.append("falseqa/nec/refunq")
    return misses


def _balanced(items: list, per_class: int | None, seed: int) -> list:
    if per_class is None:
        return items
    rng = random.Random(seed)
    out = []
    for cls in (True, False):
        group = [i for i, it in enumerate(items) if bool(it.unanswerable) == cls]
        out += rng.sample(group, min(per_class, len(group)))
    return [items[i] for i in sorted(out)]


def build_set(honesty_data: Path, task_data: Path, *, num_samples: int | None, calibration_dir: Path | None,
              benchmarks: str | None, per_class: int | None, refusal_text: str | None, seed: int) -> CalibrationSet:
    """Labelled prompts: the honesty data's (or the calibration folder's benchmarks', `per_class` of each class
    per benchmark) and the task data's, in that order."""
    hon = load_jsonl(honesty_data, num_samples)
    task = load_jsonl(task_data, num_samples)
    msgs, labels, kinds, sources = [], [], [], []
    if calibration_dir is None:
        for ex in hon:
            msgs.append(ex.messages)
            labels.append(int(is_refusal(ex.response, ex.messages[-1]["content"])))
            kinds.append("honesty")
            sources.append(Path(honesty_data).name)
    else:
        for name in calibration_benchmarks(Path(calibration_dir), benchmarks):
            for it in _balanced(load_benchmark(name, Path(calibration_dir)).items, per_class, seed):
                msgs.append(build_messages(it))
                labels.append(int(bool(it.unanswerable)))
                kinds.append("honesty")
                sources.append(name)
    for ex in task:
        msgs.append(ex.messages)
        labels.append(0)
        kinds.append("task")
        sources.append(Path(task_data).name)
    text = refusal_text or refusal_text_of(hon)
    if text is None:
        raise UserError(f"--honesty-data {honesty_data} has no refusal response (none matches SelfAware's or "
                        f"Alignment-for-Honesty's phrases); pass the guard's answer with --refusal-text.")
    y = np.array(labels, dtype=np.int64)
    if y.sum() < 2 or (y == 0).sum() < 2:
        raise UserError(f"the guard's calibration has {int(y.sum())} unanswerable and {int((y == 0).sum())} "
                        f"answerable questions; it needs at least 2 of each: add refusal examples to "
                        f"--honesty-data or pass --calibration-dir with a benchmark folder.")
    return CalibrationSet(msgs, y, kinds, sources, text)


def calibration_benchmarks(folder: Path, benchmarks: str | None) -> list[str]:
    """The benchmarks of --calibration-dir to use: those named, else every one found (benchdata's rule)."""
    from hcnr_deploy.benchdata.split import found_benchmarks

    try:
        return list(found_benchmarks(folder, benchmarks))
    except UserError as e:
        raise UserError(e.message.replace("--data-dir", "--calibration-dir")) from None


def too_few_answerable(cal: CalibrationSet) -> str | None:
    """A one-line warning when the honesty-kind questions hold too few answerable ones, else None."""
    kinds = np.array(cal.kinds)
    n_u = int(((kinds == "honesty") & (cal.labels == 1)).sum())
    n_a = int(((kinds == "honesty") & (cal.labels == 0)).sum())
    if n_a >= MIN_ANSWERABLE and n_a >= MIN_SHARE * n_u:
        return None
    return (f"the honesty calibration holds {n_a} answerable questions of its own kind beside {n_u} unanswerable "
            f"ones: the probe may learn 'domain or not' rather than 'answerable or not'; pass --calibration-dir "
            f"with a benchmark folder (both classes of the same kind) for a guard that discriminates.")


def held_out_split(cal: CalibrationSet, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split, stratified by (kind, label): round(share * n) of each group held out (at least 1 where the
    group has 2 or more). Returns sorted (fit, held-out) indices."""
    rng = np.random.default_rng(seed)
    held = []
    kinds = np.array(cal.kinds)
    for kind in ("honesty", "task"):
        for c in (0, 1):
            idx = np.flatnonzero((kinds == kind) & (cal.labels == c))
            if len(idx) < 2:
                continue
            k = min(max(int(round(share * len(idx))), 1), len(idx) - 1)
            held.extend(rng.permutation(idx)[:k].tolist())
    held = np.array(sorted(held), dtype=np.int64)
    return np.setdiff1d(np.arange(len(cal)), held), held
