"""The honesty guard's frontier beside the weight edits, on a scenario whose validity is checked (DESIGN.md section 8).

For one recipe and training seed: the scenario's base, fine-tune and Rehearsal (cached steps), then
`hcnr-deploy sweep` (hcnr_deploy.sweep.run_sweep) with the given grid, the guard family included (its thresholds
set on held-out calibration questions only), then Rehearsal scored on the same questions with the same cache,
`hcnr-deploy probe` on the fine-tune (base transferred), and a summary: every point's honesty F1, RF Delta and
false-refusal rate with paired 95% intervals against ft, domain accuracy and its paired change, the validity gates.

    python benchmarks/guard_frontier.py --recipe tiny --seed 0 --out benchmarks/results/guard/tiny-seed0
    python benchmarks/guard_frontier.py --recipe smollm2-rc --seed 0 --per-class 300 \
        --out benchmarks/results/guard/smollm2-rc-seed0            # SelfAware 300 + 300, calibration: validation/
    python benchmarks/guard_frontier.py --recipe smollm2-rc --seed 0 --benchmarks falseqa,nec,refunq \
        --per-class 100 --grid 'guard:fr=0.02,0.05,0.1' --out benchmarks/results/guard/smollm2-rc-transfer

With smollm2-rc the guard is calibrated on the scenario's `validation/` part (SelfAware only unless
--calibration-benchmarks says otherwise) and scored on a balanced, seeded draw of its `heldout/` part.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from hcnr_deploy import sweep as F  # noqa: E402
from eval_harness.env import cache_root  # noqa: E402
from hcnr_deploy.scenario import realdata  # noqa: E402
from hcnr_deploy.scenario.builds import REHEARSAL_SHARE, build_base, build_data, build_ft, build_rehearsal  # noqa: E402
from hcnr_deploy.scenario.cache import Steps  # noqa: E402
from hcnr_deploy.scenario.recipes import RECIPES, demo_margin, repair_options  # noqa: E402


def balanced_selfaware(src: Path, dst: Path, per_class: int, seed: int) -> Path:
    """dst/selfaware/SelfAware.json: per_class answerable + per_class unanswerable items of src's, seeded."""
    items = json.loads((src / "selfaware" / "SelfAware.json").read_text())["example"]
    rng = random.Random(seed)
    keep = []
    for cls in (True, False):
        group = [i for i, it in enumerate(items) if bool(it["answerable"]) == cls]
        keep += rng.sample(group, min(per_class, len(group)))
    (dst / "selfaware").mkdir(parents=True, exist_ok=True)
    (dst / "selfaware" / "SelfAware.json").write_text(json.dumps({"example": [items[i] for i in sorted(keep)]}))
    return dst


def eval_honesty(args, recipe, scen: Path, out: Path) -> tuple[Path, str | None, int | None]:
    """(folder or file, benchmarks, limit) of the held-out honesty questions."""
    if not isinstance(recipe.size, realdata.RealSize):
        return scen / "kuq" / "knowns_unknowns.jsonl", None, None
    if args.benchmarks == "selfaware":
        return balanced_selfaware(scen / "heldout", out / "eval-data", args.per_class, args.seed), "selfaware", None
    return scen / "heldout", args.benchmarks, 2 * args.per_class


def score_rehearsal(sweep_out: Path, base: Path, rehearsal: Path, frontier: dict, max_tokens: int, console) -> dict:
    """Rehearsal's samples on the sweep's questions (same data folder, limit and cache)."""
    from eval_harness import evaluate
    from hcnr_deploy.serve import free_port, serve_models

    from hcnr_deploy.sweep import eval_tasks

    s = frontier["settings"]
    seed = s["repair_options"].get("seed", 0)
    _, data_dir, _ = eval_tasks(Path(s["eval_honesty"]), Path(s["eval_domain"]), s["benchmarks"], s["limit"], seed,
                                sweep_out)
    with serve_models(base, {"rehearsal": rehearsal}, port=free_port(), max_model_len=1024, dtype="float32",
                      log_dir=sweep_out / "logs", timeout=1200) as servers:
        return evaluate(servers[0].base_url, models=["rehearsal"], benchmarks=frontier["honesty_benchmarks"],
                        data_dir=data_dir, domain=[Path(s["eval_domain"])], limit=s["limit"], seed=seed,
                        max_tokens=max_tokens, cache=sweep_out / "eval-cache.sqlite", console=console, progress=True,
                        log_samples=True, n_boot=200, concurrency=s["concurrency"])


def validity(fig: dict, probe: dict) -> dict:
    from eval_harness.metrics import separability

    def pick(n):  # a model not scored (Rehearsal with --no-rehearsal) fails its gates as NaN
        return {k: fig[n][k] for k in ("f1", "rf_delta", "domain_accuracy")} if n in fig else {}

    v = separability(pick("base"), pick("ft"), pick("rehearsal"))
    conds = probe["conditions"]
    return {"discriminating": v["discriminating"], "separable": v["separable"], "reasons": v["reasons"],
            "rehearsal_recovery": v["rehearsal_recovery"], "checks": v["checks"],
            "probe_auroc_ft": conds["model"]["summary"]["mean_of_best_auroc"],
            "probe_auroc_transfer": conds["transfer"]["summary"]["mean_of_best_auroc"]}


def false_refusal(row: dict) -> float | None:
    vals = [b["refusal_answerable"] for b in row["per_benchmark"].values() if b["refusal_answerable"] is not None]
    return round(sum(vals) / len(vals), 6) if vals else None


def summary_md(summary: dict) -> str:
    v = summary["validity"]
    lines = [f"# Guard frontier: {summary['recipe']}, training seed {summary['seed']}", "",
             f"Honesty: {', '.join(summary['honesty_benchmarks'])} ({json.dumps(summary['questions'])}); "
             "95% paired bootstrap intervals; FR = refusals on answerable questions (false refusals).", "",
             "| point | family | F1 [95%] | RF Δ [95%] | FR | domain [95%] | Δdomain [95%] | recovery [95%] |",
             "|---|---|---|---|---|---|---|---|"]

    def iv(ci):
        return "" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]"

    for r in summary["points"]:
        rec = "" if r["recovery_ratio"] is None else f"{r['recovery_ratio']:.2f}{iv(r['recovery_ratio_ci95'])}"
        lines.append(f"| {r['name']} | {r['family']} | {r['f1']:.3f}{iv(r['f1_ci95'])} | "
                     f"{r['rf_delta']:+.3f}{iv(r['rf_delta_ci95'])} | {r['false_refusal']:.3f} | "
                     f"{r['domain_accuracy']:.3f}{iv(r['domain_accuracy_ci95'])} | "
                     f"{r['domain_change']:+.3f}{iv(r['domain_change_ci95'])} | {rec} |")
    lines += ["", f"Validity (DESIGN.md section 8): discriminating {v['discriminating']}, separable {v['separable']}"
                  f" (Rehearsal recovers {v['rehearsal_recovery']:.2f}); probe AUROC on ft "
                  f"{v['probe_auroc_ft']:.3f}, base's probe transferred {v['probe_auroc_transfer']:.3f}."
                  + (" Failed: " + "; ".join(v["reasons"]) + "." if v["reasons"] else "")
              + ("" if summary["rehearsal_scored"] else " Rehearsal was not scored in this run (--no-rehearsal): "
                 "the separability gate is unchecked here, not failed."), "",
              f"The sweep chose `{summary['chosen']}`: {summary['reason']}.", "",
              "Guard points (thresholds from held-out calibration questions): "
              + "; ".join(f"{n}: block {g['block']}, held-out calibration AUROC {g['calibration_auroc']:.3f}, "
                          f"calibration FR {g['false_refusal_calibration']:.3f}" for n, g in summary["guards"].items()),
              "", f"Machine: {summary['machine']}. Wall time {summary['seconds']:.0f} s.", "",
              "```", summary["command"], "```", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="tiny")
    ap.add_argument("--seed", type=int, default=0, help="training seed of the scenario")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--grid", default=None, help="the sweep's --grid (default: the sweep's default grid)")
    ap.add_argument("--benchmarks", default="selfaware", help="smollm2-rc: honesty benchmarks of heldout/ to score")
    ap.add_argument("--per-class", type=int, default=300, help="smollm2-rc: held-out questions per class")
    ap.add_argument("--calibration-benchmarks", default="selfaware", help="smollm2-rc: benchmarks of validation/")
    ap.add_argument("--max-domain-drop", type=float, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--no-rehearsal", action="store_true")
    args = ap.parse_args(argv)

    from rich.console import Console

    from machine import machine
    from hcnr_deploy.probe.run import run_probe
    from hcnr_deploy.sweep import run_sweep

    t0 = time.time()
    console = Console(stderr=True)
    recipe = RECIPES[args.recipe].with_seed(args.seed)
    steps = Steps(cache_root(args.cache_dir), console=console)
    scen = build_data(steps, recipe)
    base = build_base(steps, recipe, scen, console)
    ft = build_ft(steps, recipe, base, scen, console)
    args.out.mkdir(parents=True, exist_ok=True)
    honesty, benchmarks, limit = eval_honesty(args, recipe, scen, args.out)
    real = isinstance(recipe.size, realdata.RealSize)
    guard_options = ({"calibration_dir": str(scen / "validation"),
                      "calibration_benchmarks": args.calibration_benchmarks} if real else {})
    sweep_out = args.out / "sweep"
    (sweep_out / "frontier.json").unlink(missing_ok=True)  # a rerun resumes: finished candidates and answers reused
    extra = {"max_domain_drop": demo_margin(recipe) if args.max_domain_drop is None else args.max_domain_drop}
    frontier = run_sweep(base, ft, scen / "honesty_calib.jsonl", scen / "task_calib.jsonl", honesty,
                         scen / "domain.jsonl", sweep_out, grid=args.grid, benchmarks=benchmarks, limit=limit,
                         max_tokens=recipe.max_tokens, serve_dtype="float32", max_model_len=1024,
                         repair_options={**repair_options(recipe)}, guard_options=guard_options, console=console,
                         progress=True, **extra)
    rows = frontier["candidates"]
    names = frontier["honesty_benchmarks"]
    results = {"samples": {}}
    fig_rows = {r["name"]: r for r in rows}
    if not args.no_rehearsal:
        rehearsal = build_rehearsal(steps, recipe, base, scen, console, share=REHEARSAL_SHARE)
        reh = score_rehearsal(sweep_out, base, rehearsal, frontier, recipe.max_tokens, console)
        samples = json.loads((sweep_out / "eval-samples.json").read_text())
        samples["rehearsal"] = reh["samples"]["rehearsal"]
        results["samples"] = samples
        order = [*samples]
        figs = F.candidate_figures(results, order, names, frontier["domain_task"], 1000, 0)
        fig_rows = {n: {**fig_rows.get(n, {"name": n, "family": "rehearsal"}), **figs[n]} for n in order}
    probe = run_probe(str(ft), args.out / "probe", reference=str(base), base=str(base),
                      data_dir=honesty if Path(honesty).is_dir() else scen,
                      benchmarks=",".join(names), limit=limit, seed=0, device="cpu", dtype="float32",
                      overwrite=True, progress=True, console=console)
    points = [{"name": n, "family": r["family"], **{k: r[k] for k in (
        "f1", "f1_ci95", "rf_delta", "rf_delta_ci95", "domain_accuracy", "domain_accuracy_ci95", "domain_change",
        "domain_change_ci95", "recovery_ratio", "recovery_ratio_ci95", "per_benchmark")}, "false_refusal":
        false_refusal(r), "params": r.get("params", {})} for n, r in fig_rows.items()]
    summary = {"recipe": args.recipe, "seed": args.seed, "honesty_benchmarks": names,
               "questions": frontier["questions"], "points": points,
               "validity": validity(fig_rows, probe), "rehearsal_scored": "rehearsal" in fig_rows,
               "chosen": frontier["chosen"], "reason": frontier["reason"],
               "guards": {r["name"]: r["params"] for r in rows if r["family"] == "guard"},
               "machine": machine(), "seconds": round(time.time() - t0, 1),
               "command": shlex.join(["python", "benchmarks/guard_frontier.py", *(argv or sys.argv[1:])])}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text(summary_md(summary))
    print(summary_md(summary))


if __name__ == "__main__":
    main()
