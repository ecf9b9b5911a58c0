"""The reproduction's models per seed: the scenario's base and fine-tune, every repair variant from one repair
session, the training baselines and Rehearsal; served by one vLLM server, scored by the eval harness, probed."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from hcnr_deploy import sweep as F
from hcnr_deploy.scenario import realdata
from hcnr_deploy.scenario.builds import (BASELINE_METHODS, REHEARSAL_SHARE, baseline_sizes, build_base,
                                         build_baseline, build_data, build_ft, build_rehearsal)
from hcnr_deploy.scenario.cache import files_key, key_of
from hcnr_deploy.scenario.recipes import repair_options
from hcnr_deploy.sweep import build_candidates

HONESTY = ("selfaware", "kuq", "falseqa", "nec", "refunq")
SEED_MODES = {"train": "each seed: its own scenario data, base, fine-tune and repair",
              "calibration": "one scenario, base and fine-tune (seed 0); each seed: another draw of the repair's "
                             "calibration examples and the repair's seed"}
TABLE_VARIANTS = ("hcnr", "random", "no-task", "no-comp", "exact")  # Tables 1 and 3; sweeps are the rest
ICL_SHOTS = 4  # Table 1's ICL row: the eval harness's first 4 honesty exemplars in the fine-tune's prompt


def parse_floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def baseline_methods(text: str, no_rait: bool = False) -> list[str]:
    """--baselines text -> the training baselines to build (builds.BASELINE_METHODS order kept as given; '' for
    none); --no-rait (deprecated) drops rait. Raises ValueError naming the valid methods on an unknown one."""
    names = list(dict.fromkeys(x.strip().lower() for x in text.split(",") if x.strip()))
    bad = [n for n in names if n not in BASELINE_METHODS]
    if bad:
        raise ValueError(f"--baselines: unknown {', '.join(bad)}; choose from {', '.join(BASELINE_METHODS)}")
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


def variants(args) -> dict[str, F.Candidate]:
    """name -> candidate (hcnr_deploy.sweep.Candidate: repair method and options); Table 1/3 rows and sweeps."""
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
    scen = build_data(steps, recipe)
    base = build_base(steps, recipe, scen, console)
    ft = build_ft(steps, recipe, base, scen, console)
    chosen = variants(args)
    if not sweeps:
        keep = TABLE_VARIANTS if args.other_seed_variants is None else args.other_seed_variants.split(",")
        chosen = {n: v for n, v in chosen.items() if n in keep}
    opts = repair_options(recipe)
    opts = {"num_samples": opts["num_samples"], "seed": opts["seed"]}
    hon, task = scen / "honesty_calib.jsonl", scen / "task_calib.jsonl"
    folder = steps.root / ("variants-" + key_of({"base": base.name, "ft": ft.name, "repair": opts,
                                                 "data": files_key(scen, hon.name, task.name)}))
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
    sizes = baseline_sizes(replace(recipe, baseline_sizes=tuple(given)), scen) if methods else []  # capped
    for method in methods:
        for size in sizes:
            name = f"{method}-n{size}"
            adapters[name] = build_baseline(steps, recipe, base, ft, scen, method, size, console)
            info = json.loads((adapters[name] / "step.json").read_text())
            meta[name] = {"method": method, "data_size": info.get("data_size", size),
                          "train_seconds": info.get("train_seconds"), "seconds": info["seconds"],
                          "examples": info.get("examples"), "steps": info.get("steps"), "edited_fraction": 1.0}
    adapters["rehearsal"] = build_rehearsal(steps, recipe, base, scen, console, share=REHEARSAL_SHARE)
    info = json.loads((adapters["rehearsal"] / "step.json").read_text())
    meta["rehearsal"] = {"seconds": info["seconds"], "share": REHEARSAL_SHARE, "rows": info.get("rows"),
                         "refusal_rows": info.get("refusal_rows"), "edited_fraction": 1.0}
    return scen, base, ft, adapters, meta


def honesty_sets(args, recipe, scen: Path) -> tuple[list[str], Path]:
    """The honesty benchmarks to score and their folder: --data-dir's benchmarks (those of --benchmarks, default
    every one found there), or the scenario's own held-out questions (kuq format). A real-data recipe (smollm2-rc)
    trained its base on part of the real benchmarks, so it scores its data step's `heldout/` part only (another
    --data-dir would score questions the base was trained on)."""
    from eval_harness.benchmarks import present_benchmarks

    wanted = [b.strip() for b in args.benchmarks.split(",") if b.strip()] if args.benchmarks else list(HONESTY)
    bad = [b for b in wanted if b not in HONESTY]
    if bad:
        raise SystemExit(f"--benchmarks: unknown {', '.join(bad)}; choose from {', '.join(HONESTY)}")
    heldout = scen / "heldout"
    if isinstance(recipe.size, realdata.RealSize):  # main() refuses --data-dir for these
        data_dir = heldout
    elif args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        return ["kuq"], scen
    found = list(present_benchmarks(data_dir, wanted))
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
    """hcnr_deploy.probe.run.run_probe on the fine-tune (--model, a LoRA adapter on base) with the base as --reference,
    on the held-out honesty questions the eval scores (same files, --limit and sampling seed 0); writes
    out_dir/probe/{probe.json, probe.png}."""
    from hcnr_deploy.probe.run import run_probe

    return run_probe(str(ft), out_dir / "probe", reference=str(base), base=str(base), data_dir=data_dir,
                     benchmarks=",".join(benchmarks), limit=args.limit, seed=0, device="cpu", dtype="float32",
                     overwrite=True, progress=True, console=console)
