"""`hcnr-deploy repair`: parse options, call `hcnr_deploy.repair.run_repair`, print the summary."""

from __future__ import annotations

import click

from hcnr_deploy.repair import CHOICES, DEFAULTS


def _choice(key):
    return click.Choice(CHOICES[key], case_sensitive=False)


@click.command("repair", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--base", required=True, help="Base (pre-fine-tuning) model: HF folder or hub id.")
@click.option("--finetuned", required=True,
              help="The fine-tune: a full HF model folder, or a PEFT LoRA adapter folder trained on --base.")
@click.option("--honesty-data", required=True, type=click.Path(dir_okay=False),
              help="JSONL of honesty examples ({\"messages\": [...]} or {\"prompt\", \"response\"}).")
@click.option("--task-data", required=True, type=click.Path(dir_okay=False),
              help="JSONL of task (domain) examples, same formats.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--num-samples", type=int, default=DEFAULTS["num_samples"], show_default=True,
              help="Examples used from each JSONL (the first N).")
@click.option("--max-length", type=int, default=DEFAULTS["max_length"], show_default=True,
              help="Tokens per example (prompt cut from the left, response kept).")
@click.option("--r-iw", type=float, default=DEFAULTS["r_iw"], show_default=True,
              help="R_IW: fraction of each matrix's columns that are restoration candidates (Eq. 5).")
@click.option("--r-cw", type=float, default=DEFAULTS["r_cw"], show_default=True,
              help="R_CW: fraction of eligible matrices kept by displacement (Eqs. 6-7).")
@click.option("--granularity", type=_choice("granularity"), default=DEFAULTS["granularity"], show_default=True,
              help="Neuron = input column (exact LoRA possible) or single weight (per-row masks).")
@click.option("--selection", type=_choice("selection"), default=DEFAULTS["selection"], show_default=True,
              help="hcnr (Eq. 5), no-task (r = s_hon, the paper's 'w/o Task') or random (seeded).")
@click.option("--compensation", type=_choice("compensation"), default=DEFAULTS["compensation"], show_default=True,
              help="obs (the paper's Eqs. 9-10), exact (block least squares), none (plain restoration), "
                   "task-aware (also keeps task behaviour, see --task-weight).")
@click.option("--task-weight", type=float, default=DEFAULTS["task_weight"], show_default=True,
              help="MU of --compensation task-aware: 0 = exact, large = back to the fine-tune.")
@click.option("--fisher-model", type=_choice("fisher_model"), default=DEFAULTS["fisher_model"], show_default=True,
              help="paired: s_hon on the base, s_task on the fine-tune; or both on base / finetuned.")
@click.option("--hessian-inputs", type=_choice("hessian_inputs"), default=DEFAULTS["hessian_inputs"],
              show_default=True, help="Model whose module inputs X give H = X X^T: base, finetuned, or "
                                      "sequential (blocks before each one already repaired).")
@click.option("--damp", type=float, default=DEFAULTS["damp"], show_default=True,
              help="Hessian damping: lambda = damp * mean(diag(X X^T)).")
@click.option("--seed", type=int, default=DEFAULTS["seed"], show_default=True, help="Seed (random selection).")
@click.option("--device", type=_choice("device"), default=DEFAULTS["device"], show_default=True,
              help="Where the calibration passes and solves run (auto: cuda when available).")
@click.option("--dtype", type=_choice("dtype"), default=DEFAULTS["dtype"], show_default=True,
              help="Working dtype of the calibration passes (auto: float32 on CPU, the checkpoint's on GPU); "
                   "outputs keep the fine-tune's dtype, solves run in float64.")
@click.option("--batch-size", type=int, default=DEFAULTS["batch_size"], show_default=True,
              help="Samples per forward/backward pass (per-sample gradients are kept apart).")
@click.option("--hessian-memory", "hessian_memory_gb", type=float, default=DEFAULTS["hessian_memory_gb"],
              show_default=True, help="GiB for Hessians at once, only for architectures not streamed block by "
                                      "block (llama, mistral, qwen2, qwen3 are streamed); more selected blocks "
                                      "than fit are done in several passes.")
@click.option("--offload", is_flag=True,
              help="Keep the decoder blocks in CPU memory and move one at a time to the device while it runs "
                   "(a model larger than the GPU; llama, mistral, qwen2, qwen3). Same output as without it.")
@click.option("--format", "fmt", type=_choice("format"), default=DEFAULTS["format"], show_default=True,
              help="auto: exact LoRA adapter for a LoRA fine-tune with column granularity, else a patched "
                   "checkpoint; adapter for a full fine-tune extracts a LoRA by truncated SVD.")
@click.option("--max-rank", type=int, default=DEFAULTS["max_rank"], show_default=True,
              help="Rank of an SVD-extracted adapter.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary.")
def repair(base, finetuned, honesty_data, task_data, out, fmt, quiet, **options):
    """Compute the HCNR edit of a fine-tune and write an adapter or a patched checkpoint.

    \b
    Stage 1 ranks each matrix's input columns by Eq. 5 (Fisher on honesty vs task data) and keeps the
    R_CW most displaced matrices (Eq. 6); stage 2 restores those columns to the base and compensates
    the change through the honesty data's Hessian. OUT gets the model or adapter and report.json.

    \b
      hcnr-deploy repair --base BASE --finetuned FT --honesty-data H.jsonl --task-data T.jsonl --out OUT
    """
    from rich.console import Console

    from hcnr_deploy.repair import run_repair

    console = Console(stderr=True, quiet=quiet)
    report = run_repair(base, finetuned, honesty_data, task_data, out, format=fmt, progress=not quiet,
                        console=console, **options)
    if not quiet:
        print_summary(report, Console())


def print_summary(report: dict, console):
    """The rich table of selected matrices and the totals."""
    from rich.table import Table

    table = Table(title="HCNR: selected matrices", show_lines=False)
    table.add_column("matrix", no_wrap=True)
    for col in ("d_j", "restored cols", "comp. norm", "retries"):
        table.add_column(col, justify="right")
    for m in report["matrices"]:
        if m["selected"]:
            table.add_row(m["name"], f"{m['displacement']:.4g}", str(len(m["restored_columns"])),
                          f"{m['compensation_norm']:.4g}", str(m["cholesky_retries"]))
    console.print(table)
    s = report["settings"]
    lines = [
        f"[bold]edited fraction[/]: {report['edited_fraction']:.2%} of the weights of "
        f"{report['eligible_matrices']} eligible matrices ({report['selected_matrices']} selected; "
        f"R_IW={s['r_iw']}, R_CW={s['r_cw']}, {s['selection']}, {s['compensation']})",
        f"[bold]samples[/]: {report['num_samples']['honesty']} honesty, {report['num_samples']['task']} task",
        f"[bold]time[/]: {report['timings_s']['total']:.1f} s on {s['resolved_device']} "
        f"({', '.join(f'{k} {v:.1f}' for k, v in report['timings_s'].items() if k != 'total')})",
        f"[bold]peak memory[/]: {report['peak_memory_bytes'] / 2**30:.2f} GiB",
    ]
    if "svd_relative_error" in report:
        lines.append(f"[bold]SVD adapter[/]: rank {report['svd']['rank']}, relative error "
                     f"{report['svd_relative_error']:.3%}")
        if not report["svd"]["rank_supported_by_vllm"]:
            lines.append(f"[yellow]warning[/]: vLLM serves LoRA ranks 8, 16, 32, 64, 128, 256, 320, 512; "
                         f"rank {report['svd']['rank']} is not one of them.")
        if report["svd"]["not_representable"]:
            lines.append(f"[yellow]not in the adapter[/]: {len(report['svd']['not_representable'])} tensors outside "
                         f"the decoder Linears differ from the base (e.g. {report['svd']['not_representable'][0]})")
    lines.append(f"[bold]wrote[/] {report['format']} to {report['output']}")
    for line in lines:
        console.print(line)
