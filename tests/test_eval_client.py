"""ChatClient logic against eval_harness.fakeserver (in-process): retries, error mapping, the SQLite cache.

These are unit tests of our own retry/cache code; the real-server evidence is in test_eval_e2e.py.
"""

import asyncio
import socket

import pytest

from eval_harness.client import ChatClient, ResponseCache, normalize_url, request_key
from eval_harness.errors import UserError
from eval_harness.fakeserver import FakeServer, reply_text

MSGS = [{"role": "user", "content": "What is the capital of France?"}]
PARAMS = {"temperature": 0.0, "max_tokens": 8}


def run_with_server(server: FakeServer, body, cache_path=None, **client_kw):
    """Start `server` on a free port in this loop, run `body(client, url)`, return its result."""

    async def main():
        srv = await asyncio.start_server(server._connection, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1"
        cache = ResponseCache(cache_path)
        client = ChatClient(cache, backoff=0.01, **client_kw)
        try:
            return await body(client, url)
        finally:
            await client.aclose()
            cache.close()
            srv.close()

    return asyncio.run(main())


def test_normalize_url():
    assert normalize_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalize_url("http://h:1/v1/") == "http://h:1/v1"
    assert normalize_url("https://api.example.com/openai/v1") == "https://api.example.com/openai/v1"
    with pytest.raises(UserError, match="not an http"):
        normalize_url("127.0.0.1:8000")


def test_key_depends_on_every_part():
    k = request_key("http://a/v1", "m", MSGS, PARAMS)
    assert k == request_key("http://a/v1", "m", [dict(MSGS[0])], dict(reversed(list(PARAMS.items()))))
    assert len({k, request_key("http://b/v1", "m", MSGS, PARAMS), request_key("http://a/v1", "n", MSGS, PARAMS),
                request_key("http://a/v1", "m", MSGS + MSGS, PARAMS),
                request_key("http://a/v1", "m", MSGS, {**PARAMS, "max_tokens": 9})}) == 5


@pytest.mark.parametrize("status", [503, 429, 500])
def test_retries_transient_errors(status, tmp_path):
    server = FakeServer(["m"], fail_first=2, fail_status=status)

    async def body(client, url):
        c = await client.complete(url, "m", MSGS, PARAMS)
        return c, client

    c, client = run_with_server(server, body, tmp_path / "c.sqlite")
    assert c.text == reply_text(MSGS, "m") and not c.cached
    assert client.retries == 2 and server.requests == 3 and server.completions == 1


def test_gives_up_after_max_retries_with_clear_message():
    server = FakeServer(["m"], fail_first=100, fail_status=503)

    async def body(client, url):
        await client.complete(url, "m", MSGS, PARAMS)

    with pytest.raises(UserError, match=r"failed 3 times for model 'm' \(HTTP 503\); responses so far are cached"):
        run_with_server(server, body, max_retries=2)
    assert server.requests == 3


def test_per_request_timeout_is_retried_then_reported():
    server = FakeServer(["m"], delay=1.0)

    async def body(client, url):
        await client.complete(url, "m", MSGS, PARAMS)

    with pytest.raises(UserError, match=r"failed 2 times for model 'm' \(no answer within --timeout 0.2s\)"):
        run_with_server(server, body, timeout=0.2, max_retries=1)


def test_unknown_model_and_unreachable_endpoint():
    async def body(client, url):
        with pytest.raises(UserError, match=r"model\(s\) nope not served by .* \(it serves: m, m2\); fix --models"):
            await client.check_models(url, ["m", "nope"])
        with pytest.raises(UserError, match="does not serve model 'nope'"):
            await client.complete(url, "nope", MSGS, PARAMS)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        with pytest.raises(UserError, match=r"cannot reach endpoint http://127\.0\.0\.1:\d+/v1 .*is the server running"):
            await client.check_models(dead, ["m"])

    run_with_server(FakeServer(["m", "m2"]), body)


def test_cache_sends_nothing_twice_and_survives_reopen(tmp_path):
    server = FakeServer(["m"])
    path = tmp_path / "cache.sqlite"

    async def body(client, url):
        first = await asyncio.gather(*(client.complete(url, "m", [{"role": "user", "content": f"q{i}"}], PARAMS)
                                       for i in range(20)))
        again = await client.complete(url, "m", [{"role": "user", "content": "q3"}], PARAMS)
        return first, again, client

    first, again, client = run_with_server(server, body, path, concurrency=4)
    assert server.completions == 20 and again.cached and again.text == first[3].text
    assert (client.sent, client.cached) == (20, 1)

    async def duplicates(client, url):  # the same request twice at once (a duplicate question) is sent once
        return await asyncio.gather(*(client.complete(url, "m", [{"role": "user", "content": "dup"}], PARAMS)
                                      for _ in range(3)))

    server_d = FakeServer(["m"])
    d = run_with_server(server_d, duplicates)
    assert server_d.completions == 1 and [c.cached for c in d] == [False, True, True]
    assert len({c.text for c in d}) == 1
    cache = ResponseCache(path)
    assert len(cache) == 20
    cache.close()

    async def body2(client, url):
        return await client.complete(url, "m", [{"role": "user", "content": "q7"}], PARAMS)

    server2 = FakeServer(["m"])
    c = run_with_server(server2, body2, path)
    # a different port is a different endpoint: the key includes it, so this one is sent
    assert server2.completions == 1 and not c.cached


def test_unusable_cache_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "cache.sqlite"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(UserError, match="cannot use .*cache.sqlite as the response cache.*--no-cache"):
        ResponseCache(bad)
