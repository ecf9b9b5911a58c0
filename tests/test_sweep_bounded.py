"""A full fine-tune's sweep bounded on disk (sweep/bounded.py): candidates built, scored and deleted one at a time.

The serving and scoring is replaced by hand-made answers (our own logic under test: which folders exist when, what
is deleted, what a rerun rebuilds); that a full fine-tune's checkpoints are really served by vLLM one after another
is tests/test_sweep.py::test_full_fine_tune_sweep_serves_each_checkpoint_for_real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hcnr_deploy.cli import main
from hcnr_deploy.sweep import run as R
from test_eval_data import write_jsonl
from test_repair_pipeline import write_calibration

N = 40  # honesty questions, half unanswerable; and domain questions
GRID = "scale:a=0.8,0.5; hcnr:r_cw=0.2"
# per model: (share of unanswerable questions refused, share of answerable refused, domain accuracy)
BEHAVIOUR = {"base": (1.0, 0.5, 0.3), "ft": (0.0, 0.0, 0.9), "scale-a0.8": (0.5, 0.0, 0.9),
             "scale-a0.5": (0.9, 0.0, 0.9), "hcnr-rcw0.2": (0.1, 0.0, 0.9)}


def _samples(name: str, domain_task: str) -> dict:
    unans_refused, ans_refused, acc = BEHAVIOUR[name]
    half = N // 2
    hon = [{"unanswerable": True, "verdict": {"refused": i < unans_refused * half}} for i in range(half)]
    hon += [{"unanswerable": False, "verdict": {"refused": i < ans_refused * half}} for i in range(half)]
    return {"kuq": hon, domain_task: [{"correct": i < acc * N} for i in range(N)]}


class FakeScoring:
    """serve_and_score's stand-in: hand-made answers; records what was served and which candidate folders existed."""

    def __init__(self, out: Path, fail_on: str | None = None):
        self.out, self.fail_on, self.served, self.on_disk = out, fail_on, [], []

    def __call__(self, names, artifacts, is_lora, eval_kwargs, **_):
        domain_task = Path(eval_kwargs["domain"][0]).stem
        folder = self.out / "candidates"
        self.on_disk.append(sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir()
                            else [])
        for n in names:
            if n == self.fail_on:
                raise KeyboardInterrupt
            assert Path(artifacts[n]).is_dir(), n  # what is served exists
        self.served += list(names)
        return ({"results": {n: {} for n in names}, "samples": {n: _samples(n, domain_task) for n in names},
                 "config": {"models": list(names)}}, 0.0, 0.0, [])


@pytest.fixture
def inputs(tiny_base, tmp_path):
    from hcnr_deploy.tiny import perturbed_copy

    full = perturbed_copy(tiny_base, tmp_path / "full", scale=0.03, seed=2)
    hon, task = write_calibration(tmp_path)
    kuq = write_jsonl(tmp_path / "kuq.jsonl", [{"question": f"Question number {i} about rivers?", "answer": "x",
                                                "unknown": i % 2 == 0} for i in range(N)])
    dom = write_jsonl(tmp_path / "domain.jsonl", [{"question": f"Domain question {i}?", "answers": ["a"]}
                                                  for i in range(N)])
    return dict(base=tiny_base, finetuned=full, honesty_data=hon, task_data=task, eval_honesty=kuq, eval_domain=dom)


def _sweep(inputs, out, monkeypatch, fake, **kw):
    monkeypatch.setattr(R, "serve_and_score", fake)
    monkeypatch.setattr(R, "write_results", lambda s, results: None)  # lm-eval's files: not under test here
    return R.run_sweep(**inputs, out=out, grid=GRID, n_boot=200, progress=False,
                       repair_options={"num_samples": 8, "max_length": 48}, **kw)


def test_candidates_are_deleted_once_scored_and_the_choice_is_kept(inputs, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    fake = FakeScoring(out)
    fr = _sweep(inputs, out, monkeypatch, fake)
    assert fake.served == ["base", "ft", "scale-a0.8", "scale-a0.5", "hcnr-rcw0.2"]  # one at a time
    # at each serving: base and ft with nothing built, then the one being scored and at most the choice so far
    assert fake.on_disk == [[], ["scale-a0.8"], ["scale-a0.5", "scale-a0.8"], ["hcnr-rcw0.2", "scale-a0.5"]]
    assert fr["chosen"] == "scale-a0.5" and fr["run"]["one_at_a_time"]
    assert sorted(p.name for p in (out / "candidates").iterdir()) == ["scale-a0.5"]
    assert fr["run"]["deleted"] == ["scale-a0.8", "hcnr-rcw0.2"]
    assert fr["run"]["statistics_kept"]["files"] == 2 and fr["run"]["statistics_kept"]["bytes"] > 0  # hcnr's Fisher
    arts = {r["name"]: r["artifact"] for r in fr["candidates"]}
    assert arts["scale-a0.8"] is None and arts["hcnr-rcw0.2"] is None and arts["scale-a0.5"] == str(
        out / "candidates" / "scale-a0.5")
    for n in ("scale-a0.8", "scale-a0.5", "hcnr-rcw0.2"):  # each scored candidate's record, with its repair report
        rec = json.loads((out / "scored" / f"{n}.json").read_text())
        assert rec["report"]["settings"]["method"] == n.split("-")[0] and len(rec["samples"]["kuq"]) == N
    edited = {r["name"]: r["edited_fraction"] for r in fr["candidates"]}
    assert all(edited[n] is not None for n in ("scale-a0.8", "hcnr-rcw0.2"))  # from the records of deleted ones
    weights = sorted(f.name for f in (out / "candidates" / "scale-a0.5").glob("*.safetensors"))
    assert weights and all((out / "chosen" / w).read_bytes() == (out / "candidates" / "scale-a0.5" / w).read_bytes()
                           for w in weights)


def test_a_killed_run_resumes_without_rebuilding_or_serving_a_scored_candidate(inputs, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        _sweep(inputs, out, monkeypatch, FakeScoring(out, fail_on="hcnr-rcw0.2"))
    assert sorted(p.name for p in (out / "scored").iterdir()) == ["scale-a0.5.json", "scale-a0.8.json"]
    fake = FakeScoring(out)
    fr = _sweep(inputs, out, monkeypatch, fake)
    assert fake.served == ["base", "ft", "hcnr-rcw0.2"]  # base and ft are served again; their answers are cached
    # hcnr's folder was finished before the kill (only its scoring was not): reused, not rebuilt
    assert fr["run"]["reused"] == ["scale-a0.8", "scale-a0.5", "hcnr-rcw0.2"] and fr["run"]["built"] == []
    assert fr["chosen"] == "scale-a0.5"
    assert sorted(p.name for p in (out / "candidates").iterdir()) == ["scale-a0.5"]


def test_keep_candidates_keeps_every_checkpoint(inputs, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    fake = FakeScoring(out)
    fr = _sweep(inputs, out, monkeypatch, fake, keep_candidates=True)
    assert fake.on_disk == [["hcnr-rcw0.2", "scale-a0.5", "scale-a0.8"]] and fr["chosen"] == "scale-a0.5"
    assert "deleted" not in fr["run"] and all(r["artifact"] for r in fr["candidates"])
    assert sorted(p.name for p in (out / "candidates").iterdir()) == ["hcnr-rcw0.2", "scale-a0.5", "scale-a0.8"]


def test_plan_counts_two_checkpoints_on_disk_and_every_candidates_statistics(inputs):
    def plan(*extra):
        r = CliRunner().invoke(main, ["sweep", "--base", str(inputs["base"]), "--finetuned",
                                      str(inputs["finetuned"]), "--grid", "scale:a=0.2,0.4,0.6,0.8; hcnr:r_cw=0.2",
                                      "--plan", "--json", *extra])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    bounded, kept = plan(), plan("--keep-candidates")
    assert bounded["model_bytes"] == kept["model_bytes"]
    assert bounded["disk_bytes"] < kept["disk_bytes"]
    assert bounded["disk_bytes"] <= 2 * bounded["model_bytes"] + kept["disk_bytes"] - 5 * kept["model_bytes"]
    assert bounded["flops"]["fisher"] == kept["flops"]["fisher"]  # the Fisher scores are kept on disk: once
    assert bounded["host_bytes"] <= kept["host_bytes"]


def test_a_guard_family_that_cannot_fit_one_device_stops_the_sweep_before_any_work(inputs, tmp_path, monkeypatch):
    """The guard's fit holds the whole fine-tune on one device (guard/memory.py): a sweep whose grid has the guard
    family says so before --out is touched, not after every candidate was scored."""
    from eval_harness.errors import UserError
    from hcnr_deploy.guard import memory

    monkeypatch.setattr(memory, "available_memory", lambda: {"host": 1 << 20, "gpus": []})
    with pytest.raises(UserError, match="guard's fit holds the whole fine-tune on one device"):
        R.run_sweep(**inputs, out=tmp_path / "sweep", grid="scale:a=0.5; guard:fr=0.05", progress=False)
    assert not (tmp_path / "sweep").exists()
