"""The guarded endpoint: a thin OpenAI-compatible front before the generation server(s) and the guard classifiers.

For a guarded name NAME, POST /v1/chat/completions scores the chat prompt with NAME's classifier (vLLM pooling
runner, POST /classify, raw score) and
- score > threshold: answers the guard's refusal text as a chat completion of NAME (non-streaming, or SSE chunks in
  OpenAI's format), usage = the classifier's prompt tokens + the refusal's tokens;
- otherwise: forwards the request, with `model` set to the fine-tune's served name, and returns the fine-tune's
  response bytes unchanged (streaming too). Its `model` field therefore names the fine-tune's served name (the
  engine that answered); the `x-hcnr-guard` header says `passed` or `refused`, `x-hcnr-guard-score` the score.
Every other request (other model names, /v1/completions, /tokenize, ...) passes straight through to the server that
serves its model. /v1/models lists the backends' models plus the guarded names. /health answers 200.
With an API key every request but /health needs `Authorization: Bearer KEY` (401 otherwise); the backends get the same key.

Run as `python -m hcnr_deploy.guard.front --config FRONT.json` (serve writes the file; the key comes from the
environment variable HCNR_FRONT_API_KEY so it does not show in `ps`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import Request  # module level: FastAPI resolves the handlers' string annotations in these globals

API_KEY_ENV = "HCNR_FRONT_API_KEY"


@dataclass
class GuardRoute:
    """One guarded name: its classifier (served name and server root URL), the fine-tune's served name, the rule."""

    name: str
    target: str
    classifier_url: str
    classifier_model: str
    threshold: float
    refusal_text: str
    tokenizer: str                  # folder whose tokenizer counts the refusal's tokens (the classifier's)


@dataclass
class FrontConfig:
    host: str
    port: int
    backends: dict[str, str]        # served model name -> root URL of the server that serves it (http://h:p)
    guards: dict[str, GuardRoute] = field(default_factory=dict)

    def write(self, path: Path):
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> FrontConfig:
        raw = json.loads(Path(path).read_text())
        raw["guards"] = {k: GuardRoute(**v) for k, v in raw["guards"].items()}
        return cls(**raw)


def _error(message: str, status: int, kind: str = "BadRequestError"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


def refusal_choice_text(tokenizer, refusal_ids: list[int], max_tokens: int | None) -> tuple[str, int, str]:
    """(text, completion tokens, finish_reason) of the refusal under a max_tokens cap (cut at the cap: 'length')."""
    if max_tokens is not None and 0 <= max_tokens < len(refusal_ids):
        return tokenizer.decode(refusal_ids[:max_tokens]), max_tokens, "length"
    return tokenizer.decode(refusal_ids), len(refusal_ids), "stop"


def refusal_completion(name: str, text: str, n: int, prompt_tokens: int, completion_tokens: int,
                       finish: str) -> dict:
    """A non-streaming chat.completion holding the refusal in each of the n choices."""
    choice = lambda i: {"index": i, "message": {"role": "assistant", "content": text, "refusal": None,  # noqa: E731
                                                 "tool_calls": []},
                        "logprobs": None, "finish_reason": finish, "stop_reason": None}
    return {"id": f"chatcmpl-guard-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": name, "choices": [choice(i) for i in range(n)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens * n,
                      "total_tokens": prompt_tokens + completion_tokens * n}}


def refusal_chunks(name: str, text: str, n: int, prompt_tokens: int, completion_tokens: int, finish: str,
                   include_usage: bool) -> list[bytes]:
    """The refusal as SSE chat.completion.chunk events (role, content, finish per choice; usage; [DONE])."""
    cid, created = f"chatcmpl-guard-{uuid.uuid4().hex}", int(time.time())

    def event(choices, usage=None):
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": choices}
        if include_usage:
            chunk["usage"] = usage
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    out = []
    for i in range(n):
        out.append(event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}]))
        out.append(event([{"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]))
        out.append(event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish,
                           "stop_reason": None}]))
    if include_usage:
        out.append(event([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens * n,
                              "total_tokens": prompt_tokens + completion_tokens * n}))
    out.append(b"data: [DONE]\n\n")
    return out


def classify_payload(route: GuardRoute, request: dict) -> dict:
    """The /classify request scoring `request`'s chat prompt as the fine-tune will see it (raw logit)."""
    payload = {"model": route.classifier_model, "messages": request["messages"], "add_generation_prompt": True,
               "use_activation": False}
    for key in ("chat_template", "chat_template_kwargs"):
        if request.get(key) is not None:
            payload[key] = request[key]
    return payload


def create_app(cfg: FrontConfig, api_key: str | None = None):
    """The FastAPI app of the front (one shared httpx client, the refusals' token ids computed once)."""
    import httpx
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.background import BackgroundTask
    from transformers import AutoTokenizer

    tokenizers = {n: AutoTokenizer.from_pretrained(r.tokenizer) for n, r in cfg.guards.items()}
    refusal_ids = {n: tokenizers[n].encode(r.refusal_text, add_special_tokens=False) for n, r in cfg.guards.items()}
    default_backend = next(iter(cfg.backends.values()))
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    state = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0)) as client:
            state["client"] = client
            yield

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path != "/health" and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": "Unauthorized"}, 401)
        return await call_next(request)

    async def forward(method: str, path: str, body: bytes, backend: str, query: str = "", headers=None):
        """The backend's response, bytes unchanged, streamed as they come."""
        client = state["client"]
        url = f"{backend}{path}" + (f"?{query}" if query else "")
        req = client.build_request(method, url, content=body or None, headers={
            "Content-Type": "application/json", "Accept-Encoding": "identity", **auth})
        resp = await client.send(req, stream=True)
        keep = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "cache-control")}
        return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code, headers={**keep, **(headers or {})},
                                 background=BackgroundTask(resp.aclose))

    async def score(route: GuardRoute, request: dict) -> tuple[float, int]:
        r = await state["client"].post(f"{route.classifier_url}/classify", json=classify_payload(route, request),
                                       headers=auth)
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
        out = r.json()
        return float(out["data"][0]["probs"][0]), int(out["usage"]["prompt_tokens"])

    async def guarded(route: GuardRoute, request: dict):
        if not isinstance(request.get("messages"), list):
            return _error("'messages' must be a list of chat messages.", 400)
        try:
            s, prompt_tokens = await score(route, request)
        except (RuntimeError, httpx.HTTPError) as e:
            return _error(f"guard {route.name}: the classifier failed ({e}).", 502, "BadGatewayError")
        headers = {"x-hcnr-guard-score": repr(s)}
        if s <= route.threshold:
            body = json.dumps({**request, "model": route.target}).encode()
            return await forward("POST", "/v1/chat/completions", body, cfg.backends[route.target],
                                 headers={**headers, "x-hcnr-guard": "passed"})
        headers["x-hcnr-guard"] = "refused"
        cap = request.get("max_completion_tokens", request.get("max_tokens"))
        text, ntok, finish = refusal_choice_text(tokenizers[route.name], refusal_ids[route.name], cap)
        n = int(request.get("n") or 1)
        if request.get("stream"):
            usage = bool((request.get("stream_options") or {}).get("include_usage"))
            chunks = refusal_chunks(route.name, text, n, prompt_tokens, ntok, finish, usage)
            return StreamingResponse(iter(chunks), media_type="text/event-stream", headers=headers)
        return JSONResponse(refusal_completion(route.name, text, n, prompt_tokens, ntok, finish), headers=headers)

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        data, seen = [], set()
        for backend in dict.fromkeys(cfg.backends.values()):
            r = await state["client"].get(f"{backend}/v1/models", headers=auth)
            for m in r.json().get("data", []):
                if m["id"] not in seen:
                    seen.add(m["id"])
                    data.append(m)
        by_id = {m["id"]: m for m in data}
        for name, route in cfg.guards.items():
            target = by_id.get(route.target, {})
            data.append({"id": name, "object": "model", "created": int(time.time()), "owned_by": "hcnr-deploy",
                         "root": route.target, "parent": target.get("root"),
                         "max_model_len": target.get("max_model_len"), "permission": []})
        return {"object": "list", "data": data}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def route(path: str, request: Request):
        body = await request.body()
        try:
            payload = json.loads(body) if body else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            payload = {}
        model = payload.get("model") if isinstance(payload, dict) else None
        if model in cfg.guards:
            if request.method == "POST" and request.url.path == "/v1/chat/completions":
                return await guarded(cfg.guards[model], payload)
            return _error(f"model {model!r} is a guarded chat model: it serves POST /v1/chat/completions only (the "
                          f"guard scores chat prompts); use {cfg.guards[model].target!r} for other endpoints.", 400)
        return await forward(request.method, request.url.path, body, cfg.backends.get(model, default_backend),
                             request.url.query)

    return app


def main(argv=None):
    import uvicorn

    ap = argparse.ArgumentParser(description="hcnr-deploy's guarded OpenAI-compatible front (started by serve)")
    ap.add_argument("--config", required=True, type=Path)
    args = ap.parse_args(argv)
    cfg = FrontConfig.read(args.config)
    app = create_app(cfg, os.environ.get(API_KEY_ENV) or None)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


if __name__ == "__main__":
    main()
