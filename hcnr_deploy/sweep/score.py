"""The sweep's scoring: every candidate served (LoRA: adapters on one vLLM engine; full fine-tune: one checkpoint
server after another) or found at --endpoint, and scored by the eval harness; results merged."""

from __future__ import annotations

import contextlib
import time


def serve_and_score(names, artifacts, is_lora, eval_kwargs, *, endpoint, port, vllm_args, serve_dtype,
                    max_model_len, startup_timeout, log_dir, console, api_key=None):
    """Results of the eval harness for every name (samples merged when checkpoints are served one by one), the
    seconds spent serving (starts and stops) and evaluating, and the harness's request counts per run."""
    from eval_harness import evaluate
    from hcnr_deploy.serve import serve_models

    serve_s = eval_s = 0.0
    runs = []
    if endpoint:
        t0 = time.perf_counter()
        res = evaluate(endpoint, models=names, **eval_kwargs)
        runs.append(res.pop("_run", None))
        return res, 0.0, round(time.perf_counter() - t0, 3), runs
    groups = ([("base", {n: artifacts[n] for n in names if n != "base"}, {})] if is_lora else
              [(None, {}, {n: artifacts[n]}) for n in names])
    merged = None
    for base_name, adapters, checkpoints in groups:
        models = [*(["base"] if base_name else []), *adapters, *checkpoints]
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            with console.status(f"starting vLLM ({', '.join(models)[:60]})..."):
                servers = stack.enter_context(serve_models(
                    artifacts["base"] if base_name else None, adapters, checkpoints, port=port,
                    max_model_len=max_model_len, dtype=serve_dtype, extra_args=vllm_args, api_key=api_key,
                    log_dir=log_dir, timeout=startup_timeout))
            t1 = time.perf_counter()
            serve_s += t1 - t0
            res = evaluate(servers[0].base_url, models=models, **eval_kwargs)
            runs.append(res.pop("_run", None))
            t2 = time.perf_counter()
            eval_s += t2 - t1
        serve_s += time.perf_counter() - t2
        merged = res if merged is None else merge_results(merged, res)
    return merged, round(serve_s, 3), round(eval_s, 3), runs


def merge_results(merged: dict, res: dict) -> dict:
    """`res` (the eval harness's results of other models on the same questions) merged into `merged`."""
    merged["results"].update(res["results"])
    merged["samples"].update(res["samples"])
    merged.setdefault("_identities", {}).update(res.get("_identities") or {})
    config = merged.get("config")
    if config is not None:
        config["models"] = [*config.get("models", []), *[m for m in res["results"] if m not in config["models"]]]
        config.setdefault("endpoints", {}).update((res.get("config") or {}).get("endpoints") or {})
    return merged
