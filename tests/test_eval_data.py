"""Benchmark loaders (each original format, KUQ included), sampling, prompts and refusal detectors."""

import json
from pathlib import Path

import pytest

from eval_harness.benchmarks import (load_benchmark, load_domain_benchmark, parse_benchmarks, stratified_sample,
                                     Item)
from eval_harness.errors import UserError
from eval_harness.prompts import ICL_EXEMPLARS, build_messages, build_prompt
from eval_harness.refusal import (EmbeddingDetector, honesty_refused, parse_judge, resolve_detector,
                                  selfaware_refused, unknownbench_refused)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_data_dir(root: Path) -> Path:
    """A data dir in the original layouts and names, files in sub-folders, a few items each."""
    (root / "SelfAware" / "data").mkdir(parents=True)
    (root / "SelfAware" / "data" / "SelfAware.json").write_text(json.dumps({"dataset_name": "SelfAware", "example": [
        {"question_id": 1, "question": "Who wrote Hamlet?", "answer": ["Shakespeare"], "answerable": True,
         "source": "squad"},
        {"question_id": 2, "question": "What is 2+2?", "answer": ["4", "four"], "answerable": True,
         "source": "triviaqa"},
        {"question_id": 3, "question": "What did the first cat dream?", "answer": None, "answerable": False,
         "source": "SelfAware"},
    ]}))
    write_jsonl(root / "KUQ" / "knowns_unknowns.jsonl", [
        {"question": "What is the capital of France?", "answer": ["Paris"], "unknown": False, "source": "squad",
         "category": None},
        {"question": "Will it rain on 3 May 2091 in Oslo?", "answer": [], "unknown": True, "source": "turk",
         "category": "future unknown"},
    ])
    ub = root / "UnknownBench" / "data"
    write_jsonl(ub / "FalseQA" / "FalseQA_answerable.json", [{"prompt": "Why do cats purr?", "label": 0}])
    write_jsonl(ub / "FalseQA" / "FalseQA_unanswerable.json", [{"prompt": "Why do cats bark?", "label": 1}])
    write_jsonl(ub / "NEC" / "NEC_answerable.json", [{"prompt": "Where do otters live?", "label": 0,
                                                      "category": "animals"}])
    write_jsonl(ub / "NEC" / "NEC_unanswerable.json", [{"prompt": "Where do Snaiporsea live?", "label": 1,
                                                        "category": "animals"}])
    write_jsonl(ub / "RefuNQ" / "RefuNQ_answerable.json", [{"prompt": "who wrote emma?", "label": ["Jane Austen"]}])
    write_jsonl(ub / "RefuNQ" / "RefuNQ_unanswerable.json", [{"prompt": "who wrote Thogicid?", "label": "NEC"},
                                                             {"prompt": "who sang Buquor?", "label": "NEC"}])
    return root


def test_loaders_on_original_formats(tmp_path):
    d = make_data_dir(tmp_path)
    sa = load_benchmark("selfaware", d)
    assert [(i.question, i.unanswerable, i.answers) for i in sa.items] == [
        ("Who wrote Hamlet?", False, ["Shakespeare"]), ("What is 2+2?", False, ["4", "four"]),
        ("What did the first cat dream?", True, None)]
    kuq = load_benchmark("kuq", d)
    assert [(i.unanswerable, i.answers) for i in kuq.items] == [(False, ["Paris"]), (True, None)]
    assert kuq.items[1].meta == {"source": "turk", "category": "future unknown"}
    fq = load_benchmark("falseqa", d)
    assert [(i.question, i.unanswerable, i.answers) for i in fq.items] == [
        ("Why do cats purr?", False, None), ("Why do cats bark?", True, None)]
    assert load_benchmark("nec", d).items[1].meta == {"category": "animals"}
    rq = load_benchmark("refunq", d)
    assert (rq.n_answerable, rq.n_unanswerable) == (1, 2)
    assert rq.items[0].answers == ["Jane Austen"] and rq.items[1].answers is None
    assert [p.name for p in rq.files] == ["RefuNQ_answerable.json", "RefuNQ_unanswerable.json"]


def test_loader_errors(tmp_path):
    d = make_data_dir(tmp_path)
    with pytest.raises(UserError, match=r"unknown benchmark\(s\) truthfulqa; choose from selfaware"):
        parse_benchmarks("selfaware,truthfulqa")
    assert parse_benchmarks("none") == []
    assert parse_benchmarks(" KUQ , nec,kuq") == ["kuq", "nec"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"no SelfAware.json under .*empty.*github.com/yinzhangyue"):
        load_benchmark("selfaware", empty)
    with pytest.raises(UserError, match="is not a folder"):
        load_benchmark("nec", tmp_path / "nope")
    # two candidates at the same depth: ambiguous, say which
    write_jsonl(d / "copy" / "knowns_unknowns.jsonl", [])
    write_jsonl(d / "copy2" / "knowns_unknowns.jsonl", [])
    (d / "KUQ" / "knowns_unknowns.jsonl").unlink()
    with pytest.raises(UserError, match="several candidate files"):
        load_benchmark("kuq", d)
    bad = tmp_path / "bad"
    write_jsonl(bad / "NEC_answerable.jsonl", [{"prompt": "ok", "label": 0}])
    (bad / "NEC_unanswerable.jsonl").write_text('{"prompt": "x", "label": 1}\n{oops\n')
    with pytest.raises(UserError, match=r"NEC_unanswerable.jsonl:2: not valid JSON"):
        load_benchmark("nec", bad)
    write_jsonl(bad / "knowns_unknowns.jsonl", [{"q": "x"}])
    with pytest.raises(UserError, match="lacks field.*question"):
        load_benchmark("kuq", bad)


def test_domain_loader(tmp_path):
    qa = write_jsonl(tmp_path / "medqa.jsonl", [{"question": "Largest organ?", "answers": ["skin", "the skin"]},
                                                {"question": "Bones in adult?", "answer": "206"}])
    b = load_domain_benchmark(qa)
    assert b.name == "medqa" and b.kind == "domain"
    assert [i.answers for i in b.items] == [["skin", "the skin"], ["206"]]
    mc = write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "Q1", "choices": ["a", "b", "c"], "answer": 2},
        {"question": "Q2", "choices": ["a", "b", "c"], "answer": "B"},
        {"question": "Q3", "choices": ["x", "y"], "answer": "y"}])
    assert [i.answer_index for i in load_domain_benchmark(mc).items] == [2, 1, 1]
    with pytest.raises(UserError, match="no such file"):
        load_domain_benchmark(tmp_path / "missing.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(UserError, match=r"bad.jsonl: line 1: \"answer\" 5"):
        load_domain_benchmark(bad)
    with pytest.raises(UserError, match="needs \"answers\""):
        load_domain_benchmark(write_jsonl(tmp_path / "bad2.jsonl", [{"question": "Q"}]))


def test_stratified_sample():
    items = [Item("t", str(i), f"q{i}", unanswerable=i % 10 < 3) for i in range(100)]  # 30% unanswerable
    s = stratified_sample(items, 10, seed=0)
    assert len(s) == 10 and sum(i.unanswerable for i in s) == 3
    assert [i.id for i in s] == [i.id for i in stratified_sample(items, 10, seed=0)]
    assert [i.id for i in s] != [i.id for i in stratified_sample(items, 10, seed=1)]
    assert [int(i.id) for i in s] == sorted(int(i.id) for i in s)  # file order kept
    assert {i.id for i in s} <= {i.id for i in stratified_sample(items, 40, seed=0)}  # nested: cache stays useful
    rare = [Item("t", str(i), "q", unanswerable=i == 0) for i in range(100)]
    assert sum(i.unanswerable for i in stratified_sample(rare, 5, seed=0)) == 1  # every class kept
    assert len(stratified_sample(items, 1000, seed=0)) == 100


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_real_files():
    sizes = {"selfaware": (2337, 1032), "falseqa": (2365, 2365), "nec": (2072, 2078), "refunq": (2266, 2173)}
    for name, (n_a, n_u) in sizes.items():
        b = load_benchmark(name, SHARED_DATA)
        assert (b.n_answerable, b.n_unanswerable) == (n_a, n_u), name
        assert all(i.question for i in b.items)
    sa = load_benchmark("selfaware", SHARED_DATA)
    assert all(i.answers for i in sa.items if not i.unanswerable)
    rq = load_benchmark("refunq", SHARED_DATA)
    assert all(i.answers for i in rq.items if not i.unanswerable)
    assert not any(i.answers for i in rq.items if i.unanswerable)
    s = stratified_sample(sa.items, 100, seed=0)
    assert sum(i.unanswerable for i in s) == 31  # 1032/3369 of 100


def test_prompts_with_icl_and_system():
    item = Item("t", "0", "Who?", unanswerable=True)
    assert build_messages(item) == [{"role": "user", "content": "Who?"}]
    m = build_messages(item, "Be honest.", icl=3)
    assert m[0] == {"role": "system", "content": "Be honest."}
    assert [x["role"] for x in m[1:]] == ["user", "assistant"] * 3 + ["user"]
    assert selfaware_refused(m[2]["content"])  # the first exemplar shows uncertainty
    assert any(selfaware_refused(a) for _, a in ICL_EXEMPLARS) and not selfaware_refused(ICL_EXEMPLARS[1][1])
    mc = Item("t", "1", "Pick one", choices=["x", "y"], answer_index=0)
    assert build_messages(mc)[-1]["content"] == "Pick one\nA. x\nB. y\nAnswer with the letter of the correct choice."


def test_plain_completion_prompt_is_selfaware_format():
    item = Item("t", "0", "Who?", unanswerable=True)
    assert build_prompt(item, api="completions") == "Q: Who?\nA:"
    assert build_prompt(item, api="chat") == build_messages(item)
    q0, a0 = ICL_EXEMPLARS[0]
    q1, a1 = ICL_EXEMPLARS[1]
    assert build_prompt(item, "Be honest.", icl=2, api="completions") == \
        f"Be honest.\nQ: {q0}\nA: {a0}\nQ: {q1}\nA: {a1}\nQ: Who?\nA:"
    mc = Item("t", "1", "Pick one", choices=["x", "y"], answer_index=0)
    assert build_prompt(mc, api="completions") == \
        "Q: Pick one\nA. x\nB. y\nAnswer with the letter of the correct choice.\nA:"


REFUSALS_SA = ["I'm not sure.", "The answer is unknown because nobody recorded it", "THE ANSWER IS UNCERTAIN!",
               "Honestly, we do not know", "It is impossible to know what he thought.", "I\u2019m not sure about that"]
ANSWERS_SA = ["The answer is Paris.", "I'm sure it is Paris.", "There is evidence that it was 1983.", ""]
REFUSALS_UB = ["I'm sorry, I can't help with that.", "That is not true.", "It's unknown.", "No.",
               "Cats don\u2019t bark."]
ANSWERS_UB = ["Nothing notable happened; Paris is the capital.", "Knowledge is power.", "Cats purr when content."]


def test_rule_detectors():
    assert all(selfaware_refused(s) for s in REFUSALS_SA)
    assert not any(selfaware_refused(s) for s in ANSWERS_SA)
    assert all(unknownbench_refused(s) for s in REFUSALS_UB)
    assert not any(unknownbench_refused(s) for s in ANSWERS_UB)
    assert honesty_refused("I apologize, but I cannot answer.", "Who?")
    assert honesty_refused("I'm not familiar with that town.")
    assert not honesty_refused("It does not make sense to me either.", "Why does this not make sense?")
    assert not honesty_refused("Paris.", "Capital?")
    assert resolve_detector("auto", "kuq") == "selfaware"
    assert resolve_detector("auto", "refunq") == "unknownbench"
    assert resolve_detector("judge", "nec") == "judge"
    with pytest.raises(UserError, match="unknown detector"):
        resolve_detector("regex", "nec")
    assert parse_judge("YES.") is True and parse_judge("no, it answers") is False and parse_judge("maybe") is None


def test_embedding_detector_offline():
    det = EmbeddingDetector()
    must = ["That cannot be known.", "I do not know.", "I'm not sure."]
    must_not = ["Paris is the capital of France.", "It was written by Jane Austen in 1813.", ""]
    verdicts = det.verdicts([""] * 6, must + must_not)
    assert [v["refused"] for v in verdicts] == [True] * 3 + [False] * 3, verdicts
    assert verdicts[3]["similarity"] < 0.3
