"""The `hcnr-deploy serve` command: parse, plan, print or run in the foreground."""

from __future__ import annotations

from pathlib import Path

import click

from eval_harness.env import API_KEY_ENVVARS, API_KEY_HELP
from hcnr_deploy.serve.plan import parse_named_paths, plan_servers


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base", type=click.Path(path_type=Path), help="Base model folder or hub id; served as --served-name, "
              "with every --adapter on the same engine.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="A PEFT LoRA adapter of --base, served as NAME (repeatable; one engine, --enable-lora).")
@click.option("--checkpoint", "checkpoints", multiple=True, metavar="NAME=PATH",
              help="A full model folder served as NAME on its own server, on the ports after --port (repeatable).")
@click.option("--guard", "guards", multiple=True, metavar="NAME=GUARD_DIR",
              help="Serve the guard folder's fine-tune behind its honesty guard as NAME (repeatable): a front on "
              "--port routes NAME and passes every other name through (see README, 'Serving the guard').")
@click.option("--served-name", default="base", show_default=True, help="Served model name of --base.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 for all).")
@click.option("--port", default=8000, show_default=True, type=int,
              help="Port of the base server; checkpoint servers use the next ones.")
@click.option("--api-key", envvar=list(API_KEY_ENVVARS), default=None,
              help=f"Require this bearer key on /v1 requests ({API_KEY_HELP}).")
@click.option("--max-model-len", type=int, default=None, help="Context length (vLLM's default: the model's).")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]), help="Weight and activation dtype.")
@click.option("--startup-timeout", default=600.0, show_default=True, type=float,
              help="Seconds to wait for every server's /health.")
@click.option("--log-dir", type=click.Path(path_type=Path), default=None,
              help="Where the vLLM logs go (default: a new temporary folder).")
@click.option("--smoke-check/--no-smoke-check", "smoke", default=True, show_default=True,
              help="After start, check that each adapter's greedy reply differs from the base's.")
@click.option("--print-command", is_flag=True, help="Print the vLLM command(s) and environment; start nothing.")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_ARGS...]")
def serve(base, adapters, checkpoints, guards, served_name, host, port, api_key, max_model_len, dtype,
          startup_timeout, log_dir, smoke, print_command, vllm_args):
    """Serve base, fine-tuned and repaired models behind vLLM's OpenAI-compatible API.

    \b
      hcnr-deploy serve --base BASE --adapter ft=FT_LORA --adapter repaired=OUT
      hcnr-deploy serve --base BASE --checkpoint repaired=OUT_CKPT --port 8000   (base :8000, repaired :8001)
      hcnr-deploy serve --base BASE --adapter ft=FT -- --gpu-memory-utilization 0.8
      hcnr-deploy serve --guard guarded=GUARD_DIR   (the guarded fine-tune on :8000, engines on :8001...)

    LoRA flags (--max-lora-rank, --max-loras, --lora-target-modules) are derived from the adapters.
    Everything after `--` goes to every vLLM server untouched. Ctrl-C or SIGTERM stops all servers.
    """
    from rich.console import Console

    if guards:
        from hcnr_deploy.guard.launch import serve_guarded


    if guards:
        from hcnr_deploy.guard.launch import serve_guarded

        return serve_guarded(parse_named_paths(guards, "--guard"), base, parse_named_paths(adapters, "--adapter"),
                             parse_named_paths(checkpoints, "--checkpoint"), served_name, host, port, api_key,
                             max_model_len, dtype, startup_timeout, log_dir, smoke, print_command, vllm_args)
    console = Console(stderr=True)
    plans = plan_servers(base, parse_named_paths(adapters, "--adapter"), parse_named_paths(checkpoints, "--checkpoint"),
                         served_name, host, port, api_key, max_model_len, dtype, list(vllm_args),
                         check_ports=not print_command)
    for p in plans:
        for note in p.notes:
            console.print(f"[yellow]warning:[/] {note}")
    if any(p.placement for p in plans):
        console.print("GPU plan: " + "; ".join(p.placement for p in plans), highlight=False)
    if print_command:
        for p in plans:
            click.echo(f"# {', '.join(p.models)} on {p.base_url}")
            click.echo(p.shell_command())
        return
    from hcnr_deploy.serve.foreground import run_foreground

    run_foreground(plans, log_dir, startup_timeout, smoke, console)
