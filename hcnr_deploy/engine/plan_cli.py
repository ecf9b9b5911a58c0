"""``--plan`` / ``--json`` of ``hcnr-deploy repair`` and ``sweep``: print the plan (plan.py) and exit."""

from __future__ import annotations

import json

import click


def plan_options(f):
    """The two flags, for a click command."""
    f = click.option("--json", "plan_json", is_flag=True, help="With --plan: print it as JSON (gpu_bytes per "
                     "device, host_bytes, disk_bytes, flops per stage).")(f)
    return click.option("--plan", is_flag=True, help="Print the predicted peak memory per GPU, host RAM, disk and "
                        "FLOPs per stage from --base's config.json and the options, then exit (nothing loaded).")(f)


def require_unless_plan(plan: bool, **values):
    """Click's own "Missing option" error for an option a real run needs (``--plan`` needs none of them)."""
    if plan:
        return
    ctx = click.get_current_context()
    for name, value in values.items():
        if value is None:
            param = next(p for p in ctx.command.params if p.name == name)
            raise click.MissingParameter(ctx=ctx, param=param)


def print_plan(base, finetuned, opts, candidates: list[tuple[str, dict]], as_json: bool, title: str, planner=None):
    """`planner(base, finetuned, opts, candidates)`: plan.plan_for_run unless given."""
    from hcnr_deploy.engine.plan import format_plan, plan_for_run

    p = (planner or plan_for_run)(base, finetuned, opts, candidates)
    if as_json:
        click.echo(json.dumps({k: p[k] for k in ("gpu_bytes", "host_bytes", "disk_bytes", "flops", "model_bytes",
                                                  "block_bytes", "streamed", "passes", "placement", "stages")}, indent=2))
    else:
        click.echo(format_plan(p, title))
