"""`hcnr-deploy data fetch | split | honesty`."""

from __future__ import annotations

from pathlib import Path

import click

from eval_harness.env import API_KEY_ENVVARS, API_KEY_HELP

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group("data", context_settings=CTX)
def data():
    """Get the honesty benchmarks, split them, and build the honesty calibration data.

    \b
      hcnr-deploy data fetch                                    (into the user data folder; printed)
      hcnr-deploy data split --out SPLIT                        (SPLIT/calibration, SPLIT/evaluation)
      hcnr-deploy data honesty --data-dir SPLIT/calibration --out hon.jsonl --size 256
      hcnr-deploy sweep ... --honesty-data hon.jsonl --eval-honesty SPLIT/evaluation ...

    No calibration question is ever scored: the split is disjoint by question text, and `data honesty`
    refuses the evaluation half.
    """


def _data_dir_option(help_text: str):
    return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help=help_text + " [default: the user data folder, see `data fetch`]")


def _resolve(data_dir):
    from eval_harness.env import data_dir_or_default

    return data_dir_or_default(data_dir)


@data.command("fetch", context_settings=CTX)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to put them [default: the user data folder: $HCNR_DATA_DIR, else "
                   "$XDG_DATA_HOME/hcnr-deploy/benchmarks, else ~/.local/share/hcnr-deploy/benchmarks].")
@click.option("--benchmarks", default=None, metavar="A,B",
              help="Which of selfaware,kuq,falseqa,nec,refunq [default: all].")
@click.option("--mirror", envvar="HCNR_DATA_MIRROR", default=None, metavar="URL",
              help="Base URL holding the GitHub files under their raw paths (OWNER/REPO/COMMIT/PATH), instead of "
                   "https://raw.githubusercontent.com (env HCNR_DATA_MIRROR). KUQ follows HF_ENDPOINT.")
def fetch(data_dir, benchmarks, mirror):
    """Download SelfAware, KUQ, FalseQA, NEC and RefuNQ from their public sources, sha256-checked.

    \b
    SelfAware and UnknownBench from GitHub at pinned commits (checksums pinned); KUQ from the Hugging Face
    hub (amayuelas/KUQ, through huggingface_hub: HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE; its checksum is
    recorded at the first download, not pinned). `eval`, `sweep`, `probe` and `data split` read this folder
    when no --data-dir is given. Files already there and intact are kept.
    """
    from eval_harness.env import user_data_dir
    from hcnr_deploy.benchdata.fetch import fetch as run_fetch

    folder = data_dir or user_data_dir()
    click.echo(f"data folder: {folder}")
    run_fetch(folder, benchmarks, mirror, console=click.echo)
    click.echo(f"ready: {folder}" + ("" if data_dir else " (read by eval, sweep, probe and data split by default)"))


@data.command("split", context_settings=CTX)
@_data_dir_option("Benchmark folder to split (SelfAware, KUQ, FalseQA, NEC, RefuNQ files, any sub-folders).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New folder: calibration/, evaluation/, "
              "split.json.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Hash seed (0: the plain hash of the question text).")
@click.option("--eval-share", type=float, default=0.5, show_default=True,
              help="Share of the questions in evaluation/ (by hash, so approximate).")
@click.option("--benchmarks", default=None, metavar="A,B", help="Which benchmarks [default: every one found].")
def split(data_dir, out, seed, eval_share, benchmarks):
    """Cut a benchmark folder by a hash of each question's text into OUT/calibration and OUT/evaluation.

    Each half keeps the source's layout and formats, so `eval --data-dir`, `sweep --eval-honesty` and
    `probe --data-dir` read it as they read the source; a question in two files lands in one half.
    """
    from hcnr_deploy.benchdata.split import split_folder

    meta = split_folder(_resolve(data_dir), out, seed=seed, eval_share=eval_share, benchmarks=benchmarks)
    for b, parts in meta["questions"].items():
        click.echo(f"{b:<10} calibration {parts['calibration']:>5}   evaluation {parts['evaluation']:>5}")
    click.echo(f"wrote {out}/calibration and {out}/evaluation (seed {seed}, evaluation share {eval_share})")


@data.command("honesty", context_settings=CTX)
@_data_dir_option("Calibration benchmark folder (a `data split`'s calibration/).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="JSONL to write.")
@click.option("--size", type=click.IntRange(min=2), default=256, show_default=True, help="Examples in all.")
@click.option("--refusal-share", type=float, default=0.5, show_default=True,
              help="Share of unanswerable questions (answered with a refusal); the rest answerable (an answer).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Which questions are drawn.")
@click.option("--benchmarks", default=None, metavar="A,B", help="Which benchmarks [default: every one found].")
@click.option("--endpoint", default=None, metavar="URL",
              help="A server of the model (e.g. `hcnr-deploy serve --base BASE`): answerable questions without a "
                   "gold answer (FalseQA, NEC) get its own greedy answer.")
@click.option("--model", default=None, help="Served name of the model at --endpoint.")
@click.option("--api-key", envvar=list(API_KEY_ENVVARS), default=None, help=f"Key of --endpoint ({API_KEY_HELP}).")
def honesty(data_dir, out, size, refusal_share, seed, benchmarks, endpoint, model, api_key):
    """D_hon the paper's way (R-Tuning): a refusal for unanswerable questions, an answer for answerable ones.

    \b
    Answers: the gold answer (SelfAware, KUQ, RefuNQ), or with --endpoint the served model's own greedy
    answer (first sentence; dropped when a refusal detector reads it as a refusal). Each class is shared
    equally over the benchmarks. Output: {"prompt", "response"} JSONL, as `repair --honesty-data` reads.
    """
    from hcnr_deploy.benchdata.honesty import build_honesty

    res = build_honesty(_resolve(data_dir), out, size=size, refusal_share=refusal_share, seed=seed,
                        benchmarks=benchmarks, endpoint=endpoint, model=model, api_key=api_key)
    for b, c in sorted(res["per_benchmark"].items()):
        click.echo(f"{b:<10} refusals {c['refusal']:>4}   answers {c['answer']:>4}")
    short = "" if res["rows"] == size else f" (asked for {size}: not enough usable questions)"
    click.echo(f"wrote {res['rows']} examples{short}, {res['refusals']} refusals and {res['answers']} answers, "
               f"to {out}")
