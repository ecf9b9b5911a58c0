"""`python benchmarks/reproduce.py`: the arguments, then per seed build, score, probe and aggregate; after every
seed reproduction.md / .json and tradeoff.png are rewritten (a stopped run keeps what it finished)."""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from eval_harness.env import cache_root
from hcnr_deploy import sweep as F
from hcnr_deploy.scenario import realdata
from hcnr_deploy.scenario.builds import BASELINE_METHODS
from hcnr_deploy.scenario.cache import Steps
from hcnr_deploy.scenario.recipes import RECIPES

from benchmarks import reproduction
from benchmarks.machine import machine
from benchmarks.reproduction.aggregate import (average_rows, average_validity, baselines_dominance, baselines_object,
                                               best_of_families, model_rows, plane_candidates, recovery_of,
                                               seed_figures, validity_of)
from benchmarks.reproduction.build import (HONESTY, TABLE_VARIANTS, baseline_methods, baseline_sizes_of,
                                           build_models, evaluate_seed, probe_seed)
from benchmarks.reproduction.markdown import write_report

REPO = Path(__file__).resolve().parents[2]

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
    ap = argparse.ArgumentParser(description=reproduction.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(RECIPES), default="smollm2")
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
                    help="the sweep's candidates added beside the variants above (hcnr_deploy.sweep's --grid "
                         "format; '' for none; default: the sweep's default grid)")
    ap.add_argument("--max-domain-drop", type=float, default=0.05,
                    help="the per-method best point of the report: the most honest within this of ft's domain "
                         "accuracy (absolute; hcnr_deploy.sweep.choose)")
    ap.add_argument("--honesty-metric", choices=("f1", "rf_delta"), default="rf_delta",
                    help="what a per-method best point must improve over ft with 95%% paired confidence "
                         "(hcnr_deploy.sweep.choice; default rf_delta: F1 can be bought by refusing more)")
    ap.add_argument("--baselines", default=",".join(BASELINE_METHODS),
                    help=f"comma-separated training baselines from {', '.join(BASELINE_METHODS)} ('' for none; "
                         "default: all)")
    ap.add_argument("--baseline-sizes", default=None,
                    help="comma-separated refusal-data sizes for each baseline (default: the recipe's, "
                         "builds.baseline_sizes)")
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
    ap.add_argument("--cache-dir", default=str(cache_root()))
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
    if args.data_dir and isinstance(RECIPES[args.model].size, realdata.RealSize):
        ap.error(f"--data-dir: the {args.model} base was trained on part of the real benchmarks; leave --data-dir "
                 "out to score the held-out part its data step wrote")

    from rich.console import Console

    console = Console(stderr=True)
    started = time.time()
    command = " ".join(["python", "benchmarks/reproduce.py", *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(Path(args.cache_dir), console=console)
    seeds = [int(s) for s in args.seeds.split(",")]
    sweep_seeds = seeds if args.sweep_seeds is None else [int(s) for s in args.sweep_seeds.split(",") if s.strip()]
    per_seed_rows, recov, meta, seeds_out, validity, best = [], {}, {}, {}, {}, {}
    for seed in seeds:
        recipe = RECIPES[args.model]
        recipe = recipe.with_seed(seed) if args.seed_mode == "train" else replace(recipe, calib_draw=seed)
        recipe = replace(recipe, num_samples=args.num_samples)
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
