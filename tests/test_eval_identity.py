"""The cache's identity of what is served: weight fingerprints, `/v1/models` identities, and the cache policy of
the pipeline (unit tests against eval_harness.fakeserver; the real-server evidence is in test_eval_e2e.py)."""

import asyncio
import json
import os
import sqlite3
import struct
import threading

import pytest

from eval_harness.client import request_key
from eval_harness.errors import UserError
from eval_harness.fakeserver import FakeServer
from eval_harness.identity import is_known, model_identities, safetensors_header_sha256, weights_fingerprint
from test_eval_data import write_jsonl


def write_safetensors(path, shapes: dict[str, tuple[int, ...]], fill: int = 0):
    """A valid float32 safetensors file with the given tensor shapes, every byte of the data = `fill`."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes([fill]) * offset)
    return path


def make_adapter(folder, fill=0, shapes=None, rank=4):
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "adapter_model.safetensors", shapes or {"a": (rank, 8), "b": (8, rank)}, fill)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 8}))
    return folder


def test_safetensors_header_hash_covers_exactly_the_header(tmp_path):
    a = write_safetensors(tmp_path / "a.safetensors", {"w": (2, 3)}, fill=0)
    b = write_safetensors(tmp_path / "b.safetensors", {"w": (2, 3)}, fill=7)  # same header, other data
    c = write_safetensors(tmp_path / "c.safetensors", {"w": (3, 2)}, fill=0)
    assert safetensors_header_sha256(a) == safetensors_header_sha256(b) != safetensors_header_sha256(c)
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")  # truncated: hashed as far as it goes, no error
    assert len(safetensors_header_sha256(tmp_path / "short.safetensors")) == 64


def test_fingerprint_stable_and_changes_with_the_weights(tmp_path):
    ad = make_adapter(tmp_path / "ad")
    fp = weights_fingerprint(ad)
    assert fp and fp == weights_fingerprint(ad) == weights_fingerprint(str(ad))
    st = (ad / "adapter_model.safetensors").stat()

    # other values, same shapes and size, rewritten: the mtime tells
    write_safetensors(ad / "adapter_model.safetensors", {"a": (4, 8), "b": (8, 4)}, fill=9)
    os.utime(ad / "adapter_model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    fp2 = weights_fingerprint(ad)
    assert fp2 != fp
    # same mtime and size restored but another header (other shapes, same byte count): the header hash tells
    write_safetensors(ad / "adapter_model.safetensors", {"a": (8, 4), "b": (4, 8)}, fill=0)
    os.utime(ad / "adapter_model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (ad / "adapter_model.safetensors").stat().st_size == st.st_size
    assert weights_fingerprint(ad) not in (fp, fp2)
    # back to the original bytes and mtime: the original fingerprint
    write_safetensors(ad / "adapter_model.safetensors", {"a": (4, 8), "b": (8, 4)}, fill=0)
    os.utime(ad / "adapter_model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights_fingerprint(ad) == fp
    # the adapter's settings (e.g. its scaling) are part of it; an unrelated file is not
    (ad / "README.md").write_text("notes")
    assert weights_fingerprint(ad) == fp
    (ad / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16}))
    assert weights_fingerprint(ad) != fp
    # a new shard is part of it
    (ad / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    assert weights_fingerprint(ad) == fp
    (ad / "extra.bin").write_bytes(b"x")
    assert weights_fingerprint(ad) != fp


def test_fingerprint_unknown_without_readable_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert weights_fingerprint(tmp_path / "empty") is None  # no weight file
    assert weights_fingerprint(tmp_path / "missing") is None
    assert weights_fingerprint("HuggingFaceTB/SmolLM2-135M") is None  # a hub id (relative: not this machine's)
    assert weights_fingerprint(None) is None and weights_fingerprint("") is None
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" * 10)
    assert weights_fingerprint(gguf)


def test_identities_include_the_parent(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    write_safetensors(base / "model.safetensors", {"w": (4, 4)})
    ad = make_adapter(tmp_path / "ad")
    cards = {"base": {"id": "base", "root": str(base)}, "ft": {"id": "ft", "root": str(ad), "parent": "base"},
             "remote": {"id": "remote", "root": "org/model"}, "orphan": {"id": "orphan", "root": str(ad),
                                                                         "parent": "gone"}}
    ids = model_identities(cards)
    assert ids["ft"]["parent_weights"] == ids["base"]["weights"] == weights_fingerprint(base)
    assert is_known(ids["base"]) and is_known(ids["ft"])
    assert not is_known(ids["remote"]) and not is_known(ids["orphan"])  # parent not listed: unknown
    before = request_key("u", "ft", [{"role": "user", "content": "q"}], {}, ids["ft"])
    write_safetensors(base / "model.safetensors", {"w": (2, 8)})  # the base changes: so does the adapter's key
    after = request_key("u", "ft", [{"role": "user", "content": "q"}], {}, model_identities(cards)["ft"])
    assert before != after
    assert request_key("u", "m", "Q: q\nA:", {}) != request_key("u", "m", [{"role": "user", "content": "Q: q\nA:"}], {})


# ---- the pipeline's cache policy, against the fake server in a thread ---------------------------------------------


class ThreadedServer:
    def __init__(self, server: FakeServer):
        self.server, ready = server, threading.Event()
        self.loop = asyncio.new_event_loop()

        def run():
            asyncio.set_event_loop(self.loop)

            async def main():
                srv = await asyncio.start_server(server._connection, "127.0.0.1", 0)
                self.url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1"
                self._srv = srv
                ready.set()
                await srv.serve_forever()

            try:
                self.loop.run_until_complete(main())
            except asyncio.CancelledError:
                pass

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def close(self):
        self.loop.call_soon_threadsafe(self._srv.close)


@pytest.fixture
def fake(tmp_path):
    servers = []

    def start(models, roots=None):
        s = ThreadedServer(FakeServer(models, roots=roots))
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def _eval(url, models, domain, cache, **kw):
    from eval_harness import evaluate

    return evaluate(url, models=models, benchmarks=[], domain=[domain], max_tokens=8, n_boot=20, cache=cache,
                    progress=False, **kw)


def test_cache_follows_the_served_weights(fake, tmp_path, capsys):
    domain = write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}?", "answers": ["x"]} for i in range(5)])
    ad = make_adapter(tmp_path / "ad")
    cache = tmp_path / "c.sqlite"
    srv = fake(["repaired"], roots={"repaired": str(ad)})
    assert _eval(srv.url, "repaired", domain, cache)["_run"]["sent"] == 5
    assert _eval(srv.url, "repaired", domain, cache)["_run"] == {"sent": 0, "cached": 5, "retries": 0, "errors": 0,
                                                                 "uncached_models": []}
    # new weights at the same path, same served name: every answer is asked again
    write_safetensors(ad / "adapter_model.safetensors", {"a": (4, 8), "b": (8, 4)}, fill=3)
    os.utime(ad / "adapter_model.safetensors", ns=(1, 1))
    assert _eval(srv.url, "repaired", domain, cache)["_run"]["sent"] == 5
    assert srv.server.completions == 10

    # the same endpoint no longer serves the name: an error, although every answer is cached
    srv.server.models = ["base"]
    with pytest.raises(UserError, match=r"model\(s\) repaired not served by .*it serves: base"):
        _eval(srv.url, "repaired", domain, cache)
    assert srv.server.requests == 10


def test_unknown_identity_is_not_cached_unless_names_are_trusted(fake, tmp_path, capsys):
    domain = write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}?", "answers": ["x"]} for i in range(3)])
    cache = tmp_path / "c.sqlite"
    srv = fake(["remote", "local"], roots={"remote": "org/remote-model", "local": str(make_adapter(tmp_path / "a"))})
    for _ in range(2):
        r = _eval(srv.url, "remote,local", domain, cache)
        assert r["_run"]["uncached_models"] == ["remote"]
    assert srv.server.completions == 3 * 2 + 3  # remote asked twice, local once
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if "cannot fingerprint" in ln]
    assert len(warnings) == 2 and "remote (" in warnings[0] and "local" not in warnings[0]
    assert "--trust-cache-names" in warnings[0]
    with sqlite3.connect(cache) as db:
        assert {m for (m,) in db.execute("SELECT model FROM responses")} == {"local"}

    n = srv.server.completions
    r = _eval(srv.url, "remote,local", domain, cache, trust_cache_names=True)
    assert r["_run"]["sent"] == 3 and r["_run"]["uncached_models"] == [] and r["config"]["trust_cache_names"]
    r = _eval(srv.url, "remote,local", domain, cache, trust_cache_names=True)
    assert r["_run"]["sent"] == 0 and srv.server.completions == n + 3
    assert "cannot fingerprint" not in capsys.readouterr().err
    # --no-cache: an in-memory cache for this run only, no warning
    r = _eval(srv.url, "remote", domain, None)
    assert r["_run"]["sent"] == 3 and r["_run"]["uncached_models"] == []


def test_old_cache_file_entries_miss_without_error(fake, tmp_path):
    domain = write_jsonl(tmp_path / "d.jsonl", [{"question": "q?", "answers": ["x"]}])
    cache = tmp_path / "c.sqlite"
    srv = fake(["m"], roots={"m": str(make_adapter(tmp_path / "a"))})
    with sqlite3.connect(cache) as db:  # a cache written by the previous version (key without the identity)
        db.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, endpoint TEXT, model TEXT, request TEXT, "
                   "text TEXT, finish_reason TEXT, created REAL)")
        import hashlib

        old = hashlib.sha256(json.dumps({"endpoint": srv.url, "model": "m",
                                         "messages": [{"role": "user", "content": "q?"}],
                                         "params": {"temperature": 0.0, "max_tokens": 8}}, sort_keys=True,
                                        separators=(",", ":")).encode()).hexdigest()
        db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)", (old, srv.url, "m", "{}", "stale", "stop", 0))
    r = _eval(srv.url, "m", domain, cache, log_samples=True)
    assert r["_run"]["sent"] == 1 and r["samples"]["m"]["d"][0]["response"] != "stale"


def test_completions_api_and_its_cache_key(fake, tmp_path):
    domain = write_jsonl(tmp_path / "d.jsonl", [{"question": "q?", "answers": ["x"]}])
    cache = tmp_path / "c.sqlite"
    srv = fake(["m"], roots={"m": str(make_adapter(tmp_path / "a"))})
    chat = _eval(srv.url, "m", domain, cache, log_samples=True)
    plain = _eval(srv.url, "m", domain, cache, log_samples=True, api="completions")
    assert plain["_run"]["sent"] == 1  # not answered by the chat request's cache entry
    s = plain["samples"]["m"]["d"][0]
    assert s["prompt"] == "Q: q?\nA:" and "messages" not in s and s["response"].startswith(" ")
    assert plain["config"]["api"] == "completions" and plain["config"]["sampling"]["stop"] == ["\nQ:"]
    assert chat["config"]["api"] == "chat" and "stop" not in chat["config"]["sampling"]
    assert _eval(srv.url, "m", domain, cache, api="completions")["_run"]["sent"] == 0
    with pytest.raises(UserError, match="unknown --api 'text'"):
        _eval(srv.url, "m", domain, cache, api="text")


def test_default_cache_is_in_the_user_cache_folder(fake, tmp_path, monkeypatch):
    from eval_harness.client import default_cache_path

    monkeypatch.setenv("HCNR_DEPLOY_CACHE", str(tmp_path / "uc"))
    assert default_cache_path() == tmp_path / "uc" / "eval-cache.sqlite"
    monkeypatch.delenv("HCNR_DEPLOY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "hcnr-deploy" / "eval-cache.sqlite"

    from click.testing import CliRunner

    from hcnr_deploy.cli import main

    domain = write_jsonl(tmp_path / "d.jsonl", [{"question": "q?", "answers": ["x"]}])
    srv = fake(["m"], roots={"m": str(make_adapter(tmp_path / "a"))})
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["eval", "--endpoint", srv.url, "--benchmarks", "none", "--domain", str(domain),
                                  "--quiet", "--bootstrap", "10"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "xdg" / "hcnr-deploy" / "eval-cache.sqlite").is_file()
    assert not (tmp_path / ".hcnr-cache").exists()
    assert f"cache {tmp_path / 'xdg' / 'hcnr-deploy' / 'eval-cache.sqlite'}" in r.output
