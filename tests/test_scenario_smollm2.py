"""Unit tests of the SmolLM2 real-data scenario's own logic (realdata.py): the split, the R-Tuning rows, the reading
domain, the recipe. No SmolLM2 needed: the model's own answers are stood in by a function of the question."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from eval_harness.benchmarks import load_benchmark
from eval_harness.refusal import selfaware_refused, unknownbench_refused
from eval_harness.jsonl import read_jsonl
from hcnr_deploy.scenario import builds
from hcnr_deploy.scenario import realdata as R
from hcnr_deploy.scenario.cache import Steps
from hcnr_deploy.scenario.recipes import RECIPES


def _write_bench(root, n=60):
    """A small benchmark folder in the original formats: SelfAware, FalseQA, NEC, RefuNQ."""
    ex = [{"question_id": i, "question": f"What is fact number {i} about stars?", "answer": [f"gold{i}"],
           "answerable": True, "source": "squad"} for i in range(n)]
    ex += [{"question_id": n + i, "question": f"Why will idea {i} matter forever?", "answer": None,
            "answerable": False, "source": "SelfAware"} for i in range(n // 2)]
    ex.append({"question_id": 999, "question": "what  is Fact number 3 about stars?", "answer": ["dup"],
               "answerable": True, "source": "squad"})  # same normalised text as item 3
    (root / "selfaware").mkdir(parents=True)
    (root / "selfaware" / "SelfAware.json").write_text(json.dumps({"example": ex}))
    for stem in ("FalseQA", "NEC", "RefuNQ"):
        d = root / "unknownbench" / stem
        d.mkdir(parents=True)
        ans = [{"prompt": f"{stem} answerable question {i}?", "label": [f"g{i}"] if stem == "RefuNQ" else 0}
               for i in range(n)]
        una = [{"prompt": f"{stem} impossible question {i}?", "label": "NEC" if stem == "RefuNQ" else 1}
               for i in range(n)]
        (d / f"{stem}_answerable.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ans))
        (d / f"{stem}_unanswerable.jsonl").write_text("".join(json.dumps(r) + "\n" for r in una))
    return root


def _own_answer(q: str) -> str:
    """Stands in for the model's greedy answer: every third one a refusal-like ramble."""
    return "No, I do not know that." if int(re.findall(r"\d+", q)[-1]) % 3 == 0 else f"It is {q[:12]}. More text."


def test_split_is_stable_disjoint_and_roughly_the_shares(tmp_path):
    # pinned: the part of a question must never change between versions or machines
    assert [R.part_of(q) for q in ("What is the capital of France?", "Why is the sky blue?", "a", "b", "c")] == \
        [R.part_of(q.upper() + "  ") for q in ("What is the capital of France?", "Why is the sky blue?", "a", "b", "c")]
    qs = [f"question {i}" for i in range(4000)]
    parts = [R.part_of(q) for q in qs]
    for p, share in zip(R.PARTS, R.SPLIT):
        assert abs(parts.count(p) / len(qs) - share) < 0.03
    src = _write_bench(tmp_path / "src")
    by = R.load(src)
    a, b = R.split(by), R.split({k: list(reversed(v)) for k, v in by.items()})
    for p in R.PARTS:
        for bench in R.BENCHMARKS:
            assert {it.question for it in a[p][bench]} == {it.question for it in b[p][bench]}
    texts = {p: {R.normalise(it.question) for items in a[p].values() for it in items} for p in R.PARTS}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["evaluation"]
    assert not texts["validation"] & texts["evaluation"]
    assert sum(len(v) for p in R.PARTS for v in a[p].values()) == sum(len(v) for v in by.values())
    # a part written in the benchmarks' formats reads back with the harness's loaders, classes and golds kept
    for p in R.PARTS:
        R.write_part(a[p], tmp_path / p)
        for bench in R.BENCHMARKS:
            back = load_benchmark(bench, tmp_path / p).items
            assert [(i.question, i.unanswerable, i.answers) for i in back] == \
                sorted([(i.question, i.unanswerable, i.answers) for i in a[p][bench]], key=lambda t: t[1]) \
                if bench != "selfaware" else [(i.question, i.unanswerable, i.answers) for i in a[p][bench]]


def test_rtuning_rows_shares_refusals_and_answers(tmp_path):
    parts = R.split(R.load(_write_bench(tmp_path / "src", n=120)))
    train = parts["train"]
    own = {it.question: _own_answer(it.question) for b in ("falseqa", "nec") for it in train[b]}
    rows = R.rtuning_rows(train, own, n_answers=80, n_refusals=40, seed=0)
    ref = [r for r in rows if r["kind"] == "refusal"]
    ans = [r for r in rows if r["kind"] == "answer"]
    assert len(ref) == 40 and len(ans) == 80
    assert {b: sum(r["benchmark"] == b for r in ref) for b in R.BENCHMARKS} == {b: 10 for b in R.BENCHMARKS}
    assert {b: sum(r["benchmark"] == b for r in ans) for b in R.BENCHMARKS} == {b: 20 for b in R.BENCHMARKS}
    # every benchmark's detector recognises the refusals; no answer reads as a refusal
    assert all(selfaware_refused(r["response"]) and unknownbench_refused(r["response"]) for r in ref)
    assert not any(R.is_refusal(r["response"], r["prompt"]) for r in ans)
    # gold answers where the file has them, else the model's own first sentence
    gold = {it.question: it.answers[0] for b in R.GOLD for it in train[b] if it.answers}
    for r in ans:
        if r["benchmark"] in R.GOLD:
            assert r["response"] == gold[r["prompt"]] + "."
        else:
            assert r["response"] == R.first_sentence(own[r["prompt"]]) and r["response"].endswith(".")
    unans = {it.question for items in train.values() for it in items if it.unanswerable}
    assert {r["prompt"] for r in ref} <= unans and not {r["prompt"] for r in ans} & unans
    assert R.rtuning_rows(train, own, 80, 40, seed=0) == rows
    assert R.rtuning_rows(train, own, 80, 40, seed=1) != rows


def test_reading_domain_answers_are_in_the_passage_and_eval_towns_are_new():
    taken: set[str] = set()
    train, held = R.rc_rows(30, 3, 0, taken), R.rc_rows(40, 1, 1, taken)
    assert len(train) == 90 and len(held) == 40
    for r in train + held:
        passage = r["prompt"].split("Passage: ")[1].split("\n\nQuestion:")[0]
        assert r["answer"] in passage and r["response"] == r["answer"] + "." and r["town"] in passage
        assert not selfaware_refused(r["response"]) and not unknownbench_refused(r["response"])
    assert not {r["town"] for r in train} & {r["town"] for r in held}
    assert R.rc_rows(30, 3, 0, set()) == R.rc_rows(30, 3, 0, set())


def test_build_realdata_is_deterministic_disjoint_and_has_the_harness_formats(tmp_path, monkeypatch):
    src = _write_bench(tmp_path / "src", n=240)
    monkeypatch.setattr(builds, "build_smollm2", lambda steps: tmp_path / "smollm2-x")
    calls = []

    def fake_greedy(model_dir, questions, **kw):
        calls.append(len(questions))
        return {q: _own_answer(q) for q in questions}

    monkeypatch.setattr(R, "greedy_answers", fake_greedy)
    size = R.RealSize(rt_answers=60, rt_refusals=30, candidates=60, rc_train=90, rc_eval=20, eval_per_class=10,
                      calib=16)
    recipe = replace(RECIPES["smollm2-rc"], size=size)
    outs = [builds.build_realdata(Steps(tmp_path / f"cache{i}"), recipe, src) for i in (0, 1)]
    assert calls == [120, 120]
    for name in ("base_train.jsonl", "task_train.jsonl", "honesty_calib.jsonl", "task_calib.jsonl", "rait_train.jsonl",
                 "domain.jsonl", "kuq/knowns_unknowns.jsonl", "heldout/selfaware/SelfAware.json",
                 "validation/unknownbench/NEC/NEC_unanswerable.jsonl"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    d = outs[0]
    assert builds.build_realdata(Steps(tmp_path / "cache0"), recipe, src) == d and calls == [120, 120]  # cached
    base = read_jsonl(d / "base_train.jsonl")
    refusal_texts = set(R.REFUSAL_OF.values())
    assert sum(r["response"] in refusal_texts for r in base) == 30 and len(base) == 90
    held = {R.normalise(it.question) for b in R.BENCHMARKS for p in ("heldout", "validation")
            for it in load_benchmark(b, d / p).items}
    for name in ("base_train", "honesty_calib", "rait_train"):
        assert not {R.normalise(r["prompt"]) for r in read_jsonl(d / f"{name}.jsonl")} & held, name
    assert not {R.normalise(r["prompt"]) for r in read_jsonl(d / "base_train.jsonl")} & \
        {R.normalise(r["prompt"]) for r in read_jsonl(d / "honesty_calib.jsonl")}
    kuq = load_benchmark("kuq", d).items
    assert {R.normalise(i.question) for i in kuq} <= held and len(kuq) == 80
    assert builds.rehearsal_rows(d, 0.05)  # Rehearsal finds the refusal rows of the base data
    dom = json.loads((d / "domain.jsonl").read_text().splitlines()[0])
    assert set(dom) == {"question", "answers"}


def test_missing_source_is_a_user_error(monkeypatch, tmp_path):
    from eval_harness.errors import UserError

    monkeypatch.setenv("HCNR_DEPLOY_BENCHMARKS", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="HCNR_DEPLOY_BENCHMARKS"):
        R.default_source()
