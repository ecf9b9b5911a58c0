"""The `hcnr-deploy sweep` command: parse, run (run.py) or print the plan, print the frontier."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path

import click

from hcnr_deploy.engine.plan_cli import plan_options, print_plan, require_unless_plan
from eval_harness.env import API_KEY_ENVVARS, API_KEY_HELP
from hcnr_deploy.guard.options import GuardOptions
from hcnr_deploy.options import click_options
from eval_harness.apicall import from_api
from hcnr_deploy.recipe import config_option, effective_recipe
from hcnr_deploy.sweep import choice as C
from hcnr_deploy.sweep.grid import DEFAULT_GRID, GRID_HELP
from hcnr_deploy.sweep.run import EVAL_DEFAULTS


@click.command("sweep", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--base", required=True, help="Base (pre-fine-tuning) model: HF folder or hub id.")
@click.option("--finetuned", required=True, help="The fine-tune: a full HF model folder or a PEFT LoRA adapter.")
@click.option("--honesty-data", type=click.Path(dir_okay=False),
              help="Calibration JSONL of honesty examples (as for repair).")
@click.option("--task-data", type=click.Path(dir_okay=False),
              help="Calibration JSONL of task examples (as for repair).")
@click.option("--eval-honesty", default=None, type=click.Path(exists=True, path_type=Path), metavar="DIR_OR_JSONL",
              help="Held-out honesty questions: a folder of benchmark files (read as `eval --data-dir` reads it, "
                   "see --benchmarks; e.g. a `data split`'s evaluation/) or one KUQ-format JSONL ({\"question\", "
                   "\"answer\", \"unknown\"}) [default: the user data folder, see `hcnr-deploy data fetch`].")
@click.option("--eval-domain", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Held-out domain questions: the eval harness's domain JSONL ({\"question\", \"answers\"} or "
                   "{\"question\", \"choices\", \"answer\"}).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Sweep folder: candidates/, eval cache, frontier.{json,md,png}, chosen/. An unfinished one is "
                   "resumed.")
@click.option("--grid", default=None, metavar="SPEC",
              help=f"Candidates besides base and ft. {GRID_HELP} [default: {DEFAULT_GRID}]")
@click.option("--max-domain-drop", type=float, default=C.DEFAULT_MAX_DOMAIN_DROP, show_default=True,
              help=C.MARGIN_HELP)
@click.option("--honesty-metric", type=click.Choice(C.HONESTY_METRICS), default=C.DEFAULT_HONESTY_METRIC,
              show_default=True, help=C.METRIC_HELP)
@click.option("--benchmarks", default=None, metavar="A,B",
              help="With a folder --eval-honesty: which of selfaware,kuq,falseqa,nec,refunq [default: those found].")
@click.option("--limit", type=click.IntRange(min=2), default=None,
              help="At most this many questions per honesty benchmark and of the domain (stratified sample).")
@click.option("--endpoint", default=None, metavar="URL",
              help="Score candidates already served there (under their candidate names, base and ft) instead of "
                   "starting vLLM here.")
@click.option("--port", type=int, default=8000, show_default=True,
              help="Port of the vLLM server(s) started here (checkpoints: this one and the next).")
@click.option("--api-key", envvar=list(API_KEY_ENVVARS), default=None,
              help=f"Bearer key of --endpoint, and required by the servers started here ({API_KEY_HELP}).")
@click.option("--serve-dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="vLLM's dtype for the candidates (--dtype is the repair's working dtype).")
@click.option("--trust-cache-names", is_flag=True,
              help="With --endpoint on another machine (weights not readable here): let the response cache trust "
                   "served names, so a rerun resends nothing (see `hcnr-deploy eval --help`).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=EVAL_DEFAULTS["max_tokens"], show_default=True,
              help="Tokens per evaluation answer (greedy).")
@click.option("--concurrency", type=click.IntRange(min=1), default=EVAL_DEFAULTS["concurrency"], show_default=True,
              help="Evaluation requests in flight.")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=1), default=EVAL_DEFAULTS["n_boot"],
              show_default=True, help="Bootstrap replicates for the 95% intervals.")
@click.option("--startup-timeout", type=float, default=900.0, show_default=True,
              help="Seconds to wait for a vLLM server's /health.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it holds a finished sweep (or anything else).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars; only the table.")
@click.option("--build-only", is_flag=True, help="Build every candidate and stop before serving (frontier.json lists "
              "them unscored); rerun without it, here or where the folder is copied, to serve and score them.")
@click.option("--keep-candidates", is_flag=True, help="A full fine-tune: keep every candidate checkpoint in "
              "OUT/candidates/. Without it each is built, served, scored and deleted in turn (the choice kept), so at "
              "most two checkpoints are on disk, at the cost of a model load and a Gram pass per candidate (the Fisher "
              "scores are computed once and kept in OUT/statistics/).")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_ARGS...]")
@click_options("data", "compute")
@click_options("calibration", cls=GuardOptions)
@config_option
@plan_options
def sweep(base, finetuned, honesty_data, task_data, eval_honesty, eval_domain, out, grid, max_domain_drop,
          honesty_metric, benchmarks, limit, endpoint, port, api_key, serve_dtype, trust_cache_names, max_tokens,
          concurrency, n_boot, startup_timeout, overwrite, quiet, build_only, keep_candidates, vllm_args, plan, plan_json,
          **options):
    """Measure the honesty/domain frontier of repair methods on your model and ship the chosen point.

    \b
    Fisher and Gram/Hessian statistics are computed once; every candidate (base, ft, HCNR over R_CW, a
    random-selection control, HCNR with task-aware compensation over MU, RegMean over MU, delta scaling over
    A, depth-dependent delta scaling (LiNeS) over A and B, calibration SFT over steps) is written to
    OUT/candidates/, served (LoRA: adapters on one vLLM engine; full: checkpoints one after another, each
    deleted once scored unless it is the choice so far or --keep-candidates),
    scored by the eval harness, and placed on the honesty/domain plane:
    OUT/frontier.json, frontier.md, frontier.png, and OUT/chosen/, ready for `hcnr-deploy serve`: the
    highest --honesty-metric among the candidates that beat ft's with 95% paired confidence, keep domain
    accuracy non-inferior at --max-domain-drop and keep RF Delta at least ft's; ft itself when none does.
    The table shows false refusals and the always-refuse reference; the lines below it, what the domain
    set can resolve.

    \b
      hcnr-deploy sweep --base BASE --finetuned FT --honesty-data H.jsonl --task-data T.jsonl \\
          --eval-honesty ../shared/data --eval-domain domain.jsonl --out sweep/ --limit 300
      hcnr-deploy sweep ... --grid "hcnr:r_cw=0.2,0.4; regmean:mu=1,3; scale:a=0.5" -- --gpu-memory-utilization 0.8

    OUT/recipe.yaml holds every option: `--config OUT/recipe.yaml --out NEW` repeats the sweep.
    A killed sweep rerun with the same options rebuilds no finished candidate and sends only the requests
    whose answers are not in OUT/eval-cache.sqlite. Everything after `--` goes to vLLM.
    """
    from rich.console import Console

    from hcnr_deploy.sweep import report, run
    from hcnr_deploy.sweep.build import planned
    from hcnr_deploy.sweep.grid import parse_grid

    ctx = click.get_current_context()
    require_unless_plan(plan, honesty_data=honesty_data, task_data=task_data, eval_domain=eval_domain, out=out)
    guard_options = {k: options.pop(k) for k in list(options) if k in GuardOptions.__dataclass_fields__}
    repair_options = options
    if plan:
        from hcnr_deploy.engine.plan import finetune_kind
        from hcnr_deploy.options import RepairOptions
        from hcnr_deploy.sweep.bounded import applies, one_at_a_time_plan

        bounded = applies(finetune_kind(finetuned)[0] == "lora", keep_candidates, build_only, endpoint)
        return print_plan(base, finetuned, RepairOptions(**repair_options), planned(parse_grid(grid)), plan_json,
                          f"plan: sweep {base}" + (" (candidates one at a time)" if bounded else ""),
                          planner=one_at_a_time_plan if bounded else None)
    if not from_api(ctx):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed sweep stops its servers, cleans temps
    console = Console(stderr=True, quiet=quiet)
    frontier = run.run_sweep(base, finetuned, honesty_data, task_data, eval_honesty, eval_domain, out, grid=grid,
                         max_domain_drop=max_domain_drop, honesty_metric=honesty_metric, benchmarks=benchmarks,
                         limit=limit, endpoint=endpoint,
                         port=port, vllm_args=vllm_args, serve_dtype=serve_dtype, api_key=api_key,
                         max_tokens=max_tokens, concurrency=concurrency,
                         n_boot=n_boot, startup_timeout=startup_timeout, overwrite=overwrite,
                         trust_cache_names=trust_cache_names, build_only=build_only, keep_candidates=keep_candidates,
                         repair_options=repair_options, guard_options=guard_options, console=console,
                         progress=not quiet,
                         command=None if from_api(ctx) else shlex.join(["hcnr-deploy", "sweep", *sys.argv[2:]]),
                         recipe=effective_recipe(ctx))
    if not from_api(ctx):
        report.print_frontier(frontier, Console())
    return frontier

