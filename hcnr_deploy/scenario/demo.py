"""`hcnr-deploy demo`: the scenario's data, base and fine-tune (builds.py), then `hcnr-deploy sweep` on them (a
cached sweep folder), summarised; the demo's --out folder written atomically."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from eval_harness.benchmarks import present_benchmarks
from eval_harness.errors import UserError
from hcnr_deploy.scenario.builds import build_base, build_data, build_ft
from hcnr_deploy.scenario.cache import Steps, files_key, key_of
from hcnr_deploy.scenario.recipes import Recipe, demo_margin


PAPER_CANDIDATE = "hcnr-rcw0.4"  # HCNR at the paper's settings (R_IW 0.5, R_CW 0.4, obs compensation)


def build_sweep(steps: Steps, recipe: Recipe, base: Path, ft: Path, scen: Path, *, data_dir: Path | None = None,
                limit: int | None = None, port: int | None = None, console=None, grid: str | None = None,
                max_domain_drop: float | None = None, honesty_metric: str | None = None) -> dict:
    """`hcnr-deploy sweep` on the scenario (its 128 + 128 calibration examples, its held-out questions or the real
    benchmarks in `data_dir`) in cache/sweep-KEY; a finished one is reused, an unfinished one resumed."""
    from hcnr_deploy.serve import free_port
    from hcnr_deploy.sweep import run_sweep

    from hcnr_deploy.sweep import choice as C

    grid = grid if grid is not None else recipe.grid
    max_domain_drop = demo_margin(recipe) if max_domain_drop is None else max_domain_drop
    honesty_metric = honesty_metric or C.DEFAULT_HONESTY_METRIC
    opts = {"num_samples": recipe.num_samples, "seed": recipe.seed + recipe.calib_draw}
    key = {"base": base.name, "ft": ft.name, "data_dir": str(data_dir), "limit": limit, "grid": grid,
           "max_domain_drop": max_domain_drop, "honesty_metric": honesty_metric, "max_tokens": recipe.max_tokens,
           "repair": opts, "v": 1,
           "data": files_key(scen, "honesty_calib.jsonl", "task_calib.jsonl", "domain.jsonl",
                             "kuq/knowns_unknowns.jsonl")}
    folder = steps.root / f"sweep-{key_of(key)}"
    if (folder / "frontier.json").is_file() and not steps.fresh:
        frontier = json.loads((folder / "frontier.json").read_text())
        steps.timings["sweep"] = {"seconds": frontier["timings_s"]["total"], "cached": True}
        steps._say(f"[dim]sweep: cached ({folder})[/dim]")
        return frontier
    t0 = time.perf_counter()
    frontier = run_sweep(base, ft, scen / "honesty_calib.jsonl", scen / "task_calib.jsonl", data_dir or scen,
                         scen / "domain.jsonl", folder, grid=grid, max_domain_drop=max_domain_drop,
                         honesty_metric=honesty_metric,
                         benchmarks=None if data_dir else "kuq", limit=limit, port=port or free_port(),
                         serve_dtype="float32", max_model_len=512, max_tokens=recipe.max_tokens,
                         overwrite=steps.fresh, repair_options=opts, console=console,
                         progress=console is not None and not console.quiet)
    steps.timings["sweep"] = {"seconds": round(time.perf_counter() - t0, 2), "cached": False,
                              "stages": frontier["timings_s"]}
    return frontier


def demo_summary(frontier: dict) -> dict:
    """base / ft / HCNR at the paper's settings / the chosen point (ft when nothing helped): F1, RF Delta, domain
    accuracy, recovery and domain change against ft with their paired intervals; what the domain set resolves."""
    by = {c["name"]: c for c in frontier["candidates"]}
    rows = {}
    shipped_ft = frontier["chosen"] == "ft"
    for label, name in (("base", "base"), ("ft", "ft"), ("HCNR (paper settings)", PAPER_CANDIDATE),
                        ("shipped: ft" if shipped_ft else f"chosen: {frontier['chosen']}", frontier["chosen"])):
        if name in by:
            c = by[name]
            rows[label] = {k: c.get(k) for k in ("name", "f1", "f1_ci95", "rf_delta", "false_refusal",
                                                 "domain_accuracy", "recovery_ratio", "recovery_ratio_ci95",
                                                 "domain_change", "domain_change_ci95")}
    return {"models": rows, "chosen": frontier["chosen"], "shipped_ft": shipped_ft, "reason": frontier["reason"],
            "max_domain_drop": frontier["max_domain_drop"], "honesty_metric": frontier.get("honesty_metric"),
            "domain_resolution": frontier.get("domain_resolution")}


def run_demo(recipe: Recipe, root: Path, *, fresh: bool = False, out: Path | None = None,
             data_dir: Path | None = None, limit: int | None = None, port: int | None = None, console=None,
             grid: str | None = None, max_domain_drop: float | None = None,
             honesty_metric: str | None = None) -> dict:
    """The whole scenario: data -> base -> ft -> sweep; returns {"results", "frontier", "report"}."""
    steps = Steps(root, fresh=fresh, console=console)
    scen = build_data(steps, recipe)
    base = build_base(steps, recipe, scen, console)
    ft = build_ft(steps, recipe, base, scen, console)
    if data_dir is not None:  # the real benchmarks instead of the scenario's own questions (KUQ-format file)
        if not present_benchmarks(data_dir):
            raise UserError(f"--data-dir {data_dir}: no SelfAware, KUQ, FalseQA, NEC or RefuNQ files found; point it "
                            "at the folder holding them (e.g. ../shared/data) or leave it out")
    frontier = build_sweep(steps, recipe, base, ft, scen, data_dir=data_dir, limit=limit, port=port,
                           console=console, grid=grid, max_domain_drop=max_domain_drop,
                           honesty_metric=honesty_metric)
    sweep_dir = Path(frontier["settings"]["out"])
    results = json.loads((sweep_dir / "eval-results.json").read_text())
    report = {"recipe": asdict(recipe), "paths": {"cache": str(root), "data": str(scen), "base": str(base),
                                                  "ft": str(ft), "sweep": str(sweep_dir),
                                                  "chosen": str(sweep_dir / "chosen")},
              "timings_s": steps.timings, "summary": demo_summary(frontier)}
    if out is not None:
        write_out(out, results, report, sweep_dir)
    return {"results": results, "frontier": frontier, "report": report}


def write_out(out: Path, results: dict, report: dict, sweep_dir: Path | None = None):
    """results.json (the eval harness's) + demo.json (paths, timings, summary), and the sweep's frontier.json /
    .md / .png when given, written atomically."""
    from hcnr_deploy.io.atomic import AtomicDir

    with AtomicDir(Path(out), overwrite=True) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        (tmp / "demo.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
        for name in ("frontier.json", "frontier.md", "frontier.png") if sweep_dir is not None else ():
            shutil.copyfile(Path(sweep_dir) / name, tmp / name)
