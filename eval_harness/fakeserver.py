"""A minimal OpenAI-compatible server that answers at once (raw asyncio HTTP/1.1, keep-alive).

For measuring the harness's own overhead (benchmarks/bench_eval_overhead.py) and for unit tests of the client's
retry logic. Not a model: the reply is a fixed function of the last user message.

    python -m eval_harness.fakeserver --port 8123 [--models a,b] [--roots DIR] [--fail-first 3 --fail-status 503]
        [--delay 0.5]

`GET /v1/models` reports, like vLLM, a `root` per model: DIR/<model> with --roots, else the model name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import zlib

REASONS = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
           503: "Service Unavailable"}


def reply_text(messages: list[dict], model: str = "") -> str:
    """"The answer is unknown." for about half the questions (which half depends on the model), else an echo."""
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    return "The answer is unknown." if zlib.crc32(f"{model}|{last}".encode()) % 2 else f"Echo: {str(last)[:40]}"


class FakeServer:
    def __init__(self, models=("fake",), fail_first: int = 0, fail_status: int = 503, delay: float = 0.0,
                 roots: dict[str, str] | None = None):
        self.models, self.fail_first, self.fail_status, self.delay = list(models), fail_first, fail_status, delay
        self.roots = dict(roots or {})
        self.requests = 0  # (chat) completion requests received, failures included
        self.completions = 0  # (chat) completion requests answered with 200

    def _handle(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method == "GET" and path.endswith("/models"):
            return 200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fake",
                                                      "root": self.roots.get(m, m), "parent": None}
                                                     for m in self.models]}
        if method == "GET" and path == "/stats":
            return 200, {"requests": self.requests, "completions": self.completions}
        if method == "POST" and path.endswith("/completions"):
            self.requests += 1
            if self.requests <= self.fail_first:
                return self.fail_status, {"error": {"message": "injected failure", "code": self.fail_status}}
            req = json.loads(body or b"{}")
            if req.get("model") not in self.models:
                return 404, {"error": {"message": f"The model `{req.get('model')}` does not exist.", "code": 404}}
            self.completions += 1
            usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            if path.endswith("/chat/completions"):
                text = reply_text(req.get("messages", []), req["model"])
                return 200, {"id": f"chatcmpl-{self.completions}", "object": "chat.completion", "created": 0,
                             "model": req["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}], "usage": usage}
            text = reply_text([{"role": "user", "content": str(req.get("prompt", ""))}], req["model"])
            return 200, {"id": f"cmpl-{self.completions}", "object": "text_completion", "created": 0,
                         "model": req["model"], "choices": [{"index": 0, "text": " " + text, "finish_reason": "stop"}],
                         "usage": usage}
        return 404, {"error": {"message": f"no route {method} {path}"}}

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", 0) or 0))
                if self.delay and path.endswith("/completions"):
                    await asyncio.sleep(self.delay)
                status, payload = self._handle(method, path, body)
                data = json.dumps(payload).encode()
                writer.write(f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def serve(self, host: str = "127.0.0.1", port: int = 0, ready=None):
        server = await asyncio.start_server(self._connection, host, port, backlog=1024)
        if ready is not None:
            ready(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--models", default="fake")
    ap.add_argument("--roots", default=None, help="report DIR/<model> as each model's root")
    ap.add_argument("--fail-first", type=int, default=0)
    ap.add_argument("--fail-status", type=int, default=503)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds before each chat completion answer")
    args = ap.parse_args()
    models = args.models.split(",")
    roots = {m: f"{args.roots.rstrip('/')}/{m}" for m in models} if args.roots else None
    srv = FakeServer(models, args.fail_first, args.fail_status, args.delay, roots)
    asyncio.run(srv.serve(args.host, args.port, ready=lambda p: print(f"PORT {p}", flush=True)))


if __name__ == "__main__":
    main()
