"""Recipe files: `repair --config FILE.yaml`, `sweep --config FILE.yaml`, and the `recipe.yaml` every run writes.

A recipe is a YAML mapping from option names (the options model's: `base`, `honesty_data`, `r_cw`, ...; a command's
other options under their parameter names: `grid`, `eval_honesty`, ...) to values. Its values become the command's
defaults (click's default_map), so a flag on the command line wins; an unknown key is a one-line error naming it.
The Python API (hcnr_deploy.api) takes the same names as keyword arguments, through the same check.

The effective recipe of a run (every option's value, paths made absolute) is written as `recipe.yaml` beside
report.json / frontier.json; `--config` on it, with a new `--out`, repeats the run. Not in it: where the run
writes and how it talks (`out`, `overwrite`, `quiet`), the API key (a secret), and options the method ignores.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from eval_harness.atomic import write_text_atomic
from eval_harness.errors import UserError

RECIPE_FILE = "recipe.yaml"
NOT_RECIPE = ("out", "overwrite", "quiet", "api_key", "config")


def option_names(command: click.Command) -> list[str]:
    """The names a recipe (or an API call) may use for `command`: its parameters' names, in declaration order."""
    return [p.name for p in command.params if p.name and p.expose_value]


def check_keys(command: click.Command, keys, where: str):
    """An unknown key is a one-line error naming it and the known ones."""
    known = option_names(command)
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise UserError(f"{where}: unknown option {unknown[0]!r} for `hcnr-deploy {command.name}`; the options are "
                        f"{', '.join(n for n in known if n != 'config')}.")


def read_recipe(path: Path, command: click.Command) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"--config {path}: not valid YAML{where}; write one `option: value` per line") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values, got a "
                        f"{type(data).__name__}")
    check_keys(command, data, f"--config {path}")
    return data


def _load(ctx: click.Context, param, value):
    if value is None:
        return
    data = read_recipe(Path(value), ctx.command)
    ctx.default_map = {**(ctx.default_map or {}), **data}


def config_option(fn):
    """`--config FILE.yaml`: the recipe's values as the command's defaults (flags given on the command line win)."""
    return click.option("--config", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
                        callback=_load, metavar="FILE.yaml",
                        help=f"Options from a recipe file (option names as keys, e.g. r_cw: 0.2; a run's own "
                             f"{RECIPE_FILE} repeats it); flags on the command line win.")(fn)


def _plain(value, param: click.Parameter):
    if isinstance(value, tuple):
        return [_plain(v, param) for v in value]
    if isinstance(value, Path) or (isinstance(value, str) and isinstance(param.type, click.Path)):
        return os.path.abspath(value)
    if isinstance(value, str) and param.name in ("base", "finetuned", "model", "reference") and Path(value).exists():
        return os.path.abspath(value)  # a folder; a hub id stays as given
    return value


def effective_recipe(ctx: click.Context, skip=()) -> dict:
    """Every option of this invocation (ctx.params) by name, as a recipe: paths absolute, tuples as lists."""
    params = {p.name: p for p in ctx.command.params}
    return {name: _plain(ctx.params[name], params[name]) for name in option_names(ctx.command)
            if name in ctx.params and name not in NOT_RECIPE and name not in skip}


def recipe_text(recipe: dict) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1000)


def write_recipe(folder: Path, recipe: dict) -> Path:
    """folder/recipe.yaml, atomically (a temporary file renamed)."""
    return write_text_atomic(Path(folder) / RECIPE_FILE, recipe_text(recipe))
