"""Unit tests of the scenario's own logic: generated data, cache steps, the demo's summary."""

from __future__ import annotations

import json
import os

import pytest

from eval_harness.env import cache_root
from hcnr_deploy.scenario import data as scen_data
from hcnr_deploy.scenario.cache import OWNER_FILE, Steps, key_of


def test_data_is_deterministic_and_disjoint(tmp_path):
    a = scen_data.write(tmp_path / "a", scen_data.CI_SIZE, seed=3)
    b = scen_data.write(tmp_path / "b", scen_data.CI_SIZE, seed=3)
    for k in a:
        assert a[k].read_bytes() == b[k].read_bytes(), k
    c = scen_data.write(tmp_path / "c", scen_data.CI_SIZE, seed=4)
    assert a["task_train"].read_bytes() != c["task_train"].read_bytes()

    sets = scen_data.build(scen_data.TINY_SIZE, seed=0)
    assert len(sets["honesty_calib"]) == len(sets["task_calib"]) == 128
    evals = {it["prompt"] for k in ("eval_unanswerable", "eval_answerable", "domain_eval") for it in sets[k]}
    calib = {it["prompt"] for k in ("honesty_calib", "task_calib") for it in sets[k]}
    assert not evals & calib
    train = {it["prompt"] for k in ("task_train", "rait_train") for it in sets[k]}
    assert not {it["prompt"] for it in sets["domain_eval"]} & train
    # the domain is asked back in phrasings the fine-tune never saw, about facts it was taught
    taught = {(it["person"], it["relation"]): it["answer"] for it in sets["task_train"]}
    for it in sets["domain_eval"]:
        assert it["template"] in scen_data.HELDOUT_TEMPLATES
        assert taught[(it["person"], it["relation"])] == it["answer"]
    # the unanswerable eval asks about people no training or calibration set mentions
    people = {it.get("person") for k in ("base_train", "task_train", "honesty_calib", "rait_train") for it in sets[k]}
    fake_eval = {it["person"] for it in sets["eval_unanswerable"] if it["kind"] == "nonexistent"}
    assert fake_eval and not fake_eval & people
    assert len(sets["eval_unanswerable"]) >= 290 and len(sets["eval_answerable"]) == 300
    refusals = [it for it in sets["base_train"] if it["kind"] in ("nonexistent", "future", "false_premise")]
    assert refusals and all("The answer is unknown." in it["response"] for it in refusals)
    assert all("unknown" not in it["response"] for it in sets["task_train"])


@pytest.mark.parametrize("size", [scen_data.TINY_SIZE, scen_data.SMOLLM2_SIZE], ids=["tiny", "smollm2"])
def test_calibration_draw_changes_only_the_calibration_sets(size):
    draw0 = scen_data.build(size, seed=0)
    draws = [scen_data.build(size, seed=0, calib_draw=d) for d in (1, 2)]
    assert scen_data.build(size, seed=0, calib_draw=1) == draws[0]
    evals = {it["prompt"] for k in ("eval_unanswerable", "eval_answerable", "domain_eval") for it in draw0[k]}
    taught = {it["prompt"] for it in draw0["task_train"]}
    people = {it.get("person") for k in ("base_train", "task_train", "eval_unanswerable") for it in draw0[k]} - {None}
    prompts = []
    for sets in draws:
        for k in draw0:
            if k not in ("honesty_calib", "task_calib"):
                assert sets[k] == draw0[k], k
        assert len(sets["honesty_calib"]) == len(sets["task_calib"]) == 128
        calib = {it["prompt"] for k in ("honesty_calib", "task_calib") for it in sets[k]}
        assert not calib & evals
        assert {it["prompt"] for it in sets["task_calib"]} <= taught  # the fine-tune's own domain
        fake = {it["person"] for it in sets["honesty_calib"] if it["kind"] == "nonexistent"}
        assert fake and not fake & people
        prompts.append({it["prompt"] for it in sets["honesty_calib"]})
    assert prompts[0] != prompts[1] != {it["prompt"] for it in draw0["honesty_calib"]}


def test_eval_files_have_harness_formats(tmp_path):
    from eval_harness.benchmarks import load_benchmark, load_domain_benchmark

    paths = scen_data.write(tmp_path, scen_data.CI_SIZE, seed=0)
    kuq = load_benchmark("kuq", tmp_path)
    assert kuq.n_unanswerable > 30 and kuq.n_answerable > 30
    dom = load_domain_benchmark(paths["domain"])
    assert len(dom.items) == scen_data.CI_SIZE.domain_eval and all(it.answers for it in dom.items)
    row = json.loads(paths["honesty_calib"].read_text().splitlines()[0])
    assert set(row) == {"prompt", "response"}


def test_steps_cache_and_fresh(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "x.txt").write_text(str(len(calls)))

    steps = Steps(tmp_path)
    p1 = steps.run("thing", {"a": 1}, build)
    p2 = Steps(tmp_path).run("thing", {"a": 1}, build)
    assert p1 == p2 and len(calls) == 1 and (p1 / "x.txt").read_text() == "1"
    assert Steps(tmp_path).run("thing", {"a": 2}, build) != p1
    p3 = Steps(tmp_path, fresh=True).run("thing", {"a": 1}, build)
    assert p3 == p1 and (p3 / "x.txt").read_text() == "3"


def test_failed_step_leaves_nothing(tmp_path):
    def build(tmp):
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        Steps(tmp_path).run("thing", {"a": 1}, build)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_killed_runs_half_built_step_is_removed_a_running_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"thing-{key_of({'a': 1})}"
    for suffix, pid in (("killed", dead.pid), ("running", os.getpid())):
        (tmp_path / f".{name}.tmp-{suffix}").mkdir()
        (tmp_path / f".{name}.tmp-{suffix}" / OWNER_FILE).write_text(str(pid))
    built = Steps(tmp_path).run("thing", {"a": 1}, lambda tmp: (tmp / "x.txt").write_text("x") and None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".{name}.tmp-running", name])
    assert sorted(p.name for p in built.iterdir()) == ["step.json", "x.txt"]  # the owner mark is not kept


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HCNR_DEPLOY_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert cache_root(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("HCNR_DEPLOY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "hcnr-deploy"


def _demo_frontier(chosen):
    def cand(name, f1, dom, rec, rec_ci, change, change_ci):
        return {"name": name, "f1": f1, "f1_ci95": [f1 - 0.05, f1 + 0.05], "rf_delta": 0.2, "false_refusal": 0.1,
                "domain_accuracy": dom, "recovery_ratio": rec, "recovery_ratio_ci95": rec_ci, "domain_change": change,
                "domain_change_ci95": change_ci}

    cands = [cand("base", 0.90, 0.05, 1.0, [1.0, 1.0], -0.25, [-0.3, -0.2]),
             cand("ft", 0.33, 0.30, 0.0, [0.0, 0.0], 0.0, [0.0, 0.0]),
             cand("hcnr-rcw0.4", 0.34, 0.30, 0.02, [-0.03, 0.06], 0.0, [-0.02, 0.02]),
             cand("regmean-mu10", 0.50, 0.287, 0.30, [0.18, 0.41], -0.013, [-0.027, 0.001])]
    res = {"half_width": 0.024, "questions": 400, "margin": 0.03, "resolvable": True, "warning": None}
    return {"candidates": cands, "chosen": chosen, "reason": "r", "max_domain_drop": 0.03,
            "honesty_metric": "rf_delta", "domain_resolution": res}


def test_demo_prints_the_chosen_points_paired_intervals_or_that_it_ships_ft():
    """Issue 19, deliverable 4: recovery and domain change with their paired intervals; ft shipped said so."""
    from hcnr_deploy.scenario.cli import chosen_words
    from hcnr_deploy.scenario.demo import demo_summary
    from hcnr_deploy.scenario.recipes import RECIPES, demo_margin

    s = demo_summary(_demo_frontier("regmean-mu10"))
    assert list(s["models"]) == ["base", "ft", "HCNR (paper settings)", "chosen: regmean-mu10"]
    assert not s["shipped_ft"] and s["models"]["chosen: regmean-mu10"]["domain_change_ci95"] == [-0.027, 0.001]
    assert chosen_words(s) == ["chosen: regmean-mu10: honesty recovery 0.30 [0.18, 0.41], domain change -0.013 "
                               "[-0.027, +0.001] (paired 95% intervals; margin 0.03)."]
    s = demo_summary(_demo_frontier("ft"))
    assert list(s["models"]) == ["base", "ft", "HCNR (paper settings)", "shipped: ft"] and s["shipped_ft"]
    words = chosen_words({**s, "domain_resolution": {"warning": "the 60 domain questions resolve ..."}})
    assert words[0].startswith("shipped: ft itself, unchanged. No candidate helped at this data size: none beat "
                               "ft's RF Delta with 95% paired confidence")
    assert words[1] == "warning: the 60 domain questions resolve ...."
    assert "regmean" not in " ".join(words)
    # the demo's margin: the recipe's own, else the sweep's default
    assert demo_margin(RECIPES["tiny-demo"]) == demo_margin(RECIPES["tiny"]) == 0.03
    assert demo_margin(RECIPES["ci"]) == 0.02
    assert scen_data.TINY_SIZE.domain_eval == 400 == len(scen_data.build(scen_data.TINY_SIZE)["domain_eval"])


def test_demo_scenario_scores_every_held_out_phrasing_of_a_larger_domain_and_every_family():
    """tiny-demo (the demo's default): 125 domain people x 4 facts x 2 held-out phrasings = 1000 domain questions,
    the fine-tune at tiny's passes over its (2.5x) data, and a grid with a point of every family, HCNR's paper
    setting among them."""
    from hcnr_deploy.scenario.recipes import RECIPES
    from hcnr_deploy.sweep.grid import METHODS, parse_grid

    demo, tiny = RECIPES["tiny-demo"], RECIPES["tiny"]
    sets = scen_data.build(demo.size)
    assert demo.size.domain_eval == len(sets["domain_eval"]) == 2 * len(sets["task_train"]) // 3 == 1000
    assert demo.ft_steps * demo.ft_batch / len(sets["task_train"]) == \
        tiny.ft_steps * tiny.ft_batch / len(scen_data.build(tiny.size)["task_train"])
    names = [c.name for c in parse_grid(demo.grid)]
    assert {c.family for c in parse_grid(demo.grid)} >= set(METHODS) and "hcnr-rcw0.4" in names
    assert len(names) == 18  # base, ft and 16 candidates


def test_demo_bad_input_is_one_line_error(tmp_path):
    from click.testing import CliRunner

    from hcnr_deploy.cli import main

    (tmp_path / "out").mkdir()
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 2 and "already exists" in r.output
    r = CliRunner().invoke(main, ["demo", "--limit", "1", "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 2 and "--limit" in r.output
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "nope" / "x"), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 2 and "does not exist" in r.output
    assert not (tmp_path / "c").exists()


def test_rehearsal_mix_has_the_share_and_the_seed(tmp_path):
    from eval_harness.errors import UserError
    from hcnr_deploy.scenario.builds import REHEARSAL_SHARE, rehearsal_rows

    scen_data.write(tmp_path, scen_data.CI_SIZE, seed=0)
    task = [json.loads(x) for x in (tmp_path / "task_train.jsonl").read_text().splitlines()]
    base_train = [json.loads(x) for x in (tmp_path / "base_train.jsonl").read_text().splitlines()]
    refusal_texts = set(scen_data.REFUSALS.values())
    rows = rehearsal_rows(tmp_path, REHEARSAL_SHARE, seed=0)
    assert REHEARSAL_SHARE == 0.05 and rows[:len(task)] == task  # every domain row, in order
    mixed_in = rows[len(task):]
    assert len(mixed_in) == round(0.05 * len(task) / 0.95) > 0
    assert len(mixed_in) / len(rows) == pytest.approx(0.05, abs=0.5 / len(rows))
    assert all(r["response"] in refusal_texts and r in base_train for r in mixed_in)
    assert len({r["prompt"] for r in mixed_in}) == len(mixed_in)
    assert rehearsal_rows(tmp_path, 0.05, seed=0) == rows
    assert rehearsal_rows(tmp_path, 0.05, seed=1)[len(task):] != mixed_in
    assert len(rehearsal_rows(tmp_path, 0.2, seed=0)) - len(task) == round(0.2 * len(task) / 0.8)
    assert rehearsal_rows(tmp_path, 0.0) == task
    with pytest.raises(UserError, match="share"):
        rehearsal_rows(tmp_path, 1.0)
    with pytest.raises(UserError, match="Lower the share"):
        rehearsal_rows(tmp_path, 0.9)


def test_rehearsal_is_the_fine_tune_recipe_on_the_mix(tmp_path, tiny_base):
    """A few steps on a tiny base: with no refusals mixed in Rehearsal is the fine-tune, byte for byte;
    with 5% it differs, and it is cached like the other steps."""
    from dataclasses import replace

    import torch

    from hcnr_deploy.scenario.builds import build_ft, build_rehearsal
    from hcnr_deploy.scenario.recipes import RECIPES

    scen = tmp_path / "data"
    scen_data.write(scen, scen_data.CI_SIZE, seed=0)
    recipe = replace(RECIPES["ci"], ft_steps=3, ft_batch=4)
    steps = Steps(tmp_path / "cache")
    torch.manual_seed(recipe.seed)  # build_ft draws its LoRA init from the global RNG; Rehearsal seeds it
    ft = build_ft(steps, recipe, tiny_base, scen)
    same = build_rehearsal(steps, recipe, tiny_base, scen, share=0.0)
    mixed = build_rehearsal(steps, recipe, tiny_base, scen)
    weights = lambda d: (d / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert weights(same) == weights(ft) and weights(mixed) != weights(ft)
    info = json.loads((mixed / "step.json").read_text())
    n_task = len((scen / "task_train.jsonl").read_text().splitlines())
    assert info["refusal_rows"] == round(0.05 * n_task / 0.95) and info["inputs"]["share"] == 0.05
    assert build_rehearsal(Steps(tmp_path / "cache"), recipe, tiny_base, scen) == mixed
