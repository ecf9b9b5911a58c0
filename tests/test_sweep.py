"""`hcnr-deploy sweep`: the grid, the figures, the choice and the table (unit tests on hand numbers), and one real
sweep on the tiny random models (real repairs, a real vLLM engine, the real eval harness) re-used by the end-to-end
assertions: frontier.json / .md / .png, chosen/ served by a real `hcnr-deploy serve`, resume after a kill."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from eval_harness import metrics as M
from eval_harness.errors import UserError
from hcnr_deploy import sweep as F
from hcnr_deploy.cli import main
from test_eval_data import make_data_dir, write_jsonl
from test_eval_e2e import settled_count
from test_repair_pipeline import write_calibration

GRID = "hcnr:r_cw=0.4; random:r_cw=0.4; regmean:mu=1"
FAST = ["--max-tokens", "8", "--bootstrap", "200", "--num-samples", "8", "--max-length", "48", "--quiet"]


# ---------------------------------------------------------------------------------------------- the grid


def test_every_method_of_the_default_grid_gives_candidates_its_options_model_accepts():
    """The default grid sweeps every grid method; each point is named for its family and values, its name's spec
    parses back to the same candidate, and its values are of the types the options models declare and accepted
    by them (a repair RepairOptions runs; the guard's GuardOptions)."""
    from hcnr_deploy.guard.options import GuardOptions
    from hcnr_deploy.options import RepairOptions
    from hcnr_deploy.sweep.grid import param_type

    cands = F.parse_grid(None)
    assert [c.name for c in cands[:2]] == ["base", "ft"] and len({c.name for c in cands}) == len(cands)
    assert {c.family for c in cands[2:]} == set(F.METHODS)
    for c in cands[2:]:
        assert c.name.startswith(c.family + "-") and c.params, c.name
        spec = c.family + "".join(f":{k}={v}" for k, v in c.params.items())
        assert F.parse_grid(spec)[2:] == [c]
        assert all(type(v) is param_type(c.family, k) for k, v in c.params.items()), c
        if c.family == "guard":
            GuardOptions(**c.params)
        else:
            assert RepairOptions(method=c.method, **c.repair_kwargs).method == F.METHODS[c.family][0]
    assert next(c for c in cands if c.family == "taskaware").repair_kwargs["compensation"] == "task-aware"
    assert next(c for c in cands if c.family == "random").repair_kwargs["selection"] == "random"


def test_grid_spec_aliases_products_and_duplicates():
    cands = F.parse_grid("hcnr:r_cw=0.1,0.4:compensation=obs,exact; regmean:mu=1,3; scale:a=0.5; "
                         "regmean:task_weight=1; base; hcnr")
    assert [c.name for c in cands] == ["base", "ft", "hcnr-rcw0.1-obs", "hcnr-rcw0.1-exact", "hcnr-rcw0.4-obs",
                                       "hcnr-rcw0.4-exact", "regmean-mu1", "regmean-mu3", "scale-a0.5", "hcnr"]
    assert cands[5].repair_kwargs == {"r_cw": 0.4, "compensation": "exact"}
    assert cands[7].repair_kwargs == {"task_weight": 3.0} and cands[-1].repair_kwargs == {}


@pytest.mark.parametrize("spec, words", [
    ("lora:r=8", "unknown method 'lora'"),
    ("hcnr:alpha=0.5", "hcnr has no parameter 'alpha'"),
    ("hcnr:r_cw=abc", "not a valid float"),
    ("hcnr:r_cw=1.5", "must be in (0, 1]"),
    ("scale:a=-1", "must be >= 0"),
    ("sft:steps=0", "must be at least 1"),
    ("sft:steps=2.5", "not a valid int"),
    ("hcnr:r_cw", "expected PARAM=V1,V2"),
    ("hcnr:r_cw=0.1:r_cw=0.2", "given twice"),
    ("hcnr:compensation=magic", "must be one of obs, exact, none, task-aware, got 'magic'"),
    ("sft:lr=0", "must be > 0, got 0.0"),          # the options model's check (the grid's own allowed lr=0)
    ("regmean:mu=inf", "must be >= 0, got inf"),
    ("lines:a=0.2:b=-0.5", "the last block's factor alpha + beta must be >= 0"),
    ("lines:b=nan", "must be a finite number"),
    ("taskaware:compensation=obs", "taskaware has no parameter 'compensation'"),
])
def test_bad_grid_is_a_one_line_error(spec, words):
    with pytest.raises(UserError) as e:
        F.parse_grid(spec)
    assert words in e.value.format_message() and "\n" not in e.value.format_message()


def test_grid_values_are_checked_by_the_options_model():
    """One source of truth: a grid value passes exactly when RepairOptions accepts it for that option (and the
    method's other options at their defaults: lines' beta=-1 leaves the last block's factor 0.5 - 1 < 0)."""
    from hcnr_deploy.options import RepairOptions, check_value

    def repair_accepts(family, key, value):
        try:
            RepairOptions(method=F.METHODS[family][0], **{**F.METHODS[family][1], key: value})
            return True
        except UserError:
            return False

    from hcnr_deploy.sweep.grid import param_type

    for family, (_, _, specs) in F.METHODS.items():
        if family == "guard":  # not a repair: GuardOptions checks it (test_guard_family.py)
            continue
        for key in specs:
            typ = param_type(family, key)
            for text in (["obs", "exact", "magic"] if typ is str else ["0", "-1", "0.5", "1", "1.5", "3", "nan"]):
                try:
                    value = typ(text)
                except ValueError:
                    continue
                accepted = check_value(key, value) is None and repair_accepts(family, key, value)
                try:
                    F.parse_grid(f"{family}:{key}={text}")
                    parsed = True
                except UserError:
                    parsed = False
                assert parsed == accepted, (family, key, text)


def test_bad_grid_on_the_command_line_exits_2_before_any_work(tiny_base, tiny_lora, tmp_path):
    hon, task = write_calibration(tmp_path)
    dom = write_jsonl(tmp_path / "dom.jsonl", [{"question": "q?", "answers": ["a"]}])
    r = CliRunner().invoke(main, ["sweep", "--base", str(tiny_base), "--finetuned", str(tiny_lora), "--honesty-data",
                                  str(hon), "--task-data", str(task), "--eval-honesty", str(dom), "--eval-domain",
                                  str(dom), "--out", str(tmp_path / "out"), "--grid", "hcnr:r_cw=2"])
    assert r.exit_code == 2 and "--grid hcnr:r_cw=2: must be in (0, 1]" in r.output
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- choice, figures


def _cand(name, f1, dom, ef=0.2):
    return {"name": name, "family": name.split("-")[0], "f1": f1, "domain_accuracy": dom, "edited_fraction": ef}


def _paired(name, f1, gain, dom, dom_change, rf=0.2, rf_gain=None, ef=0.2):
    """A candidate as candidate_figures writes it: F1 and its paired gain interval over ft, domain accuracy and
    the paired interval of its change, RF Delta (its gain interval `rf_gain`, else the F1 one)."""
    return {**_cand(name, f1, dom, ef), "rf_delta": rf, "f1_gain_ci95": gain,
            "rf_delta_gain_ci95": gain if rf_gain is None else rf_gain, "domain_change_ci95": dom_change}


def _ft():
    return _paired("ft", 0.329, [0.0, 0.0], 0.300, [0.0, 0.0], rf=0.2, ef=0.0)


def test_a_candidate_tied_with_ft_is_not_chosen_and_ft_is_shipped():
    """issue 19's demo: hcnr-rcw0.1 tied ft's F1 (gain interval across 0) with a domain accuracy 0.003 above."""
    cands = [_paired("base", 0.90, [0.5, 0.6], 0.05, [-0.28, -0.22], rf=0.8, ef=1.0), _ft(),
             _paired("hcnr-rcw0.1", 0.329, [-0.02, 0.02], 0.303, [-0.027, 0.033])]
    for metric in ("f1", "rf_delta"):
        name, reason = F.choose(cands, 0.02, metric)
        assert name == "ft"
        assert reason.startswith("no candidate helped at this data size, so ft itself is shipped: of 2 candidates, "
                                 "1 beat ft's")  # base beats it, far outside the margin
        assert "0 of those kept domain accuracy non-inferior at the 0.02 margin" in reason


def test_a_significant_gain_within_the_margin_is_chosen_and_one_crossing_it_is_not():
    ft = _ft()
    regmean = _paired("regmean-mu10", 0.501, [0.10, 0.25], 0.287, [-0.018, 0.008])  # lower bound inside 0.02
    scale = _paired("scale-a0.4", 0.600, [0.15, 0.40], 0.280, [-0.045, 0.004])     # crosses the margin
    cands = [ft, scale, regmean]
    name, reason = F.choose(cands, 0.02, "f1")
    assert name == "regmean-mu10"
    assert reason.startswith("highest honesty F1 (0.501; ft 0.329, paired 95% interval of the gain [+0.100, "
                             "+0.250]) among the 1 of 2 candidates")
    assert F.choose(cands, 0.05, "f1")[0] == "scale-a0.4"  # a wider margin admits it, and its F1 is higher
    assert F.choose(cands, 0.01, "f1")[0] == "ft"  # regmean's interval crosses a 0.01 margin too
    assert F.choose(cands, 0.018, "f1")[0] == "regmean-mu10"  # exactly at the margin passes


def test_a_candidate_below_fts_rf_delta_is_never_chosen():
    """F1 bought by refusing more: the F1 gain is significant, RF Delta fell below ft's."""
    refuser = _paired("sft-s64", 0.70, [0.2, 0.5], 0.30, [-0.01, 0.01], rf=0.15, rf_gain=[-0.12, 0.02])
    honest = _paired("regmean-mu3", 0.45, [0.05, 0.2], 0.30, [-0.01, 0.01], rf=0.35, rf_gain=[0.05, 0.25])
    cands = [_ft(), refuser, honest]
    assert F.choose(cands, 0.02, "f1")[0] == "regmean-mu3"
    assert F.choose(cands, 0.02, "rf_delta")[0] == "regmean-mu3"
    assert F.choose([_ft(), refuser], 0.02, "f1")[0] == "ft"
    # the metric ranks: RF Delta prefers the larger discrimination, F1 the larger F1
    wide = _paired("scale-a0.6", 0.55, [0.1, 0.3], 0.30, [-0.01, 0.01], rf=0.30, rf_gain=[0.02, 0.18])
    assert F.choose([_ft(), honest, wide], 0.02, "f1")[0] == "scale-a0.6"
    assert F.choose([_ft(), honest, wide], 0.02, "rf_delta")[0] == "regmean-mu3"
    with pytest.raises(ValueError, match="honesty metric 'acc'"):
        F.choose(cands, 0.02, "acc")


def test_choice_ties_go_to_domain_then_the_smaller_edit_then_the_order():
    a = _paired("hcnr-a", 0.5, [0.1, 0.2], 0.30, [-0.01, 0.01], ef=0.2)
    b = _paired("hcnr-b", 0.5, [0.1, 0.2], 0.30, [-0.01, 0.01], ef=0.1)
    c = _paired("hcnr-c", 0.5, [0.1, 0.2], 0.31, [-0.01, 0.02], ef=0.5)
    assert F.choose([_ft(), a, b], 0.02, "f1")[0] == "hcnr-b"
    assert F.choose([_ft(), a, b, c], 0.02, "f1")[0] == "hcnr-c"
    assert F.choose([_ft(), a, dict(a, name="hcnr-a2")], 0.02, "f1")[0] == "hcnr-a"


def test_domain_resolution_warns_when_the_margin_is_below_it():
    from hcnr_deploy.sweep import choice as C

    cands = [_paired("base", 0.9, [0.5, 0.6], 0.05, [-0.30, -0.20]), _ft(),
             _paired("a", 0.4, [0, 0.1], 0.30, [-0.03, 0.03]), _paired("b", 0.4, [0, 0.1], 0.29, [-0.04, 0.02]),
             _paired("c", 0.4, [0, 0.1], 0.28, [-0.06, 0.02])]  # half-widths 0.03, 0.03, 0.04: median 0.03
    res = C.domain_resolution(cands, 0.02, 300)
    assert res["half_width"] == pytest.approx(0.03) and res["candidates"] == 3 and res["resolvable"] is False
    assert res["questions_needed"] == 675  # 300 x (0.03 / 0.02)^2
    assert "the 300 domain questions resolve a domain change to +/-0.030" in res["warning"]
    assert "about 675 domain questions would resolve it" in res["warning"]
    ok = C.domain_resolution(cands, 0.03, 300)
    assert ok["resolvable"] is True and ok["warning"] is None and ok["questions_needed"] is None
    zero = C.domain_resolution(cands, 0.0, 300)
    assert zero["resolvable"] is False and "no domain set resolves a zero margin" in zero["warning"]
    # every candidate answers the 200 domain questions as ft does: [0, 0], yet 3/200 is what 200 questions show
    same = [cands[0], _ft()] + [_paired(n, 0.4, [0, 0.1], 0.30, [0.0, 0.0]) for n in "ab"]
    floor = C.domain_resolution(same, 0.01, 200)
    assert floor["median_half_width"] == 0 and floor["half_width"] == pytest.approx(0.015)
    assert floor["resolvable"] is False and floor["questions_needed"] == 300  # 3 / 0.01
    assert "resolve a domain change to +/-0.015 (3/200, the rule of three" in floor["warning"]
    assert C.domain_resolution(same, 0.02, 200)["resolvable"] is True
    assert res["basis"] == "median paired 95% half-width over 3 candidates" and res["rule_of_three"] == 0.01
    only_refs = C.domain_resolution(cands[:2], 0.02, 300)  # no edit candidate: base's interval
    assert only_refs["half_width"] == pytest.approx(0.05) and only_refs["candidates"] == 1
    frontier = {"candidates": cands, "chosen": "ft", "reason": F.choose(cands, 0.02, "f1")[1],
                "always_refuse": C.always_refuse({"kuq": 0.5}), "domain_resolution": res}
    lines = C.summary_lines(frontier)
    assert lines[0].startswith("shipped: ft itself, unchanged: no candidate helped at this data size")
    assert "always-refuse reference: F1 0.667 (2p/(1+p)), RF Delta +0.000, false refusals 1.000." in lines
    assert lines[-1].startswith("warning: the 300 domain questions resolve")


def test_always_refuse_scores_2p_over_1_plus_p_averaged_over_benchmarks():
    from hcnr_deploy.sweep import choice as C

    ref = C.always_refuse({"kuq": 0.5, "nec": 0.25})
    assert ref["f1"] == pytest.approx((2 / 3 + 0.4) / 2, abs=1e-6)
    assert ref["rf_delta"] == 0.0 and ref["false_refusal"] == 1.0
    # the metrics module agrees: refusing every question of a set with unanswerable share p
    unans = np.array([True] * 5 + [False] * 15)
    assert M.f1_score(np.ones(20, bool), unans) == pytest.approx(C.always_refuse({"x": 0.25})["f1"], abs=1e-6)


def test_pareto_and_recovery_in_the_metrics_module():
    assert M.pareto_mask([0.1, 0.5, 0.3, 0.5, 0.2], [0.9, 0.1, 0.05, 0.1, 0.9]).tolist() == [False, True, False,
                                                                                              True, True]
    assert M.recovery_ratio([0.65, 0.3], 1.0, 0.3).tolist() == pytest.approx([0.5, 0.0])
    assert np.isnan(M.recovery_ratio(0.5, 0.4, 0.4))
    cands = [_cand("a", 0.1, 0.9), _cand("b", 0.5, 0.1), _cand("c", 0.3, 0.05)]
    F.mark_pareto(cands)
    assert [c["pareto"] for c in cands] == [True, True, False]


def _samples(refused, unans):
    return [{"verdict": {"refused": bool(r)}, "unanswerable": bool(u)} for r, u in zip(refused, unans)]


def test_candidate_figures_against_the_metrics_by_hand():
    rng = np.random.default_rng(0)
    unans = {"kuq": rng.random(40) < 0.5, "nec": rng.random(30) < 0.4}
    names = ["base", "ft", "x"]
    refused = {n: {b: rng.random(len(u)) < p for b, u in unans.items()} for n, p in zip(names, (0.9, 0.1, 0.5))}
    correct = {n: rng.random(25) < p for n, p in zip(names, (0.1, 0.6, 0.5))}
    results = {"samples": {n: {**{b: _samples(refused[n][b], unans[b]) for b in unans},
                               "dom": [{"correct": bool(c)} for c in correct[n]]} for n in names}}
    figs = F.candidate_figures(results, names, ["kuq", "nec"], "dom", n_boot=300, seed=0)
    for n in names:
        f1s = [M.f1_score(refused[n][b], unans[b]) for b in unans]
        assert figs[n]["f1"] == pytest.approx(np.mean(f1s), abs=1e-6)
        assert figs[n]["per_benchmark"]["nec"]["rf_delta"] == pytest.approx(M.rf_delta(refused[n]["nec"],
                                                                                       unans["nec"]), abs=1e-6)
        assert figs[n]["domain_accuracy"] == pytest.approx(correct[n].mean(), abs=1e-6)
        lo, hi = figs[n]["f1_ci95"]
        assert lo <= figs[n]["f1"] <= hi
    x, base, ft = figs["x"], figs["base"], figs["ft"]
    assert x["recovery_ratio"] == pytest.approx((x["f1"] - ft["f1"]) / (base["f1"] - ft["f1"]), abs=1e-5)
    assert ft["recovery_ratio"] == 0 and base["recovery_ratio"] == pytest.approx(1)
    assert x["domain_change"] == pytest.approx(x["domain_accuracy"] - ft["domain_accuracy"], abs=1e-6)
    assert x["recovery_ratio_ci95"][0] <= x["recovery_ratio"] <= x["recovery_ratio_ci95"][1]
    # paired gains over ft, the false-refusal rate (refusals of answerable questions, averaged over benchmarks)
    assert x["f1_gain"] == pytest.approx(x["f1"] - ft["f1"], abs=1e-5)
    assert x["rf_delta_gain"] == pytest.approx(x["rf_delta"] - ft["rf_delta"], abs=1e-5)
    assert ft["f1_gain_ci95"] == [0, 0] and ft["rf_delta_gain_ci95"] == [0, 0] and ft["domain_change_ci95"] == [0, 0]
    fr = np.mean([refused["x"][b][~unans[b]].mean() for b in unans])
    assert x["false_refusal"] == pytest.approx(fr, abs=1e-6)
    for k in ("f1_gain", "rf_delta_gain", "false_refusal"):
        assert x[f"{k}_ci95"][0] <= x[k] <= x[f"{k}_ci95"][1], k
    # paired: the gain's interval is not the difference of the two marginal intervals
    assert x["f1_gain_ci95"] != [round(x["f1_ci95"][0] - ft["f1_ci95"][0], 6),
                                 round(x["f1_ci95"][1] - ft["f1_ci95"][1], 6)]
    shares = F.unanswerable_share(results, "x", ["kuq", "nec"])
    assert shares == {b: pytest.approx(unans[b].mean()) for b in unans}
    # same inputs and seed, same figures
    assert F.candidate_figures(results, names, ["kuq", "nec"], "dom", n_boot=300, seed=0) == figs


def test_frontier_table_is_readable_at_80_columns():
    from rich.console import Console

    cands = []
    for i, name in enumerate(["base", "ft", "hcnr-rcw0.1", "random-rcw0.4", "regmean-mu0.3", "regmean-mu10",
                              "scale-a0.8", "sft-s64", "hcnr-rcw0.4-task-aware"]):
        cands.append({**_cand(name, 0.1 * i, 0.3 - 0.01 * i, 0.2), "f1_ci95": [0.05 * i, 0.1 * i + 0.05],
                      "rf_delta": -0.5 + 0.1 * i, "domain_accuracy_ci95": [0.2, 0.35], "domain_change": -0.01 * i,
                      "false_refusal": 0.05 * i})
    cands.append({**cands[-1], "name": "lines-a0.8-b-0.6"})
    F.mark_pareto(cands)
    console = Console(width=80, record=True, color_system=None)
    console.print(F.rich_table(cands, "scale-a0.8", reference={"f1": 2 / 3, "rf_delta": 0.0, "false_refusal": 1.0}))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text
    for c in cands:  # one row per candidate, every number whole
        row = next(line for line in lines if line.strip().startswith(c["name"] + " "))
        assert f"{c['f1']:.3f}" in row and f"{c['domain_accuracy']:.3f}" in row
        assert f" {c['false_refusal']:.2f} ".replace("0.", ".") in row
    assert "<" in next(line for line in lines if line.strip().startswith("scale-a0.8 "))
    ref = next(line for line in lines if line.strip().startswith("always-refuse "))
    assert "0.667" in ref and "+.000" in ref and "1.00" in ref


# ---------------------------------------------------------------------------------------------- input checks


def _kuq_rows(n, seed=0, prefix="Which river does"):
    rng = random.Random(seed)
    words = ["amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "iris", "juniper"]
    rows = []
    for i in range(n):
        who = " ".join(rng.choice(words) for _ in range(3))
        rows.append({"question": f"{prefix} {who} cross {i}?", "answer": None if i % 2 else [rng.choice(words)],
                     "unknown": bool(i % 2), "source": "test", "category": "test"})
    return rows


def test_overlap_with_the_calibration_data_is_an_error(tiny_base, tiny_lora, tmp_path):
    from hcnr_deploy.sweep import run_sweep

    hon, task = write_calibration(tmp_path)
    prompts = [json.loads(line)["prompt"] for line in task.read_text().splitlines()][:3]
    rows = _kuq_rows(10) + [{"question": p.upper(), "answer": ["x"], "unknown": False} for p in prompts]
    kuq = write_jsonl(tmp_path / "kuq.jsonl", rows)
    dom = write_jsonl(tmp_path / "dom.jsonl", [{"question": "Where is the harbor?", "answers": ["north"]}])
    with pytest.raises(UserError) as e:
        run_sweep(tiny_base, tiny_lora, hon, task, kuq, dom, tmp_path / "out", grid="hcnr",
                  repair_options={"num_samples": 10, "max_length": 48}, progress=False)
    msg = e.value.format_message()
    assert msg.startswith("3 evaluation question(s) also appear in the calibration data (3 in kuq")
    assert not (tmp_path / "out").exists()


def test_scoring_length_is_the_longest_prompt_through_the_chat_template(tiny_base, tmp_path):
    """The sweep's default --max-model-len comes from the longest question as it is sent (the chat template's
    turn around it), plus --max-tokens, under the model's own limit (config.json: 2048 for the tiny model)."""
    from hcnr_deploy.serve.plan import scoring_max_model_len
    from hcnr_deploy.sweep.inputs import context_limit, eval_tasks, longest_prompt_tokens

    dom = write_jsonl(tmp_path / "dom.jsonl", [{"question": "Where is the harbor?", "answers": ["north"]}])
    short = write_jsonl(tmp_path / "short.jsonl", _kuq_rows(4))
    long = write_jsonl(tmp_path / "long.jsonl", _kuq_rows(4) + [{"question": "x " * 300 + "?", "answer": ["y"],
                                                                 "unknown": False}])
    n_short = longest_prompt_tokens(eval_tasks(short, dom, None, None, 0, tmp_path / "a")[0], tiny_base)
    n_long = longest_prompt_tokens(eval_tasks(long, dom, None, None, 0, tmp_path / "b")[0], tiny_base)
    assert 10 < n_short < 100
    assert 300 < n_long <= 2 * 301 + 20  # each " x" one or two byte-level tokens, plus the template's turn
    assert context_limit(tiny_base) == 2048
    assert scoring_max_model_len(n_long, 64, [], context_limit(tiny_base)) in (512, 768)
    assert scoring_max_model_len(n_short, 64, [], 2048) == 256


def test_a_failed_write_of_a_sweep_file_keeps_the_old_one_and_leaves_no_temporary(tmp_path, monkeypatch):
    """sweep.json and frontier.json are written as eval_harness.atomic writes every file: the old content or the
    new, never half, and nothing left beside them when the write fails."""
    from hcnr_deploy.sweep.workdir import write_json

    path = tmp_path / "sweep.json"
    write_json(path, {"a": 1})

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["sweep.json"]


def test_unfinished_dir_with_other_settings_is_refused(tiny_base, tiny_lora, tmp_path):
    from hcnr_deploy.sweep import prepare_dir

    out = tmp_path / "out"
    assert prepare_dir(out, {"a": 1}, overwrite=False) is False
    assert prepare_dir(out, {"a": 1}, overwrite=False) is True
    with pytest.raises(UserError, match=r"other settings \(a differ\)"):
        prepare_dir(out, {"a": 2}, overwrite=False)
    (out / "frontier.json").write_text("{}")
    with pytest.raises(UserError, match="finished sweep"):
        prepare_dir(out, {"a": 1}, overwrite=False)
    assert prepare_dir(out, {"a": 2}, overwrite=True) is False and not (out / "frontier.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="holds no sweep"):
        prepare_dir(other, {"a": 1}, overwrite=False)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def sweep_inputs(tiny_base, tiny_lora, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    hon, task = write_calibration(root)
    data = make_data_dir(root / "data")
    dom = write_jsonl(root / "domain.jsonl", [
        {"question": "Largest organ of the body?", "answers": ["skin"]},
        {"question": "Normal adult body temperature in Celsius?", "answers": ["37"]},
        {"question": "Which is a vitamin?", "choices": ["C", "Q", "Z"], "answer": 0},
        {"question": "Which organ pumps blood?", "choices": ["liver", "heart"], "answer": "B"}])
    args = ["--base", str(tiny_base), "--finetuned", str(tiny_lora), "--honesty-data", str(hon), "--task-data",
            str(task), "--eval-domain", str(dom), "--grid", GRID, *FAST]
    return dict(root=root, data=data, dom=dom, args=args, hon=hon, task=task)


@pytest.fixture(scope="module")
def swept(sweep_inputs):
    """One real sweep: 3 repairs of the tiny LoRA, base + ft + 3 adapters on one vLLM engine, 5 benchmarks."""
    from hcnr_deploy.serve import free_port

    out = sweep_inputs["root"] / "out"
    r = CliRunner().invoke(main, ["sweep", *sweep_inputs["args"], "--eval-honesty", str(sweep_inputs["data"]),
                                  "--out", str(out), "--port", str(free_port()), "--",
                                  "--dtype", "float32", "--max-model-len", "512", "--enforce-eager"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out, r.output, json.loads((out / "frontier.json").read_text())


@pytest.mark.vllm
def test_sweep_writes_its_recipe_and_lm_eval_results(swept, sweep_inputs):
    import yaml

    out, _, fr = swept
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["grid"] == GRID and recipe["eval_honesty"] == str(sweep_inputs["data"]) and "out" not in recipe
    assert recipe["vllm_args"] == ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]
    for c in fr["candidates"]:
        lm = json.loads((out / "lm-eval" / c["name"] / "results_hcnr-deploy.json").read_text())
        assert lm["model_name"] == c["name"] and set(lm["results"]) >= set(fr["honesty_benchmarks"])
        assert lm["results"]["nec"]["f1,none"] == pytest.approx(c["per_benchmark"]["nec"]["f1"], abs=1e-5)
        assert lm["chat_template_sha"]  # the candidates' folders are readable here
        assert (out / "lm-eval" / c["name"] / "samples_nec_hcnr-deploy.jsonl").is_file()


@pytest.mark.vllm
def test_frontier_json_schema_and_contents(swept):
    out, stdout, fr = swept
    assert fr["schema"] == "hcnr-deploy.sweep/1"
    assert [c["name"] for c in fr["candidates"]] == ["base", "ft", "hcnr-rcw0.4", "random-rcw0.4", "regmean-mu1"]
    assert fr["honesty_benchmarks"] == ["selfaware", "kuq", "falseqa", "nec", "refunq"]
    for c in fr["candidates"]:
        for k in ("name", "method", "params", "f1", "f1_ci95", "rf_delta", "rf_delta_ci95", "per_benchmark",
                  "domain_accuracy", "domain_accuracy_ci95", "edited_fraction", "artifact", "pareto",
                  "recovery_ratio", "domain_change", "domain_change_ci95", "f1_gain", "f1_gain_ci95",
                  "rf_delta_gain", "rf_delta_gain_ci95", "false_refusal", "false_refusal_ci95"):
            assert k in c, (c["name"], k)
        assert set(c["per_benchmark"]) == set(fr["honesty_benchmarks"])
        assert c["f1"] == pytest.approx(np.mean([b["f1"] for b in c["per_benchmark"].values()]), abs=1e-5)
        assert 0 <= c["domain_accuracy"] <= 1 and Path(c["artifact"]).exists()
    by = {c["name"]: c for c in fr["candidates"]}
    assert by["hcnr-rcw0.4"]["method"] == "hcnr" and by["random-rcw0.4"]["params"]["selection"] == "random"
    assert by["regmean-mu1"]["method"] == "regmean" and by["ft"]["edited_fraction"] == 0.0
    assert 0 < by["hcnr-rcw0.4"]["edited_fraction"] < 1
    for name in ("hcnr-rcw0.4", "random-rcw0.4", "regmean-mu1"):
        assert Path(by[name]["artifact"]) == out / "candidates" / name
        assert (out / "candidates" / name / "adapter_model.safetensors").is_file()
    assert any(c["pareto"] for c in fr["candidates"])
    assert fr["questions"] == {"selfaware": 3, "kuq": 2, "falseqa": 2, "nec": 2, "refunq": 3, "domain": 4}
    assert set(fr["timings_s"]) >= {"candidates", "serve", "eval", "frontier", "total", "statistics"}
    assert fr["run"]["built"] == ["hcnr-rcw0.4", "random-rcw0.4", "regmean-mu1"] and not fr["run"]["resumed"]
    assert fr["versions"]["hcnr-deploy"] and fr["settings"]["grid"] == GRID
    assert fr["honesty_metric"] == "rf_delta" == fr["settings"]["honesty_metric"] and fr["max_domain_drop"] == 0.02
    shares = fr["always_refuse"]["unanswerable_share"]
    assert set(shares) == set(fr["honesty_benchmarks"])
    for b, p in shares.items():  # a share of this benchmark's questions, unanswerable ones in it
        assert 0 < p < 1 and abs(p * fr["questions"][b] - round(p * fr["questions"][b])) < 1e-4
    assert fr["always_refuse"]["f1"] == pytest.approx(np.mean([2 * p / (1 + p) for p in shares.values()]), abs=1e-5)
    assert fr["always_refuse"]["rf_delta"] == 0 and fr["always_refuse"]["false_refusal"] == 1
    res = fr["domain_resolution"]
    assert res["questions"] == 4 and res["candidates"] == 3 and res["margin"] == 0.02
    median = np.median([(c["domain_change_ci95"][1] - c["domain_change_ci95"][0]) / 2 for c in fr["candidates"][2:]])
    assert res["median_half_width"] == pytest.approx(median, abs=1e-6)
    assert res["half_width"] == pytest.approx(max(median, 3 / 4), abs=1e-6)  # 4 questions: the rule of three
    # the terminal: the table and the chosen point
    for name in by:
        assert name in stdout
    assert ("chosen: " + fr["chosen"] if fr["chosen"] != "ft" else "shipped: ft itself") in stdout
    assert "always-refuse" in stdout and "domain resolution: " in stdout and "FR" in stdout
    if not res["resolvable"]:  # 4 domain questions resolve nothing: the warning, with the questions it would take
        assert f"about {res['questions_needed']} domain questions would resolve it" in " ".join(stdout.split())
    md = (out / "frontier.md").read_text()
    assert "| candidate |" in md and all(f"| {n} |" in md for n in by)


@pytest.mark.vllm
def test_choice_respects_the_constraint_end_to_end(swept):
    out, _, fr = swept
    by = {c["name"]: c for c in fr["candidates"]}
    m, metric = fr["max_domain_drop"], fr["honesty_metric"]
    ok = [c for c in fr["candidates"] if c["name"] != "ft" and c[f"{metric}_gain_ci95"][0] > 0
          and c["domain_change_ci95"][0] >= -m - 1e-12 and c["rf_delta"] >= by["ft"]["rf_delta"] - 1e-12]
    label = {"f1": "honesty F1", "rf_delta": "RF Delta"}[metric]
    if ok:
        best = by[fr["chosen"]]
        assert best[metric] == max(c[metric] for c in ok)
        assert fr["reason"].startswith(f"highest {label} ({best[metric]:.3f}; ft {by['ft'][metric]:.3f}, paired 95% "
                                       f"interval of the gain [{best[f'{metric}_gain_ci95'][0]:+.3f}, ")
        assert f"among the {len(ok)} of {len(fr['candidates']) - 1} candidates" in fr["reason"]
    else:  # a handful of questions: nothing is significant, ft is shipped; the counts in the reason are the rows'
        others = [c for c in fr["candidates"] if c["name"] != "ft"]
        gain = [c for c in others if c[f"{metric}_gain_ci95"][0] > 0]
        dom = [c for c in gain if c["domain_change_ci95"][0] >= -m - 1e-12]
        assert fr["chosen"] == "ft"
        assert fr["reason"] == (f"no candidate helped at this data size, so ft itself is shipped: of {len(others)} "
                                f"candidates, {len(gain)} beat ft's {label} with 95% paired confidence, {len(dom)} of "
                                f"those kept domain accuracy non-inferior at the {m:g} margin and 0 of those kept RF "
                                f"Delta at least ft's")


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.vllm
def test_png_plots_the_points_of_frontier_json(swept, tmp_path):
    """frontier.png is 7 x 5 inches at 120 dpi, and it is exactly the plot of frontier.json's points: drawn again
    from them it is the same bytes, and moving one point changes them."""
    out, _, fr = swept
    png = (out / "frontier.png").read_bytes()
    assert _png_size(png) == (840, 600)
    title = f"{Path(fr['settings']['finetuned']).name}: domain accuracy vs honesty F1 ({', '.join(fr['honesty_benchmarks'])})"
    F.plot_frontier(fr["candidates"], fr["chosen"], tmp_path / "again.png", title)
    assert (tmp_path / "again.png").read_bytes() == png
    moved = [dict(c, f1=c["f1"] + 0.05) if c["name"] == "regmean-mu1" else c for c in fr["candidates"]]
    F.plot_frontier(moved, fr["chosen"], tmp_path / "moved.png", title)
    assert (tmp_path / "moved.png").read_bytes() != png


@pytest.fixture(scope="module")
def served(swept, tiny_base, tiny_lora, tmp_path_factory):
    """`hcnr-deploy serve` (a real subprocess) with chosen/ and every candidate of the sweep, under their names."""
    from hcnr_deploy.serve import free_port

    out, _, fr = swept
    port = free_port()
    adapters = ["--adapter", f"chosen={out / 'chosen'}"] if (out / "chosen" / "adapter_config.json").exists() else []
    for c in fr["candidates"]:
        if c["name"] != "base":
            adapters += ["--adapter", f"{c['name']}={c['artifact']}"]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "hcnr_deploy.cli", "serve", "--base", str(tiny_base),
                                 *adapters, "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
                                 "--", "--enforce-eager", "--seed", "0"], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and "smoke check passed" not in log.read_text():
        time.sleep(1)
    assert proc.poll() is None, log.read_text()[-3000:]
    try:
        yield type("S", (), {"port": port, "base_url": f"http://127.0.0.1:{port}/v1", "log": log})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def _complete(url, model):
    req = urllib.request.Request(f"{url}/completions", data=json.dumps(
        {"model": model, "prompt": "Question: Who wrote Hamlet?\nAnswer:", "max_tokens": 8, "temperature": 0,
         "logprobs": 0}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["choices"][0]


@pytest.mark.vllm
def test_chosen_is_served_by_hcnr_deploy_serve(swept, served):
    out, _, fr = swept
    assert (out / "chosen" / "adapter_config.json").is_file(), "every candidate here, ft too, is an adapter"
    # chosen/ is a byte copy of the chosen candidate's artifact, and the server answers with it as that candidate
    src = Path(next(c["artifact"] for c in fr["candidates"] if c["name"] == fr["chosen"]))
    assert (out / "chosen" / "adapter_model.safetensors").read_bytes() == \
        (src / "adapter_model.safetensors").read_bytes()
    card = (out / "chosen" / "README.md").read_text()
    assert f"`{fr['chosen']}`" in card and fr["reason"] in card
    a, b = _complete(served.base_url, "chosen"), _complete(served.base_url, fr["chosen"])
    assert a["text"] == b["text"] and a["logprobs"]["token_logprobs"] == b["logprobs"]["token_logprobs"]


def _rows(cache: Path) -> int:
    if not cache.exists():
        return 0
    with sqlite3.connect(cache) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


@pytest.mark.vllm
def test_resume_after_a_kill_rebuilds_nothing_finished_and_sends_only_missing_requests(swept, served,
                                                                                      sweep_inputs):
    """Against the served candidates (--endpoint): kill the sweep mid-eval, drop one candidate folder, leave a
    half-written one; the rerun rebuilds only the dropped one and the server sees only the missing requests."""
    out1, _, fr1 = swept
    root = sweep_inputs["root"]
    kuq = write_jsonl(root / "kuq-big.jsonl", _kuq_rows(120, seed=3))
    out = root / "resumed"
    args = ["sweep", *sweep_inputs["args"], "--eval-honesty", str(kuq), "--out", str(out), "--endpoint",
            served.base_url]
    proc = subprocess.Popen([sys.executable, "-m", "hcnr_deploy.cli", *args, "--concurrency", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    cache = out / "eval-cache.sqlite"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and _rows(cache) < 40:
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not (out / "frontier.json").exists()
    before = settled_count(served)
    kept = _rows(cache)
    total = 5 * (120 + 4)
    assert 40 <= kept < total
    names = ["hcnr-rcw0.4", "random-rcw0.4", "regmean-mu1"]
    # the candidates are the module sweep's, byte for byte (same inputs, same seed): the server serves them
    for n in names:
        assert (out / "candidates" / n / "adapter_model.safetensors").read_bytes() == \
            (out1 / "candidates" / n / "adapter_model.safetensors").read_bytes()
    import shutil

    shutil.rmtree(out / "candidates" / "random-rcw0.4")
    (out / "candidates" / ".random-rcw0.4.tmp-dead").mkdir()  # what a kill mid-write leaves
    stamps = {n: (out / "candidates" / n / "report.json").stat().st_mtime_ns for n in names if n != "random-rcw0.4"}
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    fr = json.loads((out / "frontier.json").read_text())
    assert fr["run"]["resumed"] and fr["run"]["built"] == ["random-rcw0.4"]
    assert sorted(fr["run"]["reused"]) == ["hcnr-rcw0.4", "regmean-mu1"]
    for n, t in stamps.items():
        assert (out / "candidates" / n / "report.json").stat().st_mtime_ns == t
    assert not list((out / "candidates").glob(".*tmp*"))
    assert settled_count(served) - before == total - kept
    assert fr["run"]["requests"][0]["sent"] == total - kept
    # a finished sweep is not rerun without --overwrite
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "finished sweep" in again.output


@pytest.mark.vllm
def test_full_fine_tune_sweep_serves_each_checkpoint_for_real(tiny_base, tmp_path):
    """A full fine-tune: base, ft and one candidate checkpoint (scale-a0.5, a full model, built after base and ft
    were scored) each served by a real vLLM server of its own, one after another on the same port, at the --max-model-len derived from the longest prompt
    (none after --), every question answered by each, the chosen checkpoint copied to chosen/."""
    from hcnr_deploy.serve import free_port
    from hcnr_deploy.tiny import perturbed_copy

    full = perturbed_copy(tiny_base, tmp_path / "full", scale=0.03, seed=2)
    hon, task = write_calibration(tmp_path)
    kuq = write_jsonl(tmp_path / "kuq.jsonl", _kuq_rows(4, seed=5))
    dom = write_jsonl(tmp_path / "domain.jsonl", [{"question": "Which organ pumps blood?", "answers": ["heart"]},
                                                  {"question": "Largest organ of the body?", "answers": ["skin"]}])
    out, port = tmp_path / "out", free_port()
    r = CliRunner().invoke(main, ["sweep", "--base", str(tiny_base), "--finetuned", str(full), "--honesty-data",
                                  str(hon), "--task-data", str(task), "--eval-honesty", str(kuq), "--eval-domain",
                                  str(dom), "--grid", "scale:a=0.5", "--out", str(out), "--port", str(port),
                                  "--serve-dtype", "float32", *FAST, "--", "--enforce-eager", "--seed", "0"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    fr = json.loads((out / "frontier.json").read_text())
    names = ["base", "ft", "scale-a0.5"]
    assert fr["settings"]["finetune_kind"] == "full" and [c["name"] for c in fr["candidates"]] == names
    # built, served, scored, then deleted unless chosen (sweep/bounded.py); its record stays
    cand = out / "candidates" / "scale-a0.5"
    assert json.loads((out / "scored" / "scale-a0.5.json").read_text())["report"]["format"] == "checkpoint"
    assert cand.is_dir() == (fr["chosen"] == "scale-a0.5") and fr["run"]["one_at_a_time"]
    # one server per model, all on --port: each started after the previous one stopped
    assert sorted(p.name for p in (out / "logs").glob("vllm-*.log")) == [f"vllm-{n}-{port}.log" for n in names]
    for n in names:  # the derived length: the longest prompt + --max-tokens 8, rounded up to 256
        assert "max_seq_len=256," in (out / "logs" / f"vllm-{n}-{port}.log").read_text()
    samples = json.loads((out / "eval-samples.json").read_text())
    for n in names:
        answered = samples[n]["kuq"] + samples[n][fr["domain_task"]]
        assert len(answered) == 6 and all("error" not in s and s["finish_reason"] for s in answered), n
    src = Path(next(c["artifact"] for c in fr["candidates"] if c["name"] == fr["chosen"]))
    weights = sorted(f.name for f in src.glob("*.safetensors"))
    assert weights and all((out / "chosen" / w).read_bytes() == (src / w).read_bytes() for w in weights)


def test_chosen_copy_is_atomic_and_carries_a_card(tmp_path):
    from hcnr_deploy.sweep.report import copy_artifact, write_card

    src = tmp_path / "ft"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    cands = [{**_cand("base", 0.9, 0.0, 1.0), "f1_ci95": None, "rf_delta": 0.8, "domain_accuracy_ci95": None,
              "domain_change": -0.3, "pareto": True},
             {**_cand("ft", 0.3, 0.3, 0.0), "f1_ci95": None, "rf_delta": 0.1, "domain_accuracy_ci95": None,
              "domain_change": 0.0, "pareto": True}]
    frontier = {"candidates": cands, "chosen": "ft", "reason": "highest honesty F1 (0.300) among the 1 of 2",
                "settings": {"finetuned": "my-ft", "base": "my-base"}}
    copy_artifact(src, tmp_path / "chosen", lambda t: write_card(t, None, cands[1], {}, 0.01, frontier))
    card = (tmp_path / "chosen" / "README.md").read_text()
    assert "`my-ft`" in card and "highest honesty F1" in card and "| ft |" in card
    assert (tmp_path / "chosen" / "adapter_config.json").read_text() == "{}"
    (src / "README.md").write_text("the team's own card")

    def boom(t):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        copy_artifact(src, tmp_path / "chosen", boom)
    assert (tmp_path / "chosen" / "README.md").read_text() == card  # the old chosen/ untouched
    assert not list(tmp_path.glob(".chosen.tmp-*"))
    copy_artifact(src, tmp_path / "chosen", lambda t: write_card(t, None, cands[1], {}, 0.01, frontier))
    mine = (tmp_path / "chosen" / "README.md").read_text()
    assert mine.startswith("the team's own card\n\n## ft, chosen by hcnr-deploy sweep") and mine.endswith(card)
    assert (src / "README.md").read_text() == "the team's own card"


@pytest.mark.vllm
def test_build_only_then_a_scoring_rerun_builds_nothing_twice(swept, served, sweep_inputs):
    """Issue 20: --build-only builds every candidate, serves and scores nothing, and writes an unscored
    frontier.json; the same command without it reuses every candidate (none rebuilt) and scores them."""
    out = sweep_inputs["root"] / "build-only"
    args = ["sweep", *sweep_inputs["args"], "--eval-honesty", str(sweep_inputs["data"]), "--out", str(out),
            "--endpoint", served.base_url]
    names = ["hcnr-rcw0.4", "random-rcw0.4", "regmean-mu1"]
    before = settled_count(served)
    r = CliRunner().invoke(main, [*args, "--build-only"], catch_exceptions=False)
    assert r.exit_code == 0 and "built 5 candidates" in r.output, r.output
    fr = json.loads((out / "frontier.json").read_text())
    assert fr["unscored"] and fr["chosen"] is None and fr["run"]["built"] == names
    assert [c["name"] for c in fr["candidates"]] == ["base", "ft", *names]
    assert settled_count(served) == before and not (out / "chosen").exists()  # nothing sent, nothing chosen
    stamps = {n: (out / "candidates" / n / "report.json").stat().st_mtime_ns for n in names}
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    fr = json.loads((out / "frontier.json").read_text())
    assert "unscored" not in fr and fr["run"]["built"] == [] and sorted(fr["run"]["reused"]) == names
    assert fr["chosen"] and (out / "chosen").is_dir() and settled_count(served) > before
    assert stamps == {n: (out / "candidates" / n / "report.json").stat().st_mtime_ns for n in names}
