"""`hcnr-deploy data split` and `data honesty` on the real benchmark files (../shared/data, unchanged public copies)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from eval_harness.benchmarks import HONESTY_BENCHMARKS, benchmark_files, load_benchmark
from hcnr_deploy.benchdata.split import normalise
from hcnr_deploy.cli import main

from test_eval_data import make_data_dir

DATA = Path(os.environ.get("HCNR_DEPLOY_BENCHMARKS") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not (DATA / "selfaware" / "SelfAware.json").is_file(),
                                reason=f"the benchmark copies are not at {DATA}")


def _run(*args):
    return CliRunner().invoke(main, ["data", *map(str, args)])


def _questions(folder: Path) -> dict[str, list[str]]:
    out = {}
    for b in HONESTY_BENCHMARKS:
        try:
            out[b] = [it.question for it in load_benchmark(b, folder).items]
        except Exception:
            continue
    return out


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("split") / "s"
    r = _run("split", "--data-dir", DATA, "--out", out)
    assert r.exit_code == 0, r.output
    return out


@needs_data
def test_split_is_disjoint_by_question_text_and_loses_nothing(split_dir):
    src, cal, ev = _questions(DATA), _questions(split_dir / "calibration"), _questions(split_dir / "evaluation")
    assert set(src) == set(cal) == set(ev) == {"selfaware", "falseqa", "nec", "refunq"}
    cal_text = {normalise(q) for qs in cal.values() for q in qs}
    ev_text = {normalise(q) for qs in ev.values() for q in qs}
    assert not cal_text & ev_text                       # across benchmarks too
    for b in src:                                       # every row in exactly one half
        assert Counter(src[b]) == Counter(cal[b]) + Counter(ev[b])
        assert 0.4 < len(ev[b]) / len(src[b]) < 0.6
    # same layout, same file names: every command finds the same files in a half as in the source
    for b in src:
        assert [f.relative_to(split_dir / "evaluation") for f in benchmark_files(b, split_dir / "evaluation")] == \
            [f.relative_to(DATA) for f in benchmark_files(b, DATA)]
    meta = json.loads((split_dir / "split.json").read_text())
    assert meta["questions"]["selfaware"] == {"calibration": len(cal["selfaware"]), "evaluation": len(ev["selfaware"])}


@needs_data
def test_split_rows_keep_every_field_and_seed_zero_is_the_scenarios_split(split_dir):
    from hcnr_deploy.scenario import realdata

    src = [json.loads(x) for x in (DATA / "unknownbench" / "NEC_answerable.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (split_dir / "calibration" / "unknownbench" / "NEC_answerable.jsonl")
           .read_text().splitlines()]
    assert got == [r for r in src if r in got] and all("category" in r for r in got)
    sa = json.loads((split_dir / "evaluation" / "selfaware" / "SelfAware.json").read_text())
    assert set(sa["example"][0]) == {"question_id", "question", "answer", "answerable", "source"}
    # the smollm2-rc scenario splits with the command's hash (its own, finer key: case and spaces)
    from hcnr_deploy.benchdata.split import part_of

    parts = realdata.split(realdata.load(DATA))
    train = [it.question for items in parts["train"].values() for it in items]
    held = [it.question for p in ("validation", "evaluation") for items in parts[p].values() for it in items]
    assert all(part_of(q, 0.5, key=normalise) == "calibration" for q in train)
    assert all(part_of(q, 0.5, key=normalise) == "evaluation" for q in held)


@needs_data
def test_split_is_deterministic_and_seeded(split_dir, tmp_path):
    assert _run("split", "--data-dir", DATA, "--out", tmp_path / "again").exit_code == 0
    for f in (split_dir / "calibration").rglob("*"):
        if f.is_file():
            assert f.read_bytes() == (tmp_path / "again" / "calibration" / f.relative_to(split_dir / "calibration"))\
                .read_bytes()
    assert _run("split", "--data-dir", DATA, "--out", tmp_path / "s1", "--seed", "1", "--eval-share", "0.3",
                "--benchmarks", "falseqa").exit_code == 0
    q0 = _questions(split_dir / "evaluation")["falseqa"]
    q1 = _questions(tmp_path / "s1" / "evaluation")["falseqa"]
    assert q0 != q1 and 0.25 < len(q1) / (len(q0) + len(_questions(split_dir / "calibration")["falseqa"])) < 0.35
    assert set(_questions(tmp_path / "s1" / "evaluation")) == {"falseqa"}


def test_split_bad_input_is_one_line_and_writes_nothing(tmp_path):
    data = make_data_dir(tmp_path / "data")
    (tmp_path / "taken").mkdir()
    for args, words in [(["--out", tmp_path / "taken"], "exists; choose a new folder"),
                        (["--out", tmp_path / "o", "--eval-share", "1"], "--eval-share must be between 0 and 1"),
                        (["--out", data / "inside"], "overlaps --data-dir"),
                        (["--out", tmp_path / "o", "--benchmarks", "nope"], "unknown benchmark")]:
        r = _run("split", "--data-dir", data, *args)
        assert r.exit_code == 2 and words in r.output and r.output.count("\n") == 1, r.output
    (data / "KUQ" / "knowns_unknowns.jsonl").write_text('{"question": "q?", "unknown": true}\nnot json\n')
    r = _run("split", "--data-dir", data, "--out", tmp_path / "o")
    assert r.exit_code != 0 and not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]


def test_split_failing_midway_or_racing_another_writer_leaves_nothing_of_its_own(tmp_path, monkeypatch):
    """The split is written in an AtomicDir: a failure after some files were written leaves no --out and no
    temporary folder; an --out that another process creates meanwhile is a one-line error and stays as it was."""
    from eval_harness.errors import UserError
    from hcnr_deploy.benchdata import split as S

    data = make_data_dir(tmp_path / "data")
    read, calls = S._read_rows, []

    def fail_second(path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("read error")
        return read(path)

    monkeypatch.setattr(S, "_read_rows", fail_second)
    with pytest.raises(OSError, match="read error"):
        S.split_folder(data, tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]

    def race(path):
        (tmp_path / "o").mkdir(exist_ok=True)
        (tmp_path / "o" / "theirs").write_text("x")
        return read(path)

    monkeypatch.setattr(S, "_read_rows", race)
    with pytest.raises(UserError, match="appeared while this command ran; nothing was written"):
        S.split_folder(data, tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "o"]
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["theirs"]


@needs_data
def test_honesty_data_from_the_calibration_half(split_dir, tmp_path):
    from eval_harness.refusal import selfaware_refused, unknownbench_refused
    from hcnr_deploy.data import load_jsonl

    out = tmp_path / "hon.jsonl"
    r = _run("honesty", "--data-dir", split_dir / "calibration", "--out", out, "--size", "120", "--refusal-share",
             "0.25")
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 120 and len(load_jsonl(out)) == 120      # what repair reads
    cal = {normalise(q) for qs in _questions(split_dir / "calibration").values() for q in qs}
    ev = {normalise(q) for qs in _questions(split_dir / "evaluation").values() for q in qs}
    assert all(normalise(r["prompt"]) in cal and normalise(r["prompt"]) not in ev for r in rows)
    refusals = [r for r in rows if selfaware_refused(r["response"])]
    assert len(refusals) == 30 and all(unknownbench_refused(r["response"]) for r in refusals)
    # answers: gold answers of answerable questions (no --endpoint: SelfAware and RefuNQ only)
    gold = {normalise(it.question): it.answers for b in ("selfaware", "refunq")
            for it in load_benchmark(b, split_dir / "calibration").items if not it.unanswerable and it.answers}
    answers = [r for r in rows if r not in refusals]
    assert len(answers) == 90 and all(r["response"].rstrip(".") == gold[normalise(r["prompt"])][0].strip()
                                      .rstrip(".") for r in answers)
    again = tmp_path / "again.jsonl"
    _run("honesty", "--data-dir", split_dir / "calibration", "--out", again, "--size", "120", "--refusal-share", "0.25")
    assert again.read_bytes() == out.read_bytes()


@needs_data
def test_no_calibration_question_is_scored(split_dir, tmp_path):
    """The honesty data of the calibration half passes the sweep's overlap check against the evaluation half;
    `data honesty` refuses the evaluation half."""
    from hcnr_deploy.sweep import check_overlap, eval_tasks

    hon = tmp_path / "hon.jsonl"
    assert _run("honesty", "--data-dir", split_dir / "calibration", "--out", hon, "--size", "400").exit_code == 0
    dom = tmp_path / "dom.jsonl"
    dom.write_text('{"question": "Passage: x. Question: y?", "answers": ["x"]}\n')
    tasks, _, names = eval_tasks(split_dir / "evaluation", dom, None, None, 0, tmp_path)
    assert set(names) == {"selfaware", "falseqa", "nec", "refunq"}
    check_overlap(tasks, {"honesty": hon}, 400)  # raises on any shared question
    r = _run("honesty", "--data-dir", split_dir / "evaluation", "--out", tmp_path / "x.jsonl")
    assert r.exit_code == 2 and "evaluation half" in r.output and not (tmp_path / "x.jsonl").exists()


def test_honesty_bad_input(tmp_path):
    data = make_data_dir(tmp_path / "data")
    for args, words in [(["--endpoint", "http://127.0.0.1:9/v1"], "--endpoint and --model go together"),
                        (["--refusal-share", "1"], "--refusal-share must be between 0 and 1")]:
        r = _run("honesty", "--data-dir", data, "--out", tmp_path / "h.jsonl", *args)
        assert r.exit_code == 2 and words in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "h.jsonl").exists()


@pytest.mark.vllm
def test_honesty_answers_from_a_served_model(vllm_server, tmp_path):
    """--endpoint: answerable questions without a gold answer (FalseQA, NEC) get the served model's own greedy
    answer (first sentence), asked through the eval harness's client; refusals are dropped."""
    import urllib.request

    from hcnr_deploy.benchdata.honesty import first_sentence, is_refusal

    data = make_data_dir(tmp_path / "data")
    out = tmp_path / "hon.jsonl"
    r = _run("honesty", "--data-dir", data, "--out", out, "--size", "20", "--endpoint", vllm_server.base_url,
             "--model", "base", "--benchmarks", "falseqa,nec")
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    for q in ("Why do cats purr?", "Where do otters live?"):
        req = urllib.request.Request(f"{vllm_server.base_url}/chat/completions", data=json.dumps(
            {"model": "base", "messages": [{"role": "user", "content": q}], "temperature": 0,
             "max_tokens": 48}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            own = first_sentence(json.load(resp)["choices"][0]["message"]["content"])
        got = [x["response"] for x in rows if x["prompt"] == q]
        assert got == ([] if not own or is_refusal(own, q) else [own]), (q, own, got)
    assert {x["prompt"] for x in rows if "The answer is unknown." in x["response"]} == \
        {"Why do cats bark?", "Where do Snaiporsea live?"}
