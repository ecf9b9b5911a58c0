"""The reproduction's figures: per seed (hcnr_deploy.sweep.candidate_figures, the validity checks of DESIGN.md
section 8, each family's best point), their means over the seeds, and the training baselines' points."""

from __future__ import annotations

import re

import numpy as np

from hcnr_deploy import sweep as F
from hcnr_deploy.scenario.builds import BASELINE_METHODS

from benchmarks.reproduction.build import ICL_SHOTS

# the repair variants (no training): the points a training baseline must beat; sft trains, so it is not one
TRAINING_FREE = ("hcnr", "random", "taskaware", "regmean", "scale", "no-task", "no-comp", "exact")
BASELINE_KEYS = ("icl", "rait", "rehearsal", "dpo", "orpo")  # reproduction.json's `baselines`
FAMILIES = ("hcnr", "random", "taskaware", "regmean", "scale", "lines", "sft")
VALIDITY_FIGURES = ("base_f1", "base_rf_delta", "ft_f1", "ft_domain", "rehearsal_f1", "rehearsal_domain")
PROBE_FIGURES = ("probe_auroc_ft", "probe_auroc_transfer", "probe_auroc_base")


def family_of(name: str) -> str:
    """The curve a reproduce name belongs to: its prefix before the first parameter suffix (`dpo-n160` -> dpo,
    `hcnr-rcw0.4` -> hcnr, `hcnr-rcw0.2-exact` -> hcnr, `sft-s32` -> sft); a name without one (base, ft, hcnr,
    icl, rehearsal, random, no-task, no-comp, exact) is its own family and a single point."""
    m = re.match(r"(.+?)-[a-z]+[0-9.]", name)
    return m.group(1) if m else name


def is_single_point(name: str) -> bool:
    """True for a name without a parameter suffix (drawn as its own marker, not on a curve)."""
    return family_of(name) == name


def seed_figures(res, benchmarks, seed) -> dict:
    """hcnr_deploy.sweep.candidate_figures for every model of the seed (F1, RF Delta, domain accuracy, recovery
    ratio and domain change against ft, with paired bootstrap intervals; metrics from eval_harness.metrics)."""
    names = list(res["results"])
    return F.candidate_figures(res, names, benchmarks, "domain", n_boot=1000, seed=seed)


def validity_of(figures, probe: dict, benchmarks, n_per_class: dict) -> dict:
    """DESIGN.md section 8's checks for one seed: eval_harness.metrics.separability on base / ft / Rehearsal (F1
    and RF Delta are means over `benchmarks`, the ones the verdict uses) and the probe's AUROC (best layer per
    benchmark, mean over the benchmarks) on the fine-tune and for the base's probe transferred to it."""
    from eval_harness.metrics import separability

    def fig(n):
        return {"f1": figures[n]["f1"], "rf_delta": figures[n]["rf_delta"],
                "domain_accuracy": figures[n]["domain_accuracy"]}

    v = separability(fig("base"), fig("ft"), fig("rehearsal"))
    conds = probe["conditions"]
    return {**{k: v[k] for k in VALIDITY_FIGURES if k in v},
            "probe_auroc_ft": conds["model"]["summary"]["mean_of_best_auroc"],
            "probe_auroc_transfer": conds["transfer"]["summary"]["mean_of_best_auroc"],
            "probe_auroc_base": conds["reference"]["summary"]["mean_of_best_auroc"],
            "separable": bool(v["separable"]), "discriminating": bool(v["discriminating"]),
            "rehearsal_recovery": v["rehearsal_recovery"], "checks": v["checks"], "reasons": v["reasons"],
            "benchmarks": list(benchmarks), "questions_per_class": n_per_class}


def average_validity(per_seed: dict) -> dict:
    """The seeds' mean of every figure, the verdict of separability on those means, and how many seeds pass."""
    from eval_harness.metrics import separability

    first = next(iter(per_seed.values()))
    mean = {k: float(np.mean([v[k] for v in per_seed.values()])) for k in (*VALIDITY_FIGURES, *PROBE_FIGURES)}
    v = separability({"f1": mean["base_f1"], "rf_delta": mean["base_rf_delta"]},
                     {"f1": mean["ft_f1"], "domain_accuracy": mean["ft_domain"]},
                     {"f1": mean["rehearsal_f1"], "domain_accuracy": mean["rehearsal_domain"]})
    return {**mean, "separable": bool(v["separable"]), "discriminating": bool(v["discriminating"]),
            "rehearsal_recovery": v["rehearsal_recovery"], "checks": v["checks"], "reasons": v["reasons"],
            "seeds_separable": sum(bool(s["separable"]) for s in per_seed.values()),
            "seeds_discriminating": sum(bool(s["discriminating"]) for s in per_seed.values()),
            "n_seeds": len(per_seed), "benchmarks": first["benchmarks"],
            "questions_per_class": first["questions_per_class"], "per_seed": per_seed}


def best_of_families(figures, max_domain_drop: float, honesty_metric: str = "rf_delta") -> dict:
    """Per candidate family (hcnr, random, taskaware, regmean, scale, lines, sft): hcnr_deploy.sweep.choose
    among ft and that family's points (the paired choice: a significant `honesty_metric` gain over ft, domain
    non-inferior at `max_domain_drop`, RF Delta not below ft's; ft itself when none qualifies)."""
    out = {}
    for fam in FAMILIES:
        names = [n for n in figures if n == fam or n.startswith(fam + "-")]
        if not names:
            continue
        cands = [{"name": n, **figures[n]} for n in ("ft", *names)]
        name, _ = F.choose(cands, max_domain_drop, honesty_metric)
        out[fam] = {"name": name, "f1": figures[name]["f1"], "domain_accuracy": figures[name]["domain_accuracy"],
                    "recovery_ratio": figures[name]["recovery_ratio"],
                    "recovery_ratio_ci95": figures[name]["recovery_ratio_ci95"]}
    return out


def recovery_of(figures, model="hcnr") -> dict:
    f = figures[model]
    return {k: f[k] for k in ("recovery_ratio", "recovery_ratio_ci95", "domain_change", "domain_change_ci95")}


def model_rows(figures, benchmarks) -> dict:
    rows = {}
    for m, f in figures.items():
        row = {b: {k: f["per_benchmark"][b][k] for k in ("f1", "rf_delta", "refusal_unanswerable",
                                                         "refusal_answerable")} for b in benchmarks}
        row["mean_f1"], row["mean_rf_delta"], row["domain_accuracy"] = f["f1"], f["rf_delta"], f["domain_accuracy"]
        rows[m] = row
    return rows


def average_rows(per_seed: list[dict]) -> dict:
    """Mean and std over the seeds that scored each model (sweep variants may run on fewer seeds)."""
    out = {}
    names = list(dict.fromkeys(m for rows in per_seed for m in rows))
    for m in names:
        have = [rows[m] for rows in per_seed if m in rows]

        def agg(get):
            vals = [get(r) for r in have]
            return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "per_seed": vals}

        out[m] = {"mean_f1": agg(lambda r: r["mean_f1"]), "mean_rf_delta": agg(lambda r: r["mean_rf_delta"]),
                  "domain_accuracy": agg(lambda r: r["domain_accuracy"]), "n_seeds": len(have)}
        for b in have[0]:
            if isinstance(have[0][b], dict) and "f1" in have[0][b]:
                out[m][b] = {k: agg(lambda r, b=b, k=k: r[b][k]) for k in ("f1", "rf_delta")}
    return out


def plane_candidates(plane: dict, names) -> list[dict]:
    """hcnr_deploy.sweep.plot_frontier's candidate dicts from the plane's means: {name, family, single, f1,
    domain_accuracy, pareto} (frontier.mark_pareto over all of them); each curve's points sorted by their parameter
    (a baseline's by data size, a sweep's by its value), single points after."""
    def param(n):
        m = re.search(r"-[a-z]+([0-9.]+)", n)
        try:
            return float(m.group(1).rstrip(".")) if m else 0.0
        except ValueError:
            return 0.0

    cands = [{"name": n, "family": family_of(n), "single": is_single_point(n), "f1": plane[n]["mean_f1"]["mean"],
              "domain_accuracy": plane[n]["domain_accuracy"]["mean"]} for n in names]
    cands.sort(key=lambda c: (c["single"], c["family"], param(c["name"])))
    F.mark_pareto(cands)
    return cands


def baselines_object(avg: dict, meta_per_seed: dict, icl_shots: int = ICL_SHOTS) -> dict:
    """reproduction.json's `baselines`: per key of BASELINE_KEYS (icl, rait, rehearsal, dpo, orpo) a list of
    points sorted by data size, each {name, data_size, f1, rf_delta, domain_accuracy, train_s, seconds, n_seeds,
    per_seed}: the means over the seeds that scored it (`avg`: average_rows) and, for the costs, over the seeds
    whose `meta_per_seed` (seed -> build_models' meta) has it. ICL: data size `icl_shots` exemplars, no training;
    Rehearsal: its refusal rows, train_s its whole step; rait / dpo / orpo: `{method}-n{size}`, their step.json's
    data_size and train_seconds."""
    def costs(name, get):
        vals = [get(m[name]) for m in meta_per_seed.values() if isinstance(m.get(name), dict)]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    def point(name, data_size, train_s, seconds):
        a = avg[name]
        return {"name": name, "data_size": data_size, "f1": a["mean_f1"]["mean"],
                "rf_delta": a["mean_rf_delta"]["mean"], "domain_accuracy": a["domain_accuracy"]["mean"],
                "train_s": train_s, "seconds": seconds, "n_seeds": a["n_seeds"],
                "per_seed": {k: a[key]["per_seed"] for k, key in (("f1", "mean_f1"), ("rf_delta", "mean_rf_delta"),
                                                                  ("domain_accuracy", "domain_accuracy"))}}

    out = {k: [] for k in BASELINE_KEYS}
    if "icl" in avg:
        out["icl"].append(point("icl", icl_shots, 0.0, 0.0))
    if "rehearsal" in avg:
        rows = costs("rehearsal", lambda m: m.get("refusal_rows"))
        sec = costs("rehearsal", lambda m: m.get("seconds"))
        out["rehearsal"].append(point("rehearsal", None if rows is None else int(rows), sec, sec))
    for name in avg:
        fam = family_of(name)
        if fam in BASELINE_METHODS and fam in out and name != fam:
            size = costs(name, lambda m: m.get("data_size"))
            size = int(size) if size is not None else int(name.rsplit("-n", 1)[1])
            out[fam].append(point(name, size, costs(name, lambda m: m.get("train_seconds")),
                                  costs(name, lambda m: m.get("seconds"))))
    for pts in out.values():
        pts.sort(key=lambda p: (p["data_size"] is None, p["data_size"] or 0))
    return out


def baselines_dominance(points: dict, baselines: dict) -> dict:
    """Does a baseline point dominate EVERY training-free point on the trade-off plane? `points`: name -> (mean F1,
    domain accuracy); `baselines`: baselines_object's shape (only the names are used). Training-free: the names
    whose family is in TRAINING_FREE (the repair variants; not sft). Dominates: F1 >= and domain accuracy >= each,
    one of them strictly. Returns {training_free, points: {name: {dominates_all, not_dominated}}, dominating}."""
    free = [n for n in points if family_of(n) in TRAINING_FREE]
    res = {}
    for pts in baselines.values():
        for p in pts:
            if p["name"] not in points:
                continue
            f1, acc = points[p["name"]]
            beaten = [t for t in free if f1 >= points[t][0] and acc >= points[t][1]
                      and (f1 > points[t][0] or acc > points[t][1])]
            res[p["name"]] = {"dominates_all": bool(free) and len(beaten) == len(free),
                              "not_dominated": [t for t in free if t not in beaten]}
    return {"training_free": free, "points": res, "dominating": [n for n, r in res.items() if r["dominates_all"]]}
