"""Per-candidate figures from the eval harness's results: F1 / RF Delta per honesty benchmark and averaged, false
refusals, domain accuracy, recovery ratio and the paired changes against ft, each with its 95% interval; the
Pareto frontier; the gap to a reference curve. No model, no server: tested on hand-made numbers.

The metrics themselves (F1, RF Delta, accuracy, bootstrap, recovery ratio, Pareto frontier) come from
`eval_harness.metrics`, the one metrics module."""

from __future__ import annotations

import math

import numpy as np

from eval_harness import metrics as M


def _arrays(samples: list[dict]):
    refused = np.array([bool(s.get("verdict", {}).get("refused", False)) for s in samples], dtype=bool)
    unans = np.array([bool(s.get("unanswerable")) for s in samples], dtype=bool)
    return refused, unans


def _ci(reps) -> list | None:
    lo, hi = M.percentile_ci(reps)
    return None if math.isnan(lo) else [round(float(lo), 6), round(float(hi), 6)]


def _num(x):
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


def candidate_figures(results: dict, names: list[str], benchmarks: list[str], domain_task: str,
                      n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per candidate: F1 / RF Delta per honesty benchmark and averaged over them, the false-refusal rate (refusals
    on answerable questions, averaged likewise), domain accuracy, the recovery ratio, and the changes against ft
    (domain accuracy, F1 gain, RF Delta gain), each with a 95% percentile interval; the changes' are paired.

    `results`: the eval harness's results dict with `samples` (log_samples=True) for every name in `names`
    (which holds "base" and "ft"). Resamples are stratified by class and shared by all candidates (paired), per
    benchmark with the seed the harness's report uses; the average's replicates average the benchmarks'."""
    i_base, i_ft = names.index("base"), names.index("ft")
    f1_pts, f1_reps, rf_pts, rf_reps, fr_pts, fr_reps, per_bench = [], [], [], [], [], [], {}
    for b in benchmarks:
        arrs = [_arrays(results["samples"][n][b]) for n in names]
        refused = np.stack([a[0] for a in arrs])
        unans = arrs[0][1]
        point = M.honesty_arrays(refused, unans)
        reps = M.bootstrap_replicates(M.honesty_arrays, {"refused": refused, "unanswerable": unans}, unans,
                                      n_boot, M.stable_seed(seed, b))
        per_bench[b] = (point, reps)
        f1_pts.append(point["f1"]), f1_reps.append(reps["f1"])
        rf_pts.append(point["rf_delta"]), rf_reps.append(reps["rf_delta"])
        fr_pts.append(point["refusal_answerable"]), fr_reps.append(reps["refusal_answerable"])
    f1, f1_r = np.mean(f1_pts, axis=0), np.mean(f1_reps, axis=0)
    rf, rf_r = np.mean(rf_pts, axis=0), np.mean(rf_reps, axis=0)
    far, far_r = np.mean(fr_pts, axis=0), np.mean(fr_reps, axis=0)
    correct = np.array([[float(bool(s.get("correct"))) for s in results["samples"][n][domain_task]] for n in names],
                       dtype=np.float32)
    dom = M.accuracy_arrays(correct)["accuracy"]
    dom_r = M.bootstrap_replicates(M.accuracy_arrays, {"correct": correct}, np.zeros(correct.shape[1]), n_boot,
                                   M.stable_seed(seed, domain_task))["accuracy"]
    rec = M.recovery_ratio(f1, f1[i_base], f1[i_ft])
    rec_r = M.recovery_ratio(f1_r, f1_r[i_base], f1_r[i_ft])
    out = {}
    for i, n in enumerate(names):
        out[n] = {
            "f1": _num(f1[i]), "f1_ci95": _ci(f1_r[i]), "rf_delta": _num(rf[i]), "rf_delta_ci95": _ci(rf_r[i]),
            "per_benchmark": {b: {"f1": _num(p["f1"][i]), "f1_ci95": _ci(r["f1"][i]),
                                  "rf_delta": _num(p["rf_delta"][i]), "rf_delta_ci95": _ci(r["rf_delta"][i]),
                                  "refusal_unanswerable": _num(p["refusal_unanswerable"][i]),
                                  "refusal_answerable": _num(p["refusal_answerable"][i])}
                              for b, (p, r) in per_bench.items()},
            "domain_accuracy": _num(dom[i]), "domain_accuracy_ci95": _ci(dom_r[i]),
            "recovery_ratio": _num(rec[i]), "recovery_ratio_ci95": _ci(rec_r[i]),
            "domain_change": _num(dom[i] - dom[i_ft]), "domain_change_ci95": _ci(dom_r[i] - dom_r[i_ft]),
            "f1_gain": _num(f1[i] - f1[i_ft]), "f1_gain_ci95": _ci(f1_r[i] - f1_r[i_ft]),
            "rf_delta_gain": _num(rf[i] - rf[i_ft]), "rf_delta_gain_ci95": _ci(rf_r[i] - rf_r[i_ft]),
            "false_refusal": _num(far[i]), "false_refusal_ci95": _ci(far_r[i]),
        }
    return out


def mark_pareto(cands: list[dict]) -> None:
    """Set `pareto` on each candidate dict: on the frontier of (honesty F1, domain accuracy), both maximised."""
    mask = M.pareto_mask([c["f1"] for c in cands], [c["domain_accuracy"] for c in cands])
    for c, m in zip(cands, mask):
        c["pareto"] = bool(m)


def unanswerable_share(results: dict, name: str, benchmarks: list[str]) -> dict[str, float]:
    """Per honesty benchmark: the share of unanswerable questions (the same for every model scored on it)."""
    return {b: float(_arrays(results["samples"][name][b])[1].mean()) for b in benchmarks}


def curve_gap(points: list[tuple[float, float]], curve: list[tuple[float, float]]) -> list[float | None]:
    """For each (f1, acc) point: acc minus the curve's accuracy at the same F1 (linear interpolation; None outside
    the curve's F1 range). Positive: the point lies above the curve (e.g. HCNR against delta scaling)."""
    c = sorted(curve)
    xs, ys = [p[0] for p in c], [p[1] for p in c]
    return [None if not xs[0] <= f1 <= xs[-1] else float(acc - np.interp(f1, xs, ys)) for f1, acc in points]
