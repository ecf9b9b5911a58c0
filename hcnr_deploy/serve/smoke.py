"""Requests to a running server and the smoke check: each adapter's greedy reply must differ from its base's,
unless the adapter changes (next to) nothing (`lora.adapter_weight_change`); `serve_models` = plan + start + check."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from pathlib import Path

import click

from hcnr_deploy.serve.lora import TINY_WEIGHT_CHANGE, adapter_weight_change
from hcnr_deploy.serve.plan import plan_servers
from hcnr_deploy.serve.process import RunningServer, ServeError, serving

SMOKE_PROMPT = "Question: What is the capital of France?\nAnswer:"
SMOKE_TOKENS = 16


def request_json(url: str, payload: dict | None = None, api_key: str | None = None, timeout: float = 120) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def greedy_reply(server: RunningServer, model: str, prompt=SMOKE_PROMPT, max_tokens: int = SMOKE_TOKENS) -> dict:
    """The greedy completion of `prompt` by `model`: {"text", "logprobs"} (token logprobs of the reply)."""
    out = request_json(f"{server.base_url}/completions",
                       {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                        "logprobs": 0, "ignore_eos": True}, server.plan.api_key)
    choice = out["choices"][0]
    return {"text": choice["text"], "logprobs": choice["logprobs"]["token_logprobs"]}


def replies_differ(a: dict, b: dict, tol: float = 1e-5) -> bool:
    """Different text, or any token logprob apart by more than `tol` (same model, same weights: identical)."""
    return a["text"] != b["text"] or any(abs(x - y) > tol for x, y in zip(a["logprobs"], b["logprobs"]))


def smoke_verdict(name: str, adapter: Path, base_name: str, base: Path, targeted: list[str]) -> str:
    """For an adapter that replied exactly like its base: the warning when its weights change (next to) nothing;
    a ServeError when they do change the model, so vLLM is not applying them."""
    change = adapter_weight_change(adapter, base)
    if change == 0:
        return (f"adapter {name!r} changes no weight (s B A = 0 in every matrix): it serves the same model as "
                f"{base_name!r}.")
    if change < TINY_WEIGHT_CHANGE:
        return (f"adapter {name!r} replies exactly like {base_name!r}: it changes its matrices by at most "
                f"{change:.1e} (||s B A|| / ||W0||), too little to show in a reply, so serve cannot tell whether "
                f"vLLM applies it; serving it.")
    raise ServeError(f"smoke check failed: adapter {name!r} ({adapter}) changes its matrices by up to {change:.2g} "
                     f"(||s B A|| / ||W0||) but replies exactly like base {base_name!r} to {SMOKE_PROMPT!r}: vLLM "
                     f"is not applying it (modules targeted: {targeted}).")


def _warn(adapter: str, message: str):
    click.echo(f"warning: {message}", err=True)


def smoke_check(servers: list[RunningServer], warn=_warn) -> dict[str, dict]:
    """Each adapter's greedy reply to SMOKE_PROMPT must differ from its base's (vLLM silently ignores an adapter
    whose modules it does not target), unless the adapter's weights change (next to) nothing: then
    `warn(adapter name, message)` (default: a line on stderr).
    Returns the replies by served name; raises ServeError otherwise."""
    replies: dict[str, dict] = {}
    for s in servers:
        base = replies[s.plan.name] = greedy_reply(s, s.plan.name)
        for name, path in s.plan.adapters.items():
            replies[name] = greedy_reply(s, name)
            if not replies_differ(replies[name], base):
                warn(name, smoke_verdict(name, path, s.plan.name, s.plan.model,
                                   s.plan.lora.target_modules if s.plan.lora else []))
    return replies


@contextlib.contextmanager
def serve_models(base=None, adapters=None, checkpoints=None, *, served_name="base", host="127.0.0.1", port=8000,
                 api_key=None, max_model_len=None, dtype="auto", extra_args=(), log_dir=None, timeout=600,
                 smoke=True):
    """Plan, start, smoke-check and yield the servers (list of RunningServer); stop them on exit."""
    plans = plan_servers(base, adapters, checkpoints, served_name, host, port, api_key, max_model_len, dtype,
                         extra_args)
    with serving(plans, log_dir, timeout) as servers:
        if smoke:
            smoke_check(servers)
        yield servers

