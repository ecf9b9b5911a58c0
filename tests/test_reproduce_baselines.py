"""benchmarks/reproduce.py's (benchmarks/reproduction's) reporting of the training baselines (RAIT, DPO, ORPO by data size, ICL, Rehearsal):
the CLI's parsing, the name -> family mapping, reproduction.json's `baselines` and `baselines_dominance`, Table 2's
rows, and the one trade-off figure (hcnr_deploy.sweep.plot_frontier). Hand-made numbers only."""

from __future__ import annotations

import pytest

from benchmarks.reproduction import aggregate as A
from benchmarks.reproduction import build as B
from benchmarks.reproduction import cli
from benchmarks.reproduction import markdown as M
from hcnr_deploy import sweep as F
from hcnr_deploy.scenario.builds import BASELINE_METHODS


def _avg(per_seed_points: list[dict]) -> dict:
    """average_rows over hand-made seeds: name -> (f1, domain accuracy)."""
    rows = [{n: {"kuq": {"f1": f1, "rf_delta": f1 / 2}, "mean_f1": f1, "mean_rf_delta": f1 / 2, "domain_accuracy": acc}
             for n, (f1, acc) in pts.items()} for pts in per_seed_points]
    return A.average_rows(rows)


def test_family_of_and_single_points():
    fam = {"dpo-n160": "dpo", "rait-n64": "rait", "orpo-n640": "orpo", "hcnr-rcw0.4": "hcnr", "scale-a0.6": "scale",
           "taskaware-mu3": "taskaware", "regmean-mu3": "regmean", "sft-s32": "sft", "random-rcw0.4": "random",
           "hcnr-rcw0.2-exact": "hcnr"}
    for name, family in fam.items():
        assert A.family_of(name) == family, name
        assert not A.is_single_point(name)
    for name in ("base", "ft", "hcnr", "icl", "rehearsal", "random", "no-task", "no-comp", "exact"):
        assert A.family_of(name) == name and A.is_single_point(name)


def test_baseline_methods_and_sizes_parse_or_name_the_valid_choices():
    methods = BASELINE_METHODS
    assert B.baseline_methods(",".join(methods)) == list(methods)
    assert B.baseline_methods("") == []
    assert B.baseline_methods(" DPO, dpo ,orpo") == ["dpo", "orpo"]
    assert "rait" not in B.baseline_methods("rait,dpo", no_rait=True)
    with pytest.raises(ValueError, match="unknown ppo; choose from " + ", ".join(methods)):
        B.baseline_methods("dpo,ppo")
    assert B.baseline_sizes_of("640,64,160,64") == [64, 160, 640]
    for bad in ("64,x", "0,64", ""):
        with pytest.raises(ValueError, match="--baseline-sizes"):
            B.baseline_sizes_of(bad)


def test_cli_rejects_an_unknown_baseline(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--baselines", "rait,sft"])
    assert e.value.code == 2
    assert "unknown sft; choose from rait, dpo, orpo" in capsys.readouterr().err


def _meta(train_scale: float) -> dict:
    def bl(method, size):
        return {"method": method, "data_size": size, "train_seconds": train_scale * size, "seconds": train_scale * size
                + 5, "examples": 4 * size, "steps": size // 4, "edited_fraction": 1.0}

    m = {f"{meth}-n{n}": bl(meth, n) for meth in ("rait", "dpo", "orpo") for n in (160, 64)}
    m["rehearsal"] = {"seconds": 100.0 * train_scale, "share": 0.05, "rows": 420, "refusal_rows": 21,
                      "edited_fraction": 1.0}
    m["hcnr"] = {"edited_fraction": 0.01, "seconds": 3.0}
    m["_variants_wall_s_this_run"] = 12.5
    return m


def test_baselines_object_points_by_data_size_with_seed_means():
    names = ["base", "ft", "icl", "rehearsal", "hcnr", "rait-n160", "rait-n64", "dpo-n160", "dpo-n64", "orpo-n64"]
    seed0 = {n: (0.1 * i / len(names), 0.5) for i, n in enumerate(names)}
    seed1 = {n: (f1 + 0.2, acc + 0.1) for n, (f1, acc) in seed0.items()}
    avg = _avg([seed0, seed1])
    out = A.baselines_object(avg, {0: _meta(1.0), 1: _meta(3.0)})
    assert set(out) == {"icl", "rait", "rehearsal", "dpo", "orpo"}
    assert [p["name"] for p in out["rait"]] == ["rait-n64", "rait-n160"]  # sorted by data size
    assert [p["data_size"] for p in out["dpo"]] == [64, 160]
    assert [p["name"] for p in out["orpo"]] == ["orpo-n64"]  # only the scored points
    p = out["dpo"][1]
    assert p["f1"] == pytest.approx(seed0["dpo-n160"][0] + 0.1)
    assert p["domain_accuracy"] == pytest.approx(0.55) and p["rf_delta"] == pytest.approx(p["f1"] / 2)
    assert p["train_s"] == pytest.approx(2.0 * 160) and p["seconds"] == pytest.approx(2.0 * 160 + 5)
    assert p["n_seeds"] == 2 and p["per_seed"]["f1"] == pytest.approx([seed0["dpo-n160"][0], seed1["dpo-n160"][0]])
    (icl,) = out["icl"]
    assert (icl["data_size"], icl["train_s"]) == (B.ICL_SHOTS, 0.0) and B.ICL_SHOTS == 4
    (reh,) = out["rehearsal"]
    assert reh["data_size"] == 21 and reh["train_s"] == pytest.approx(200.0)


def test_baselines_object_costs_from_the_seeds_that_built_them():
    avg = _avg([{"base": (0.5, 0.2), "ft": (0.1, 0.8), "rait-n64": (0.3, 0.7)}])
    meta1 = {k: v for k, v in _meta(2.0).items() if k != "rait-n64"}
    out = A.baselines_object(avg, {0: _meta(1.0), 1: meta1})
    assert out["rait"][0]["train_s"] == pytest.approx(64.0)  # seed 1 did not build it
    assert out["icl"] == [] and out["rehearsal"] == [] and out["dpo"] == []


def _bl(*names):
    return {"x": [{"name": n} for n in names]}


def test_dominance_of_every_training_free_point():
    pts = {"base": (0.9, 0.1), "ft": (0.2, 0.8), "sft-s32": (0.95, 0.95),  # neither is training-free
           "hcnr": (0.4, 0.7), "hcnr-rcw0.2": (0.3, 0.75), "scale-a0.6": (0.45, 0.6), "no-comp": (0.5, 0.5),
           "dpo-n640": (0.5, 0.75),   # >= on both against every one, strictly on one each
           "rait-n64": (0.6, 0.72),   # fails hcnr-rcw0.2 on domain accuracy
           "orpo-n64": (0.5, 0.5)}    # ties no-comp exactly: not domination
    dom = A.baselines_dominance(pts, _bl("dpo-n640", "rait-n64", "orpo-n64", "icl"))
    assert sorted(dom["training_free"]) == ["hcnr", "hcnr-rcw0.2", "no-comp", "scale-a0.6"]
    assert dom["dominating"] == ["dpo-n640"]
    assert dom["points"]["rait-n64"] == {"dominates_all": False, "not_dominated": ["hcnr-rcw0.2"]}
    assert dom["points"]["orpo-n64"]["not_dominated"] == ["hcnr", "hcnr-rcw0.2", "scale-a0.6", "no-comp"]
    assert "icl" not in dom["points"]  # not scored on the plane
    s = M.dominance_sentence(dom, pts)
    assert s.startswith("dpo-n640 (F1 0.500, domain 0.750) dominates every training-free point (4 repair variants)")


def test_no_dominance_and_no_training_free_points():
    pts = {"ft": (0.2, 0.8), "hcnr": (0.4, 0.7), "taskaware-mu3": (0.35, 0.78), "rehearsal": (0.38, 0.79),
           "icl": (0.5, 0.6)}
    dom = A.baselines_dominance(pts, _bl("rehearsal", "icl"))
    assert dom["dominating"] == [] and not dom["points"]["rehearsal"]["dominates_all"]
    assert dom["points"]["rehearsal"]["not_dominated"] == ["hcnr"]
    assert M.dominance_sentence(dom, pts).startswith("No baseline point dominates every training-free point")
    dom = A.baselines_dominance({"ft": (0.2, 0.8), "icl": (0.5, 0.9)}, _bl("icl"))
    assert dom["dominating"] == [] and dom["points"]["icl"]["dominates_all"] is False
    assert "No training-free point" in M.dominance_sentence(dom, {})


def test_table2_has_one_row_per_method_and_size():
    rows = M.table2_baseline_rows(_meta(1.0))
    order = [r.split("`")[1] for r in rows if "`" in r]
    assert order == ["rait-n64", "rait-n160", "dpo-n64", "dpo-n160", "orpo-n64", "orpo-n160"]
    dpo160 = next(r for r in rows if "`dpo-n160`" in r)
    assert "160 pairs, 640 seen in 40 steps" in dpo160 and "| 160.0 | 165.0 |" in dpo160
    assert any(r.startswith("| Rehearsal") and "420 rows (21 refusals)" in r for r in rows)
    assert rows[-1].startswith("| ICL (ft + 4 honesty exemplars)")
    assert all(r.count("|") == 6 for r in rows)  # Table 2's five columns


def test_plane_candidates_sort_curves_and_mark_single_points():
    names = ["base", "ft", "dpo-n640", "dpo-n64", "dpo-n160", "scale-a0.8", "scale-a0.2", "hcnr", "icl",
             "hcnr-rcw0.4", "hcnr-rcw0.1"]
    plane = _avg([{n: (0.01 * i, 0.9 - 0.01 * i) for i, n in enumerate(names)}])
    cands = A.plane_candidates(plane, names)
    by_fam = {}
    for c in cands:
        if not c["single"]:
            by_fam.setdefault(c["family"], []).append(c["name"])
    assert by_fam == {"dpo": ["dpo-n64", "dpo-n160", "dpo-n640"], "hcnr": ["hcnr-rcw0.1", "hcnr-rcw0.4"],
                      "scale": ["scale-a0.2", "scale-a0.8"]}
    singles = {c["name"] for c in cands if c["single"]}
    assert singles == {"base", "ft", "hcnr", "icl"}
    assert all(c["pareto"] for c in cands)  # F1 up, domain down along the names: every point on the frontier
    assert cands[-1]["single"]


def test_plot_frontier_draws_the_baselines_and_keeps_the_sweeps_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = ["base", "ft", "hcnr", "icl", "rehearsal", "rait-n64", "rait-n160", "dpo-n64", "orpo-n64",
             "taskaware-mu3", "hcnr-rcw0.4"]
    plane = _avg([{n: (0.05 * i, 0.8 - 0.03 * i) for i, n in enumerate(names)}])
    cands = A.plane_candidates(plane, names)
    seen = {}
    orig = plt.Axes.plot

    def spy(ax, *a, **k):
        assert k.get("label") not in seen  # one legend entry each
        seen[k.get("label")] = a
        return orig(ax, *a, **k)

    plt.Axes.plot = spy
    try:
        F.plot_frontier(cands, None, tmp_path / "tradeoff.png", "t")
    finally:
        plt.Axes.plot = orig
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert {"rait", "dpo", "orpo", "taskaware", "hcnr", "hcnr (default)", "icl", "rehearsal", "base", "ft"} <= set(seen)
    assert not any(str(k).startswith("chosen") for k in seen)  # chosen is optional
    assert list(seen["rait"][0]) == [plane["rait-n64"]["mean_f1"]["mean"], plane["rait-n160"]["mean_f1"]["mean"]]
    assert seen["hcnr"][0] == [plane["hcnr-rcw0.4"]["mean_f1"]["mean"]]  # the default hcnr is its own marker
    assert seen["hcnr (default)"][:2] == (plane["hcnr"]["mean_f1"]["mean"], plane["hcnr"]["domain_accuracy"]["mean"])
    assert F.STYLES["rait"] == ("x-", "C5") and F.STYLES["dpo"] == ("P-", "C8") and F.STYLES["orpo"] == ("*-", "C9")
    # the sweep's own call (chosen given, no single points) still draws its chosen ring
    sweep = [{"name": "base", "family": "base", "f1": 0.7, "domain_accuracy": 0.3},
             {"name": "ft", "family": "ft", "f1": 0.2, "domain_accuracy": 0.8},
             {"name": "hcnr-rcw0.4", "family": "hcnr", "f1": 0.4, "domain_accuracy": 0.7}]
    F.mark_pareto(sweep)
    F.plot_frontier(sweep, "hcnr-rcw0.4", tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 1000


def _validity():
    v = {k: 0.5 for k in (*A.VALIDITY_FIGURES, *A.PROBE_FIGURES)}
    return {**v, "base_f1": 0.7, "base_rf_delta": 0.5, "ft_f1": 0.2, "ft_domain": 0.8, "rehearsal_f1": 0.6,
            "rehearsal_domain": 0.79, "separable": True, "discriminating": True, "rehearsal_recovery": 0.8,
            "checks": {}, "reasons": [], "benchmarks": ["kuq"], "questions_per_class": {"kuq": [10, 10]}}


def test_finalize_reports_the_baselines_on_hand_made_seeds(tmp_path):
    import argparse
    import json

    pts = {"base": (0.7, 0.3), "ft": (0.2, 0.8), "hcnr": (0.4, 0.7), "random": (0.3, 0.6), "icl": (0.3, 0.75),
           "rehearsal": (0.6, 0.79), "scale-a0.6": (0.35, 0.5), "scale-a0.2": (0.25, 0.75),
           "random-rcw0.4": (0.3, 0.6), "random-rcw0.8": (0.45, 0.5), "rait-n64": (0.3, 0.78),
           "rait-n160": (0.5, 0.75), "dpo-n64": (0.35, 0.7), "dpo-n160": (0.45, 0.72), "orpo-n160": (0.3, 0.7)}
    rows = [{n: {"kuq": {"f1": f1 + d, "rf_delta": f1 / 2}, "mean_f1": f1 + d, "mean_rf_delta": f1 / 2,
                 "domain_accuracy": acc} for n, (f1, acc) in pts.items()} for d in (0.0, 0.02)]
    meta = {0: _meta(1.0), 1: _meta(1.0)}
    recov = {s: {"recovery_ratio": 0.4, "recovery_ratio_ci95": [0.3, 0.5], "domain_change": -0.1,
                 "domain_change_ci95": [-0.2, 0.0]} for s in (0, 1)}
    args = argparse.Namespace(seeds="0,1", model="tiny", limit=None, rcw_sweep="0.4,0.8", mu_sweep="", grid="",
                              scale_sweep="0.2,0.6", max_domain_drop=0.05, honesty_metric="rf_delta", num_samples=128,
                              seed_mode="train",
                              sweep_seeds=None)
    seeds_out = {"n_per_class": {"kuq": [10, 10]}, "n_domain": 20}
    cli.finalize(args, tmp_path, [0, 1], rows, recov, meta, seeds_out, ["kuq"], 0.0, "cmd", [0, 1],
                       {s: _validity() for s in (0, 1)}, {0: {}, 1: {}})
    summary = json.loads((tmp_path / "reproduction.json").read_text())
    assert [p["name"] for p in summary["baselines"]["rait"]] == ["rait-n64", "rait-n160"]
    assert summary["baselines"]["rait"][1]["f1"] == pytest.approx(0.51)
    assert summary["baselines_dominance"]["dominating"] == ["rait-n160", "rehearsal"]
    assert summary["baselines_dominance"]["seeds"] == [0, 1]
    assert "rait-n160" in summary["tradeoff_gaps"] and "dpo-n64" in summary["tradeoff_gaps"]
    md = (tmp_path / "reproduction.md").read_text()
    assert "| RAIT (160 rows) |" in md and "| DPO (160 pairs) |" in md and "| ORPO (160 pairs) |" in md
    assert "| RAIT (64 rows) |" not in md  # Table 1: the largest size only
    assert "`dpo-n64`" in md and "`orpo-n64`" in md  # Table 2: every size built
    assert "rait-n160 (F1 0.510, domain 0.750), rehearsal (F1 0.610, domain 0.790) dominate every training-free" in md
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
