"""`hcnr-deploy probe`: parse the options, call run_probe, print the table."""

from __future__ import annotations

from pathlib import Path

import click

from eval_harness.benchmarks import HONESTY_BENCHMARKS
from hcnr_deploy.options import one_device_option
from hcnr_deploy.probe.run import DTYPES


@click.command("probe", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model", "model", required=True,
              help="The model to probe (the fine-tune): a HF model folder or hub id, or a PEFT LoRA adapter folder.")
@click.option("--reference", default=None,
              help="A second model (the base): its probe is also applied unchanged to --model (the transfer).")
@click.option("--base", default=None,
              help="Base model of LoRA adapters given as --model / --reference (default: the adapter's "
                   "base_model_name_or_path).")
@click.option("--data-dir", type=click.Path(path_type=Path), envvar="HCNR_DATA_DIR", show_envvar=True,
              help="Folder with the benchmark files, as for `hcnr-deploy eval` (searched in sub-folders).")
@click.option("--benchmarks", default=",".join(HONESTY_BENCHMARKS), show_default=True,
              help="Honesty benchmarks, comma-separated.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most N questions per benchmark: the same seeded, class-keeping sample as `eval --limit`.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder for probe.json and probe.png (must not exist).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --limit and the train/test split.")
@click.option("--test-size", type=float, default=0.33, show_default=True,
              help="Fraction of each class held out to score the probes.")
@one_device_option
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Dtype of the forward passes (auto: float32 on CPU, the checkpoint's on GPU); features are "
                   "kept in float32.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per forward pass.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or table.")
def probe(model, reference, base, data_dir, benchmarks, limit, out, seed, test_size, device, dtype, batch_size,
          overwrite, quiet):
    """Linear probes on every layer's hidden state: can the model still tell answerable from unanswerable?

    \b
      hcnr-deploy probe --model FT --reference BASE --data-dir DATA --limit 600 --out probe-ft

    For each benchmark, the questions (rendered as the eval harness sends them to a chat endpoint) are split,
    per class and seeded, into a train and a held-out part. At every layer a logistic-regression probe on the
    last prompt token's hidden state is trained and scored by held-out AUROC (unanswerable positive): on --model,
    on --reference, and the --reference probe applied unchanged to --model (the paper's transfer, Observation 2).
    "Best layer" is the maximum over layers of held-out AUROC (so slightly optimistic); every layer's value is in
    probe.json. Features of all layers go to a float32 file inside the temporary output folder
    (layers x questions x hidden x 4 bytes per model; deleted at the end); memory holds one layer at a time.
    """
    from rich.console import Console

    from hcnr_deploy.probe.report import print_table
    from hcnr_deploy.probe.run import run_probe

    report = run_probe(model, out, reference=reference, base=base, data_dir=data_dir, benchmarks=benchmarks,
                       limit=limit, seed=seed, test_size=test_size, device=device, dtype=dtype,
                       batch_size=batch_size, overwrite=overwrite, progress=not quiet,
                       console=Console(stderr=True, quiet=quiet))
    if not quiet:
        console = Console()
        print_table(report, console)
        run = report["_run"]
        console.print(f"features {run['features_s']:.1f} s, total {run['total_s']:.1f} s; wrote probe.json and "
                      f"probe.png to {run['out']}")
