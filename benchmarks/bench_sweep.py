"""The sweep's wall time per stage against one HCNR repair plus the eval of the same number of models.

    python benchmarks/bench_sweep.py                      # tiny scenario, the default grid, 200 questions each
    python benchmarks/bench_sweep.py --limit 100 --grid "hcnr:r_cw=0.2,0.4; regmean:mu=1"

In one run, on the scenario's base and fine-tune (built or taken from the scenario cache, not timed):
1. one `run_repair` at the paper's settings (what a user pays for one point);
2. `run_sweep` with the grid: prepare, candidates (statistics once + every candidate), serve, eval, frontier;
3. the eval of the same models without the sweep: the sweep's candidates served on one fresh vLLM engine and
   scored by the eval harness with an empty response cache.
Target (issue 10 section 5): the sweep's non-eval time (everything but serve + eval) at most 1.5x one repair.
Writes --out/sweep.json and sweep.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import machine  # noqa: E402  (one machine description for the benchmark results)
from eval_harness.env import cache_root  # noqa: E402
from hcnr_deploy.scenario.builds import build_base, build_data, build_ft  # noqa: E402
from hcnr_deploy.scenario.cache import Steps  # noqa: E402
from hcnr_deploy.scenario.recipes import RECIPES  # noqa: E402

TARGET = 1.5


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(RECIPES), default="tiny")
    ap.add_argument("--grid", default=None, help="the sweep's --grid (default: its default grid)")
    ap.add_argument("--limit", type=int, default=200, help="questions per honesty benchmark and of the domain")
    ap.add_argument("--cache-dir", default=str(cache_root()), help="scenario cache (base and fine-tune)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--render", metavar="SWEEP_JSON", help="only rewrite sweep.md beside SWEEP_JSON from its figures")
    args = ap.parse_args(argv)
    if args.render:
        path = Path(args.render)
        (path.parent / "sweep.md").write_text(render(json.loads(path.read_text())))
        return

    from rich.console import Console

    from eval_harness import evaluate
    from hcnr_deploy.repair import run_repair
    from hcnr_deploy.serve import free_port, serve_models
    from hcnr_deploy.sweep import run_sweep

    console = Console(stderr=True)
    command = " ".join(["python", "benchmarks/bench_sweep.py", *(argv if argv is not None else sys.argv[1:])])
    recipe = RECIPES[args.model]
    steps = Steps(Path(args.cache_dir), console=console)
    scen = build_data(steps, recipe)
    base = build_base(steps, recipe, scen, console)
    ft = build_ft(steps, recipe, base, scen, console)
    hon, task, dom = scen / "honesty_calib.jsonl", scen / "task_calib.jsonl", scen / "domain.jsonl"
    opts = {"num_samples": recipe.num_samples, "seed": recipe.seed}
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    load_start = os.getloadavg()
    try:
        console.rule("1. one HCNR repair (paper settings)")
        t0 = time.perf_counter()
        rep = run_repair(base, ft, hon, task, work / "hcnr", **opts)
        repair_s = time.perf_counter() - t0

        console.rule("2. the sweep")
        t0 = time.perf_counter()
        fr = run_sweep(base, ft, hon, task, scen, dom, work / "sweep", grid=args.grid, benchmarks="kuq",
                       limit=args.limit, port=free_port(), serve_dtype="float32", max_model_len=512,
                       max_tokens=recipe.max_tokens, repair_options=opts, console=console)
        sweep_s = time.perf_counter() - t0
        st = fr["timings_s"]
        names = [c["name"] for c in fr["candidates"]]

        console.rule(f"3. the eval of the same {len(names)} models, without the sweep")
        adapters = {c["name"]: c["artifact"] for c in fr["candidates"] if c["name"] != "base"}
        t0 = time.perf_counter()
        with serve_models(base, adapters, port=free_port(), max_model_len=512, dtype="float32",
                          log_dir=work / "logs", timeout=900) as servers:
            serve_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            evaluate(servers[0].base_url, models=names, benchmarks=["kuq"], data_dir=scen, domain=[dom],
                     limit=args.limit, seed=recipe.seed, max_tokens=recipe.max_tokens, concurrency=16,
                     cache=work / "fresh-cache.sqlite", console=console, progress=True)
            eval_s = time.perf_counter() - t1
    finally:
        shutil.rmtree(work, ignore_errors=True)

    non_eval = st["total"] - st["serve"] - st["eval"]
    sft_s = sum(v for k, v in st["statistics"].items() if k.startswith("sft"))
    reference = repair_s + serve_s + eval_s
    result = {
        "command": command, "machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "scenario": args.model, "grid": fr["settings"]["grid"], "candidates": names, "notes": fr["notes"],
        "questions": fr["questions"],
        "one_repair_s": round(repair_s, 3), "one_repair_stages_s": rep.get("timings_s"),
        "sweep_s": round(sweep_s, 3), "sweep_stages_s": st,
        "candidate_seconds": {c["name"]: c.get("repair_seconds") for c in fr["candidates"]
                              if c.get("repair_seconds") is not None},
        "sweep_non_eval_s": round(non_eval, 3), "sft_training_s": round(sft_s, 3),
        "eval_same_models_s": {"serve": round(serve_s, 3), "eval": round(eval_s, 3)},
        "ratio_non_eval_to_one_repair": round(non_eval / repair_s, 3),
        "ratio_non_eval_without_sft_to_one_repair": round((non_eval - sft_s) / repair_s, 3),
        "target_ratio": TARGET, "target_met": non_eval / repair_s <= TARGET,
        "ratio_sweep_to_repair_plus_eval": round(st["total"] / reference, 3),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "sweep.md").write_text(render(result))
    console.print((out / "sweep.md").read_text())


def render(r: dict) -> str:
    """sweep.md from sweep.json's figures (`python benchmarks/bench_sweep.py --render sweep.json` redoes it)."""
    st, names, repair_s = r["sweep_stages_s"], r["candidates"], r["one_repair_s"]
    ev = r["eval_same_models_s"]
    lines = [f"# Sweep wall time against one repair ({r['scenario']} scenario)", "",
             f"- command: `{r['command']}`", f"- date: {r['date']}",
             f"- machine: {json.dumps(r['machine'])}; load average {r['load_average']}",
             f"- {len(names)} models ({', '.join(names)}); questions {r['questions']}", "",
             "| stage | seconds |", "|---|---:|",
             f"| one HCNR repair (paper settings) | {repair_s:.1f} |"]
    lines += [f"| sweep: {k} | {v:.1f} |" for k, v in st.items() if isinstance(v, (int, float)) and k != "total"]
    lines += [f"| sweep, inside candidates: statistics {k} | {v:.1f} |" for k, v in st["statistics"].items()]
    lines += [f"| sweep total | {st['total']:.1f} |",
              f"| eval of the same {len(names)} models: serve | {ev['serve']:.1f} |",
              f"| eval of the same {len(names)} models: eval | {ev['eval']:.1f} |", "",
              "Per candidate, what it costs alone (its report.json total: the statistics it uses + its own "
              "stages): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in r.get("candidate_seconds", {}).items()), "",
              f"**Sweep non-eval time {r['sweep_non_eval_s']:.1f} s = {r['ratio_non_eval_to_one_repair']:.2f}x one "
              f"repair** (target <= {r['target_ratio']}x: {'met' if r['target_met'] else 'NOT met'}); without the SFT "
              f"training ({r['sft_training_s']:.1f} s, a competitor no repair pays for) "
              f"{r['ratio_non_eval_without_sft_to_one_repair']:.2f}x. The whole sweep took {st['total']:.1f} s = "
              f"{r['ratio_sweep_to_repair_plus_eval']:.2f}x one repair plus the eval of the same models "
              f"({repair_s + ev['serve'] + ev['eval']:.1f} s)."]
    if r.get("candidate_seconds"):
        lines += ["", f"The {len(r['candidate_seconds'])} candidates as separate repairs would take "
                      f"{sum(r['candidate_seconds'].values()):.1f} s; from one session they took {st['candidates']:.1f} s."]
    if r["notes"]:
        lines += ["", "Notes: " + " ".join(r["notes"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
