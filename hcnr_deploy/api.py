"""The Python API: `from hcnr_deploy import repair, sweep, evaluate`.

Each runs its command (`hcnr-deploy repair`, `sweep`, `eval`) with the options as keyword arguments under the
names a recipe file uses (the options model's: `honesty_data`, `r_cw`, ...; the command's others by their
parameter names: `grid`, `eval_honesty`, `endpoints`, ...), through the same defaults and checks as the command
line, and returns what the command writes: repair's report dict, the sweep's frontier dict, eval's results dict.
Nothing is printed (progress bars only with quiet=False); bad input raises eval_harness.errors.UserError.

    from hcnr_deploy import repair
    report = repair(base="BASE", finetuned="FT", honesty_data="h.jsonl", task_data="t.jsonl", out="out", r_cw=0.2)
"""

from __future__ import annotations

import sys
import types

import click

from eval_harness.apicall import API_CALL
from eval_harness.errors import UserError
from hcnr_deploy.recipe import check_keys


def run_command(name: str, options: dict):
    """Run `hcnr-deploy NAME` with `options` (recipe names -> values) as its defaults; return its result."""
    from hcnr_deploy.cli import main

    command = main.get_command(None, name)
    check_keys(command, options, f"{name}()")
    params = {p.name: p for p in command.params}
    options = {k: [v] if getattr(params[k], "multiple", False) and isinstance(v, str) else v
               for k, v in options.items()}
    if "quiet" in params:
        options.setdefault("quiet", True)
    try:
        ctx = command.make_context(name, [], default_map=options)
    except click.MissingParameter as e:
        raise UserError(f"{name}(): missing keyword argument {e.param.name}=...") from None
    except click.BadParameter as e:
        raise UserError(f"{name}(): {e.param.name}: {e.format_message()}") from None
    ctx.meta[API_CALL] = True
    with ctx:
        try:
            return command.invoke(ctx)
        except click.MissingParameter as e:  # options a real run needs but --plan does not (checked in the body)
            raise UserError(f"{name}(): missing keyword argument {e.param.name}=...") from None


class CallableModule(types.ModuleType):
    """`hcnr_deploy.repair` and `hcnr_deploy.sweep` (packages) share their names with the API's
    functions; once imported they are what `from hcnr_deploy import repair` finds, so they call the function."""

    def __call__(self, **options) -> dict:
        return run_command(self.__name__.rsplit(".", 1)[1], options)


def make_callable(module_name: str):
    sys.modules[module_name].__class__ = CallableModule


def repair(**options) -> dict:
    """`hcnr-deploy repair`: base, finetuned, honesty_data, task_data, out and any RepairOptions field; returns
    report.json's dict."""
    return run_command("repair", options)


def sweep(**options) -> dict:
    """`hcnr-deploy sweep`: base, finetuned, honesty_data, task_data, eval_honesty, eval_domain, out, grid, ...;
    returns frontier.json's dict."""
    return run_command("sweep", options)


def evaluate(**options) -> dict:
    """`hcnr-deploy eval`: endpoints (a list of URL or NAME=URL), models, benchmarks, data_dir, domain, out, ...;
    returns the results dict (the one `--out` writes)."""
    return run_command("eval", options)
