"""Async chat (or plain) completions against OpenAI-compatible endpoints: concurrency limit, retries, SQLite cache.

The cache key is (endpoint URL, model name, identity of what the endpoint serves under that name
(eval_harness.identity), messages or prompt, sampling parameters). Responses are committed within a fifth
of a second of arriving, so a rerun sends nothing twice and a killed run resumes where it stopped (re-sending only
what was in flight or arrived in its last fifth of a second).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from eval_harness.env import cache_root
from eval_harness.errors import UserError
from eval_harness.identity import model_identities

RETRY_STATUS = {408, 409, 429}
DEFAULT_CACHE = "default"  # evaluate(cache=DEFAULT_CACHE): default_cache_path(), resolved when the run starts


def default_cache_path() -> Path:
    """eval-cache.sqlite in the user cache folder the demo uses ($HCNR_DEPLOY_CACHE, $XDG_CACHE_HOME/hcnr-deploy,
    ~/.cache/hcnr-deploy)."""
    return cache_root() / "eval-cache.sqlite"


def resolve_cache_path(cache: str | Path | None) -> Path | None:
    return default_cache_path() if isinstance(cache, str) and cache == DEFAULT_CACHE else \
        None if cache is None else Path(cache).expanduser()


def normalize_url(url: str) -> str:
    """`http://host:8000` and `http://host:8000/` -> `http://host:8000/v1`; other paths are kept, minus a final /."""
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"endpoint {url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000/v1")
    url = url.rstrip("/")
    if parts.path in ("", "/"):
        url += "/v1"
    return url


def request_key(endpoint: str, model: str, messages: list[dict] | str, params: dict,
                served: dict | None = None) -> str:
    """sha256 of the request: `messages` (chat) or a prompt string (completions), and `served`, the identity of
    what the endpoint serves as `model` (eval_harness.identity.model_identities)."""
    prompt = {"prompt": messages} if isinstance(messages, str) else {"messages": messages}
    blob = json.dumps({"endpoint": endpoint, "model": model, **prompt, "params": params, "served": served},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Completion:
    text: str
    finish_reason: str | None = None
    cached: bool = False
    error: str | None = None


class ResponseCache:
    """SQLite table key -> response, in WAL mode. Responses are committed in small batches (every `flush_every`
    responses or `flush_s` seconds, and on close), so a killed run loses at most its last fraction of a second."""

    def __init__(self, path: str | Path | None, flush_every: int = 64, flush_s: float = 0.2):
        self.path = None if path is None else Path(path)
        self.flush_every, self.flush_s = flush_every, flush_s
        self._pending: dict[str, tuple] = {}
        self._last_flush = time.monotonic()
        try:
            if self.path is None:
                self.db = sqlite3.connect(":memory:")
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path)
                self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, endpoint TEXT, model TEXT, "
                            "request TEXT, text TEXT, finish_reason TEXT, created REAL)")
            self.db.commit()
        except (OSError, sqlite3.Error) as e:
            raise UserError(f"cannot use {self.path} as the response cache ({e}); pass --cache elsewhere or "
                            "--no-cache") from None

    def get(self, key: str) -> Completion | None:
        row = self._pending.get(key)
        if row is not None:
            return Completion(row[4], row[5], cached=True)
        row = self.db.execute("SELECT text, finish_reason FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else Completion(row[0], row[1], cached=True)

    def put(self, key: str, endpoint: str, model: str, request: dict, completion: Completion):
        self._pending[key] = (key, endpoint, model, json.dumps(request, ensure_ascii=False), completion.text,
                              completion.finish_reason, time.time())
        if len(self._pending) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self):
        if self._pending:
            self.db.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)",
                                list(self._pending.values()))
            self.db.commit()
            self._pending.clear()
        self._last_flush = time.monotonic()

    async def flush_periodically(self):
        """Run beside the requests so a burst of responses never waits for the next one to be committed."""
        while True:
            await asyncio.sleep(self.flush_s)
            self.flush()

    def __len__(self):
        self.flush()
        return self.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self):
        self.flush()
        self.db.close()


class ChatClient:
    """One AsyncOpenAI per endpoint, `concurrency` requests in flight per endpoint, retries with exponential backoff
    on 408/409/429/5xx, timeouts and connection errors. Non-retryable errors: a wrong model name or API key stops the
    run (UserError); a rejected request (400/422, e.g. a prompt longer than the context) is recorded as an error for
    that item and not cached."""

    def __init__(self, cache: ResponseCache, api_key: str | None = None, concurrency: int = 32,
                 timeout: float = 120.0, max_retries: int = 5, backoff: float = 0.5):
        if concurrency < 1:
            raise UserError(f"--concurrency must be at least 1, got {concurrency}")
        self.cache, self.api_key, self.concurrency = cache, api_key or "EMPTY", concurrency
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self._clients: dict[str, object] = {}
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._cards: dict[str, dict[str, dict]] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self.sent = self.cached = self.retries = self.errors = 0

    def _client(self, endpoint: str):
        if endpoint not in self._clients:
            from openai import AsyncOpenAI

            self._clients[endpoint] = AsyncOpenAI(base_url=endpoint, api_key=self.api_key, max_retries=0,
                                                  timeout=self.timeout)
            self._sems[endpoint] = asyncio.Semaphore(self.concurrency)
        return self._clients[endpoint]

    async def served_models(self, endpoint: str, timeout: float = 15.0) -> list[str]:
        return list(await self.served_cards(endpoint, timeout))

    async def served_cards(self, endpoint: str, timeout: float = 15.0) -> dict[str, dict]:
        """{id: model card as a dict} from `GET /models` (asked once per endpoint and client)."""
        import openai

        if endpoint in self._cards:
            return self._cards[endpoint]
        try:
            page = await self._client(endpoint).models.list(timeout=timeout)
        except openai.APIConnectionError as e:
            raise UserError(f"cannot reach endpoint {endpoint} ({_cause(e)}); is the server running? "
                            "Check --endpoint") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError):
            raise UserError(f"endpoint {endpoint} rejected the API key; pass the right one with --api-key") from None
        except openai.APIStatusError as e:
            raise UserError(f"endpoint {endpoint} answered GET /models with HTTP {e.status_code}; "
                            "is it an OpenAI-compatible /v1 URL?") from None
        cards = self._cards[endpoint] = {m.id: m.model_dump() for m in page.data}
        return cards

    async def check_models(self, endpoint: str, models: list[str]) -> dict[str, dict]:
        """Raise unless `endpoint` serves every model; return their identities (eval_harness.identity)."""
        cards = await self.served_cards(endpoint)
        missing = [m for m in models if m not in cards]
        if missing:
            raise UserError(f"model(s) {', '.join(missing)} not served by {endpoint} "
                            f"(it serves: {', '.join(cards) or 'nothing'}); fix --models or --endpoint")
        identities = model_identities(cards)
        return {m: identities[m] for m in models}

    async def complete(self, endpoint: str, model: str, messages: list[dict] | str, params: dict,
                       key: str | None = None, use_cache: bool = True) -> Completion:
        """Chat completion of `messages`, or plain completion of a prompt string; from the cache when there (and
        `use_cache`)."""
        key = key or request_key(endpoint, model, messages, params)
        hit = self.cache.get(key) if use_cache else None
        if hit is not None:
            self.cached += 1
            return hit
        if key in self._inflight:  # the same request (a duplicate question) is on its way: wait for it
            completion = await asyncio.shield(self._inflight[key])
            self.cached += 1
            return Completion(completion.text, completion.finish_reason, cached=True, error=completion.error)
        future = self._inflight[key] = asyncio.get_running_loop().create_future()
        try:
            completion = await self._send(endpoint, model, messages, params)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # mark it retrieved: with no duplicate waiting, asyncio would log it again
            raise
        finally:
            del self._inflight[key]
        future.set_result(completion)
        if completion.error is None and use_cache:
            self.cache.put(key, endpoint, model, {"messages": messages, "params": params}, completion)
        return completion

    async def _send(self, endpoint: str, model: str, messages: list[dict] | str, params: dict) -> Completion:
        import openai

        client = self._client(endpoint)
        sem = self._sems[endpoint]
        for attempt in range(self.max_retries + 1):
            try:
                async with sem:
                    self.sent += 1
                    if isinstance(messages, str):
                        r = await client.completions.create(model=model, prompt=messages, **params)
                    else:
                        r = await client.chat.completions.create(model=model, messages=messages, **params)
                choice = r.choices[0]
                text = choice.text if isinstance(messages, str) else choice.message.content
                return Completion(text or "", choice.finish_reason)
            except openai.NotFoundError as e:
                raise UserError(f"{endpoint} does not serve model {model!r} ({_body(e)}); fix --models") from None
            except (openai.AuthenticationError, openai.PermissionDeniedError):
                raise UserError(f"endpoint {endpoint} rejected the API key; pass the right one with --api-key") \
                    from None
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                self.errors += 1
                return Completion("", None, error=f"HTTP {e.status_code}: {_body(e)}")
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                status = getattr(e, "status_code", None)
                if status is not None and status < 500 and status not in RETRY_STATUS:
                    raise UserError(f"{endpoint} answered HTTP {status} for model {model!r}: {_body(e)}") from None
                if attempt == self.max_retries:
                    what = (f"HTTP {status}" if status else f"no answer within --timeout {self.timeout:g}s"
                            if isinstance(e, openai.APITimeoutError) else _cause(e))
                    raise UserError(f"{endpoint} failed {self.max_retries + 1} times for model {model!r} ({what}); "
                                    "responses so far are cached, rerun to resume") from None
                self.retries += 1
                await asyncio.sleep(_retry_delay(e, self.backoff, attempt))
        raise AssertionError("unreachable")

    async def aclose(self):
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
        self._cards.clear()


def _retry_delay(e, backoff: float, attempt: int) -> float:
    response = getattr(e, "response", None)
    if response is not None:
        try:
            return min(float(response.headers.get("retry-after")), 60.0)
        except (TypeError, ValueError):
            pass
    return min(backoff * 2 ** attempt, 30.0) * random.uniform(0.75, 1.25)


def _body(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error")
        msg = body.get("message") or (err.get("message") if isinstance(err, dict) else err)
        if msg:
            return str(msg).splitlines()[0]
    return str(getattr(e, "message", e)).splitlines()[0]


def _cause(e) -> str:
    while getattr(e, "__cause__", None) is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
