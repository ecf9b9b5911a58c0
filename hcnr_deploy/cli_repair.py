"""`hcnr-deploy repair`: parse options, call `hcnr_deploy.repair.run_repair`, print the summary."""

from __future__ import annotations

import click

from eval_harness.apicall import from_api
from hcnr_deploy.engine.plan_cli import plan_options, print_plan, require_unless_plan
from hcnr_deploy.options import RepairOptions, check_applicable, click_options, ignored_by
from hcnr_deploy.recipe import config_option, effective_recipe, write_recipe


@click.command("repair", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--base", required=True, help="Base (pre-fine-tuning) model: HF folder or hub id.")
@click.option("--finetuned", required=True,
              help="The fine-tune: a full HF model folder, or a PEFT LoRA adapter folder trained on --base.")
@click.option("--honesty-data", type=click.Path(dir_okay=False),
              help="[required] JSONL of honesty examples ({\"messages\": [...]} or {\"prompt\", \"response\"}).")
@click.option("--task-data", type=click.Path(dir_okay=False),
              help="[required] JSONL of task (domain) examples, same formats.")
@click.option("--out", type=click.Path(file_okay=False), help="[required] Output folder (must not exist).")
@click_options("data", "method", "compute")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary.")
@config_option
@plan_options
def repair(base, finetuned, honesty_data, task_data, out, overwrite, quiet, plan, plan_json, **options):
    """Compute the HCNR edit of a fine-tune (or another --method) and write an adapter or a patched checkpoint.

    \b
    Stage 1 ranks each matrix's input columns by Eq. 5 (Fisher on honesty vs task data) and keeps the
    R_CW most displaced matrices (Eq. 6); stage 2 restores those columns to the base and compensates
    the change through the honesty data's Hessian. OUT gets the model or adapter, report.json, a
    README.md model card and recipe.yaml (`--config OUT/recipe.yaml --out NEW` repeats the run).

    \b
      hcnr-deploy repair --base BASE --finetuned FT --honesty-data H.jsonl --task-data T.jsonl --out OUT
    """
    from rich.console import Console

    from hcnr_deploy.repair import run_repair

    ctx = click.get_current_context()
    opts = RepairOptions(**options)  # validated: a bad value is a one-line error naming its flag
    check_applicable(opts.method, given_options(ctx, options))
    require_unless_plan(plan, honesty_data=honesty_data, task_data=task_data, out=out)
    if plan:
        return print_plan(base, finetuned, opts, [(opts.method, opts.settings())], plan_json, f"plan: repair {base}")
    console = Console(stderr=True, quiet=quiet)
    report = run_repair(base, finetuned, honesty_data, task_data, out, overwrite=overwrite, progress=not quiet,
                        console=console, **opts.settings())
    write_recipe(report["output"], effective_recipe(ctx, skip={f.name for f in ignored_by(opts.method)}))
    if not quiet and not from_api(ctx):
        print_summary(report, Console())
    return report


def given_options(ctx: click.Context, names) -> set[str]:
    """The options set by the user (command line, environment or a recipe file), not left at their defaults."""
    from click.core import ParameterSource

    return {n for n in names if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT)}


def print_summary(report: dict, console):
    """The rich table of selected matrices and the totals."""
    from rich.table import Table

    s = report["settings"]
    method = s.get("method", "hcnr")
    table = Table(title=f"{method}: {'selected' if method == 'hcnr' else 'edited'} matrices", show_lines=False)
    table.add_column("matrix", no_wrap=True)
    for col in ("d_j", "restored cols", "comp. norm", "retries"):
        table.add_column(col, justify="right")
    for m in report["matrices"]:
        if m["selected"]:
            table.add_row(m["name"], f"{m['displacement']:.4g}", str(len(m["restored_columns"])),
                          f"{m['compensation_norm']:.4g}", str(m["cholesky_retries"]))
    console.print(table)
    params = {"hcnr": f"R_IW={s['r_iw']}, R_CW={s['r_cw']}, {s['selection']}, {s['compensation']}",
              "regmean": f"MU={s.get('task_weight')}", "scale": f"alpha={s.get('alpha')}",
              "lines": f"alpha={s.get('alpha')}, beta={s.get('beta')}",
              "sft": f"steps={s.get('steps')}, lr={s.get('lr')}"}.get(method, "")
    lines = [
        f"[bold]edited fraction[/]: {report['edited_fraction']:.2%} of the weights of "
        f"{report['eligible_matrices']} eligible matrices ({report['selected_matrices']} selected; "
        f"{method}: {params})",
        f"[bold]samples[/]: {report['num_samples']['honesty']} honesty, {report['num_samples']['task']} task",
        f"[bold]time[/]: {report['timings_s']['total']:.1f} s on {s['resolved_device']} "
        f"({', '.join(f'{k} {v:.1f}' for k, v in report['timings_s'].items() if k != 'total')})",
        f"[bold]peak memory[/]: {report['peak_memory_bytes'] / 2**30:.2f} GiB",
    ]
    if "svd_relative_error" in report:
        lines.append(f"[bold]SVD adapter[/]: rank {report['svd']['rank']}, relative error "
                     f"{report['svd_relative_error']:.3%}")
        if not report["svd"]["rank_supported_by_vllm"]:
            from hcnr_deploy.serve.lora import VLLM_LORA_RANKS

            lines.append(f"[yellow]warning[/]: vLLM serves LoRA ranks {', '.join(map(str, VLLM_LORA_RANKS))}; "
                         f"rank {report['svd']['rank']} is not one of them.")
        if report["svd"]["not_representable"]:
            lines.append(f"[yellow]not in the adapter[/]: {len(report['svd']['not_representable'])} tensors outside "
                         f"the decoder Linears differ from the base (e.g. {report['svd']['not_representable'][0]})")
    lines.append(f"[bold]wrote[/] {report['format']} to {report['output']}")
    for line in lines:
        console.print(line)
