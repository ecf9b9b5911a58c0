"""`hcnr-deploy eval`: parse options, call eval_harness.run.evaluate, print the tables."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from eval_harness.apicall import from_api
from eval_harness.benchmarks import HONESTY_BENCHMARKS
from eval_harness.env import API_KEY_ENVVARS, API_KEY_HELP
from eval_harness.prompts import APIS
from eval_harness.refusal import DETECTORS


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--endpoint", "endpoints", multiple=True, required=True, metavar="URL | NAME=URL",
              help="OpenAI-compatible base URL (http://host:8000 gets /v1 appended). Repeat as NAME=URL to send "
                   "model NAME to its own server.")
@click.option("--api-key", envvar=list(API_KEY_ENVVARS), default=None,
              help=f"API key for the endpoints ({API_KEY_HELP}; vLLM without --api-key accepts anything).")
@click.option("--models", default=None, metavar="A,B,...",
              help="Model names as the server serves them; the first is the reference for differences. "
                   "Default: the NAME=URL names, else every model the endpoint serves.")
@click.option("--benchmarks", default=",".join(HONESTY_BENCHMARKS), show_default=True,
              help="Honesty benchmarks, comma-separated, or 'none'.")
@click.option("--data-dir", type=click.Path(path_type=Path), envvar="HCNR_DATA_DIR", show_envvar=True,
              help="Folder with SelfAware.json, knowns_unknowns.jsonl, {FalseQA,NEC,RefuNQ}_{answerable,"
                   "unanswerable}.json[l] (searched in sub-folders).")
@click.option("--domain", "domain", multiple=True, type=click.Path(path_type=Path), metavar="PATH",
              help="Domain task JSONL, repeatable; named after the file. Lines {\"question\", \"answers\": [...]} "
                   "(normalised exact match or containment) or {\"question\", \"choices\": [...], \"answer\"} "
                   "(answer: index, letter or choice text).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most N items per task: a seeded sample keeping the answerable/unanswerable share.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --limit sampling and the bootstrap.")
@click.option("--concurrency", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests in flight per endpoint.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--api", type=click.Choice(APIS), default="chat", show_default=True,
              help="chat: chat completions (the server applies the model's chat template). completions: plain "
                   "completions of SelfAware's prompt ('Q: <question>\\nA:', --system-prompt and --icl turns "
                   "before it, stop at '\\nQ:'), for base models without a chat template.")
@click.option("--system-prompt", default=None, metavar="TEXT | @FILE", help="System message (or @file to read it).")
@click.option("--icl", type=click.IntRange(0, 8), default=0, show_default=True,
              help="K in-context exemplars that show uncertainty (the paper's ICL baseline), 0-8.")
@click.option("--detector", type=click.Choice(DETECTORS), default="auto", show_default=True,
              help="Refusal detector. auto: SelfAware's phrases for selfaware/kuq, UnknownBench's words for "
                   "falseqa/nec/refunq; honesty: Alignment-for-Honesty phrases; embedding: phrases + MiniLM "
                   "similarity >= 0.75 (offline); judge: an LLM through the same client.")
@click.option("--embedding-threshold", type=click.FloatRange(-1, 1), default=0.75, show_default=True,
              help="Cosine similarity at which --detector embedding counts a sentence as a refusal (SelfAware's "
                   "0.75, set for SimCSE; with MiniLM a paraphrase like 'Nobody knows the answer to that.' scores "
                   "about 0.6, so 0.75 is strict).")
@click.option("--judge-model", default=None, help="Model name for --detector judge.")
@click.option("--judge-endpoint", default=None, metavar="URL", help="Endpoint of the judge (default: the first).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="results.json",
              help="Write every setting, version, metric and interval here (atomically).")
@click.option("--log-samples", is_flag=True, help="Also store every prompt, response and verdict in --out.")
@click.option("--cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SQLite response cache: reruns send nothing twice, killed runs resume. Keyed by endpoint, model "
                   "name, the served weights' fingerprint, prompt and sampling.  [default: eval-cache.sqlite in "
                   "$HCNR_DEPLOY_CACHE, else $XDG_CACHE_HOME/hcnr-deploy, else ~/.cache/hcnr-deploy]")
@click.option("--no-cache", is_flag=True, help="Do not read or write the cache.")
@click.option("--trust-cache-names", is_flag=True,
              help="Also cache models whose weights cannot be fingerprinted here (a hub id, a path on another "
                   "machine, a server that reports no root), keyed by served name and reported root: a rerun "
                   "then trusts that the name still means the same weights. Without it, their answers are not "
                   "cached (a warning names them).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
              help="Seconds per request.")
@click.option("--max-retries", type=click.IntRange(min=0), default=5, show_default=True,
              help="Retries on 429, 5xx, timeouts and connection errors (exponential backoff).")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Bootstrap resamples for the 95% intervals.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(endpoints, api_key, models, benchmarks, data_dir, domain, limit, seed, concurrency, max_tokens,
             temperature, api, system_prompt, icl, detector, embedding_threshold, judge_model, judge_endpoint, out,
             log_samples, cache, no_cache, trust_cache_names, timeout, max_retries, n_boot, quiet):
    """Score models behind OpenAI-compatible endpoints on honesty benchmarks and print the comparison.

    \b
      hcnr-deploy eval --endpoint http://127.0.0.1:8000/v1 --models base,ft,repaired \\
          --data-dir data/ --limit 500 --domain medmcqa_test.jsonl --out results.json

    Metrics per benchmark and model: refusal rate on unanswerable and answerable items, F1 (unanswerable =
    positive, refused = predicted positive), RF Delta (refusal rate unanswerable - answerable), answer accuracy
    where gold answers exist, domain accuracy; bootstrap 95% intervals, and paired-bootstrap differences to the
    first model.
    """
    from rich.console import Console

    from eval_harness import report
    from eval_harness.client import DEFAULT_CACHE
    from eval_harness.errors import UserError
    from eval_harness.run import evaluate

    if system_prompt and system_prompt.startswith("@"):
        path = Path(system_prompt[1:])
        if not path.is_file():
            raise UserError(f"--system-prompt {system_prompt}: no such file")
        system_prompt = path.read_text(encoding="utf-8").strip()
    err = Console(stderr=True)
    try:
        results = evaluate(list(endpoints), models=models, benchmarks=benchmarks, data_dir=data_dir, domain=domain,
                           limit=limit, seed=seed, concurrency=concurrency, max_tokens=max_tokens,
                           temperature=temperature, system_prompt=system_prompt, icl=icl, detector=detector,
                           embedding_threshold=embedding_threshold,
                           judge_model=judge_model, judge_endpoint=judge_endpoint, api_key=api_key, timeout=timeout,
                           max_retries=max_retries, cache=None if no_cache else cache or DEFAULT_CACHE,
                           n_boot=n_boot, log_samples=log_samples, out=out, progress=not quiet, console=err,
                           command=_redacted_argv(), api=api, trust_cache_names=trust_cache_names)
    except KeyboardInterrupt:
        raise UserError("interrupted; the responses received so far are cached: rerun the same command to resume") \
            from None
    if from_api(click.get_current_context()):
        return results
    report.print_report(results)
    run = results["_run"]
    err.print(f"requests: {run['sent']} sent, {run['cached']} from cache"
              + (f", {run['retries']} retried" if run["retries"] else "")
              + (f", {run['errors']} rejected" if run["errors"] else "")
              + (f"; cache {results['config']['cache']}" if results["config"]["cache"] else "; no cache")
              + (f"; results written to {out}" if out else ""), soft_wrap=True, highlight=False)
    return results


def _redacted_argv() -> list[str] | None:
    argv, out, skip = sys.argv[1:], [], False
    if argv[:1] != ["eval"]:
        return None  # called through the API or a test runner: there is no command line to record
    for a in argv:
        if skip:
            out.append("***")
            skip = False
        elif a == "--api-key":
            out.append(a)
            skip = True
        elif a.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(a)
    return ["hcnr-deploy", *out]
