"""benchmarks/guard_seeds.py: each family's pick per seed and its mean over the seeds that scored it."""

from __future__ import annotations

import json

from benchmarks import guard_seeds as G


def point(name, family, rf, dom_lo, rec):
    return {"name": name, "family": family, "f1": 0.5, "rf_delta": rf, "rf_delta_ci95": [rf - 0.05, rf + 0.05],
            "false_refusal": 0.1, "domain_change": dom_lo / 2, "domain_change_ci95": [dom_lo, 0.0],
            "recovery_ratio": rec, "recovery_ratio_ci95": [rec - 0.1, rec + 0.1]}


def summary(seed, extra=()):
    pts = [point("base", "base", 0.4, -0.6, 1.0), point("ft", "ft", 0.3, 0.0, 0.0),
           point("guard-fr0.02", "guard", 0.8, 0.0, 1.5), point("guard-fr0.1", "guard", 0.9, -0.05, 1.8),
           *extra]
    return {"seed": seed, "points": pts, "chosen": "guard-fr0.02"}


def test_family_pick_is_the_best_non_inferior_point_and_means_name_the_seeds_scored(tmp_path):
    s0 = summary(0, [point("scale-a0.8", "scale", 0.35, -0.01, 0.4)])
    s1 = summary(1)
    f = tmp_path / "guard_frontier.json"
    f.write_text(json.dumps(s0))
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "summary.json").write_text(json.dumps(s1))
    loaded = [G.load(f), G.load(tmp_path / "seed1")]
    assert [s["seed"] for s in loaded] == [0, 1]
    text = G.table(loaded, margin=0.02)
    # fr0.1 has the higher RF Delta but crosses the margin: fr0.02 is the guard's pick on both seeds
    assert "| 0 | guard | guard-fr0.02 * |" in text and "| 1 | guard | guard-fr0.02 * |" in text
    assert "- guard: 1.50 (2/2 seeds non-inferior)" in text
    assert "- scale: 0.40 (1/1 seeds non-inferior; scored on 1 of 2 seeds)" in text
