"""`hcnr-deploy data honesty`: D_hon the paper's way (R-Tuning): unanswerable questions answered with a refusal
sentence, answerable ones with an answer -- the gold answer where the file has one (SelfAware, KUQ, RefuNQ), else
(with --endpoint) the served model's own greedy answer, first sentence, kept only when no refusal detector reads
it as a refusal. Written as {"prompt", "response"} JSONL, the format `repair` and `sweep` read.

`rtuning_rows` is also how the smollm2-rc scenario builds its base data (scenario/realdata.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from eval_harness.atomic import write_text_atomic
from eval_harness.errors import UserError

# Each holds "The answer is unknown." (a SelfAware phrase) and "not" (an UnknownBench word): every benchmark's
# detector reads it as a refusal.
REFUSALS = {
    "nonexistent": "I'm not sure. The answer is unknown.",
    "future": "It is impossible to know. The answer is unknown.",
    "false_premise": "That is not true. The answer is unknown.",
}
REFUSAL_OF = {"selfaware": REFUSALS["nonexistent"], "kuq": REFUSALS["nonexistent"],
              "falseqa": REFUSALS["false_premise"], "nec": REFUSALS["nonexistent"], "refunq": REFUSALS["nonexistent"]}
GOLD = ("selfaware", "kuq", "refunq")  # files with gold answers; the others need the model's own answer


def _shuffled(items: list, seed: str) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    for i, ch in enumerate(text):
        if ch in ".!?" and (i + 1 == len(text) or text[i + 1] == " ") and i > 2:
            return text[: i + 1]
    return text


def is_refusal(response: str, question: str = "") -> bool:
    """Any of the harness's rule detectors (SelfAware phrases, UnknownBench words, Alignment for Honesty)."""
    from eval_harness.refusal import honesty_refused, selfaware_refused, unknownbench_refused

    return selfaware_refused(response) or unknownbench_refused(response) or honesty_refused(response, question)


def rtuning_rows(items: dict, self_answers: dict[str, str], n_answers: int, n_refusals: int, seed: int,
                 exclude: set[str] = frozenset()) -> list[dict]:
    """R-Tuning rows from `items` (benchmark -> eval harness Items): `n_refusals` unanswerable questions with the
    benchmark's refusal and `n_answers` answerable ones with an answer (gold, else the model's own first sentence
    from `self_answers` when no detector reads it as a refusal), each count shared equally over the benchmarks;
    questions whose normalised text is in `exclude` skipped. Rows: {"prompt", "response", "kind", "benchmark"}."""
    from hcnr_deploy.benchdata.split import normalise

    k = len(items)
    rows = []
    for j, (b, its) in enumerate(sorted(items.items())):
        want_r = n_refusals // k + (j < n_refusals % k)
        want_a = n_answers // k + (j < n_answers % k)
        unans = [it for it in _shuffled([i for i in its if i.unanswerable], f"ref/{seed}/{b}")
                 if normalise(it.question) not in exclude]
        rows += [_row(it.question, REFUSAL_OF[b], "refusal", b) for it in unans[:want_r]]
        answers = []
        for it in _shuffled([i for i in its if not i.unanswerable], f"ans/{seed}/{b}") if want_a else []:
            if normalise(it.question) in exclude:
                continue
            if b in GOLD and it.answers:
                text = it.answers[0].strip().rstrip(".") + "."
            elif it.question in self_answers:
                text = first_sentence(self_answers[it.question])
                if not text or is_refusal(text, it.question):
                    continue
            else:
                continue
            answers.append(_row(it.question, text, "answer", b))
            if len(answers) == want_a:
                break
        rows += answers
    return rows


def _row(prompt: str, response: str, kind: str, benchmark: str) -> dict:
    return {"prompt": prompt, "response": response, "kind": kind, "benchmark": benchmark}


def served_answers(endpoint: str, model: str, questions: list[str], *, api_key: str | None = None,
                   max_tokens: int = 48, concurrency: int = 16) -> dict[str, str]:
    """question -> the served model's greedy chat answer (the eval harness's client: retries; no cache)."""
    import asyncio

    from eval_harness.client import ChatClient, ResponseCache, normalize_url

    url = normalize_url(endpoint)
    client = ChatClient(ResponseCache(None), api_key=api_key, concurrency=concurrency)
    params = {"temperature": 0.0, "max_tokens": max_tokens}

    async def ask_all():
        try:
            await client.check_models(url, [model])
            return await asyncio.gather(*[client.complete(url, model, [{"role": "user", "content": q}], params,
                                                          use_cache=False) for q in questions])
        finally:
            await client.aclose()

    replies = asyncio.run(ask_all())
    return {q: r.text for q, r in zip(questions, replies) if r.error is None}


def build_honesty(data_dir: Path, out: Path, *, size: int = 256, refusal_share: float = 0.5, seed: int = 0,
                  benchmarks=None, endpoint: str | None = None, model: str | None = None,
                  api_key: str | None = None) -> dict:
    """Write D_hon to `out` (JSONL, atomically) and return {"rows", "refusals", "answers", "per_benchmark", ...}."""
    from eval_harness.benchmarks import load_benchmark
    from hcnr_deploy.benchdata.split import evaluation_half, found_benchmarks

    if size < 2:
        raise UserError(f"--size must be at least 2, got {size}")
    if not 0 < refusal_share < 1:
        raise UserError(f"--refusal-share must be between 0 and 1 (exclusive), got {refusal_share}")
    if (endpoint is None) != (model is None):
        raise UserError("--endpoint and --model go together: the served model whose own answers fill in the "
                        "answerable questions without a gold answer")
    if evaluation_half(data_dir):
        raise UserError(f"--data-dir {data_dir} is the evaluation half of a `data split`: its questions are scored, "
                        f"so none may be calibration data; pass the calibration half")
    out = Path(out)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a folder; give a .jsonl file name")
    items = {b: load_benchmark(b, data_dir).items for b in found_benchmarks(data_dir, benchmarks)}
    n_refusals = round(size * refusal_share)
    n_answers = size - n_refusals
    self_answers: dict[str, str] = {}
    if endpoint is not None:
        need = [it.question for b, its in items.items() for it in its
                if not it.unanswerable and not (b in GOLD and it.answers)]
        # ask only for what can be used: twice the answers each benchmark may contribute, a seeded draw
        per = 2 * (n_answers // len(items) + 1)
        pool = {b: _shuffled([it.question for it in its if it.question in set(need)], f"ask/{seed}/{b}")[:per]
                for b, its in items.items()}
        self_answers = served_answers(endpoint, model, [q for qs in pool.values() for q in qs], api_key=api_key)
    # refusals shared over every benchmark, answers over those that can give one (gold, or the model's own)
    answering = {b: its for b, its in items.items() if b in GOLD or endpoint is not None}
    rows = rtuning_rows(items, {}, 0, n_refusals, seed) + \
        (rtuning_rows(answering, self_answers, n_answers, 0, seed) if answering else [])
    rows = _shuffled(rows, f"dhon/{seed}")
    if not rows:
        raise UserError(f"--data-dir {data_dir}: no usable question (unanswerable ones, or answerable ones with a gold "
                        f"answer{'' if endpoint else '; --endpoint adds the model own answers'}); nothing written")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}, ensure_ascii=False)
                                   + "\n" for r in rows))
    per = {}
    for r in rows:
        per.setdefault(r["benchmark"], {"refusal": 0, "answer": 0})[r["kind"]] += 1
    return {"rows": len(rows), "refusals": sum(r["kind"] == "refusal" for r in rows),
            "answers": sum(r["kind"] == "answer" for r in rows), "per_benchmark": per, "requested": size,
            "refusal_share": refusal_share, "self_answers": len(self_answers), "out": str(out)}
