"""`hcnr-deploy guard`: parse options, call `hcnr_deploy.guard.run.run_guard`, print what was written."""

from __future__ import annotations

import shlex
import sys

import click

from hcnr_deploy.guard.options import GuardOptions
from hcnr_deploy.options import RepairOptions, click_options, one_device_option


@click.command("guard", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--base", required=True, help="Base (pre-fine-tuning) model: HF folder or hub id.")
@click.option("--finetuned", required=True,
              help="The fine-tune to guard: a full HF model folder, or a PEFT LoRA adapter folder trained on --base.")
@click.option("--honesty-data", required=True, type=click.Path(dir_okay=False),
              help="JSONL of honesty examples (as for repair): its refusal targets mark unanswerable questions and "
                   "give the refusal text.")
@click.option("--task-data", required=True, type=click.Path(dir_okay=False),
              help="JSONL of task (domain) examples: their prompts count as answerable.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Guard folder (must not exist).")
@click_options("calibration", "guard", cls=GuardOptions)
@click_options("data", "compute", only=("num_samples", "seed", "dtype", "batch_size"))
@one_device_option
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def guard(base, finetuned, honesty_data, task_data, out, device, overwrite, quiet, **options):
    """Fit the honesty guard of a fine-tune: a probe on one block's state that refuses before the fine-tune answers.

    \b
    The fine-tune still encodes whether it can answer (the paper's Observation 2). A logistic-regression
    probe per block on the fine-tune's state at the last prompt token (calibration questions labelled
    answerable / unanswerable), the block with the best held-out AUROC, a threshold that refuses at most
    --false-refusal of the held-out answerable questions; OUT gets classifier/ (the fine-tune's first blocks
    with the probe as score head, for vLLM's pooling runner), guard.json and README.md. No weight changes.

    \b
      hcnr-deploy guard --base BASE --finetuned FT --honesty-data H.jsonl --task-data T.jsonl --out GUARD \\
          --calibration-dir DATA/calibration --false-refusal 0.05
      hcnr-deploy serve --base BASE --adapter ft=FT --guard guarded=GUARD
    """
    guard_fields = GuardOptions.__dataclass_fields__
    gopts = GuardOptions(**{k: v for k, v in options.items() if k in guard_fields})
    compute = RepairOptions(**{k: v for k, v in options.items() if k not in guard_fields})
    from rich.console import Console

    from hcnr_deploy.guard.run import run_guard

    run_guard(base, finetuned, honesty_data, task_data, out, options=gopts, num_samples=compute.num_samples,
              seed=compute.seed, device=device, dtype=compute.dtype, batch_size=compute.batch_size,
              overwrite=overwrite, console=Console(stderr=True, quiet=quiet), progress=not quiet,
              command=shlex.join(["hcnr-deploy", "guard", *sys.argv[2:]]))
