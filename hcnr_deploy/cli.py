"""The `hcnr-deploy` command: a click group whose subcommands load lazily.

Each subcommand lives beside the code it drives; importing them only when
invoked keeps `--help` fast and keeps torch out of `hcnr-deploy eval`.
"""

import importlib

import click

from hcnr_deploy import __version__

SUBCOMMANDS = {
    "repair": ("hcnr_deploy.cli_repair", "repair"),
    "sweep": ("hcnr_deploy.sweep", "sweep"),
    "guard": ("hcnr_deploy.guard.cli", "guard"),
    "probe": ("hcnr_deploy.probe.cli", "probe"),
    "serve": ("hcnr_deploy.serve", "serve"),
    "eval": ("eval_harness.cli", "eval_cmd"),
    "demo": ("hcnr_deploy.scenario.cli", "demo"),
    "data": ("hcnr_deploy.benchdata.cli", "data"),
}

HELP = {
    "repair": "Compute the HCNR edit of a fine-tune and write an adapter or checkpoint.",
    "sweep": "Measure the honesty/domain frontier of repair methods on your model; ship the chosen point.",
    "guard": "Fit the honesty guard: a probe that refuses for the fine-tune what it cannot answer.",
    "probe": "Linear probes: does the model still tell answerable from unanswerable (Observation 2)?",
    "serve": "Serve base, fine-tuned and repaired models behind vLLM's OpenAI API.",
    "eval": "Score OpenAI-compatible models on honesty benchmarks.",
    "demo": "Run the embedded base / fine-tune / repair / serve / eval scenario.",
    "data": "Fetch the honesty benchmarks, split them, build honesty calibration data (fetch, split, honesty).",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(SUBCOMMANDS)

    def get_command(self, ctx, name):
        if name not in SUBCOMMANDS:
            return None
        module, attr = SUBCOMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, HELP[name]) for name in SUBCOMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hcnr-deploy")
def main():
    """Repair the honesty of a fine-tuned LLM (HCNR), serve it with vLLM, and measure it.

    \b
      hcnr-deploy repair --base BASE --finetuned FT --honesty-data H.jsonl --task-data T.jsonl --out OUT
      hcnr-deploy sweep  --base BASE --finetuned FT --honesty-data H.jsonl --task-data T.jsonl \\
                         --eval-honesty DATA --eval-domain D.jsonl --out SWEEP   (then serve SWEEP/chosen)
      hcnr-deploy guard  --base BASE --finetuned FT --honesty-data H.jsonl --task-data T.jsonl --out GUARD
      hcnr-deploy serve  --base BASE --adapter ft=FT --adapter repaired=OUT --guard guarded=GUARD
      hcnr-deploy eval   --endpoint http://127.0.0.1:8000/v1 --models base,ft,repaired
      hcnr-deploy probe  --model FT --reference BASE --data-dir DATA --out PROBE
      hcnr-deploy demo   (the whole story on an embedded scenario)
      hcnr-deploy data   fetch | split --out SPLIT | honesty --data-dir SPLIT/calibration --out H.jsonl
    """


if __name__ == "__main__":
    main()
