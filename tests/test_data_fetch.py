"""`hcnr-deploy data fetch` against a local HTTP server on 127.0.0.1 serving the GitHub files under a mirror path
and acting as the hub (HF_ENDPOINT) for KUQ: no test reaches the internet. The served files are the unchanged
public copies in ../shared/data, so the pinned checksums are checked for real."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from hcnr_deploy.benchdata import fetch as F
from hcnr_deploy.cli import main

from test_data_cmd import DATA, needs_data

KUQ_ROWS = [{"question": "What is the capital of France?", "answer": ["Paris"], "unknown": False, "source": "squad",
             "category": None},
            {"question": "Will it rain in Oslo on 3 May 2091?", "answer": [], "unknown": True, "source": "turk",
             "category": "future unknown"}]
KUQ_BYTES = "".join(json.dumps(r) + "\n" for r in KUQ_ROWS).encode()


class Server:
    """path -> bytes over HTTP on 127.0.0.1; the hub's headers on every answer; counts GETs per path."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.gets = files, {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: bool):
                path = urlsplit(self.path).path
                data = outer.files.get(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if body:
                    outer.gets[path] = outer.gets.get(path, 0) + 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", F.KUQ_REVISION)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_GET(self):
                self._answer(True)

            def do_HEAD(self):
                self._answer(False)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _public_files() -> dict[str, bytes]:
    files = {}
    for src in F.SOURCES:
        if src.github:
            files[f"/mirror/{src.github}"] = (DATA / src.dest).read_bytes()
        else:
            files[f"/datasets/{F.KUQ_REPO}/resolve/{F.KUQ_REVISION}/{src.hub}"] = KUQ_BYTES
    return files


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The local server as mirror and hub; an empty hub cache; online."""
    import huggingface_hub.constants as C

    server = Server(_public_files())
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HCNR_DATA_MIRROR"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HCNR_DATA_DIR", str(tmp_path / "userdata"))
    yield server
    server.close()


def _fetch(*args):
    return CliRunner().invoke(main, ["data", "fetch", *map(str, args)])


@needs_data
def test_fetch_from_a_mirror_checks_and_lays_out_every_file(hub, tmp_path):
    from eval_harness.benchmarks import HONESTY_BENCHMARKS, load_benchmark

    r = _fetch("--mirror", f"{hub.url}/mirror")
    assert r.exit_code == 0, r.output
    folder = tmp_path / "userdata"  # HCNR_DATA_DIR: the user data folder
    assert f"data folder: {folder}" in r.output
    for src in F.SOURCES:
        got = (folder / src.dest).read_bytes()
        assert got == (KUQ_BYTES if src.hub else (DATA / src.dest).read_bytes()), src.dest
    manifest = json.loads((folder / "fetch.json").read_text())
    assert manifest["kuq/knowns_unknowns.jsonl"] == hashlib.sha256(KUQ_BYTES).hexdigest()
    assert all(manifest[s.dest] == s.sha256 for s in F.SOURCES if s.sha256)
    assert {b: len(load_benchmark(b, folder).items) for b in HONESTY_BENCHMARKS}["selfaware"] == 3369
    gets = dict(hub.gets)
    r = _fetch("--mirror", f"{hub.url}/mirror")  # intact files are kept: nothing downloaded again
    assert r.exit_code == 0 and r.output.count("present") == len(F.SOURCES) and hub.gets == gets


@needs_data
def test_a_file_with_another_checksum_is_refused_and_not_written(hub, tmp_path):
    nec = next(s for s in F.SOURCES if s.dest.endswith("NEC_answerable.jsonl"))
    hub.files[f"/mirror/{nec.github}"] += b'{"prompt": "tampered", "label": 0}\n'
    r = _fetch("--mirror", f"{hub.url}/mirror", "--benchmarks", "nec", "--data-dir", tmp_path / "d")
    assert r.exit_code == 2 and "is not the pinned" in r.output and r.stderr.count("\n") == 1
    assert not (tmp_path / "d" / nec.dest).exists()
    assert not list((tmp_path / "d" / "unknownbench").glob(".*part*"))


@needs_data
def test_kuq_recorded_checksum_guards_later_fetches(hub, tmp_path):
    assert _fetch("--benchmarks", "kuq", "--data-dir", tmp_path / "d").exit_code == 0
    (tmp_path / "d" / "kuq" / "knowns_unknowns.jsonl").write_text("changed\n")
    path = f"/datasets/{F.KUQ_REPO}/resolve/{F.KUQ_REVISION}/knowns_unknowns.jsonl"
    hub.files[path] = b'{"question": "other?", "unknown": true}\n'
    import huggingface_hub.constants as C
    C.HF_HUB_CACHE = str(tmp_path / "fresh-cache")  # (restored by the fixture's monkeypatch)
    r = _fetch("--benchmarks", "kuq", "--data-dir", tmp_path / "d")
    assert r.exit_code == 2 and "is not the recorded" in r.output


def test_offline_names_every_missing_file_and_where_to_put_it(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = _fetch("--benchmarks", "selfaware,kuq", "--data-dir", tmp_path / "d")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert "could not download 2 file(s)" in r.output
    assert f"{tmp_path / 'd' / 'selfaware' / 'SelfAware.json'} from https://raw.githubusercontent.com/" in r.output
    assert f"{tmp_path / 'd' / 'kuq' / 'knowns_unknowns.jsonl'} from {hub.url}/datasets/amayuelas/KUQ" in r.output
    assert not hub.gets
    monkeypatch.delenv("HF_HUB_OFFLINE")
    closed = Server({})
    closed.close()  # nothing listens there now: a refused connection, as offline
    r = _fetch("--benchmarks", "falseqa", "--mirror", closed.url, "--data-dir", tmp_path / "d")
    assert r.exit_code == 2 and "could not download 2 file(s)" in r.output and "FalseQA_unanswerable" in r.output


def test_commands_read_the_user_data_folder_by_default(tmp_path, monkeypatch):
    from eval_harness.env import user_data_dir
    from eval_harness.run import load_tasks
    from test_eval_data import make_data_dir

    monkeypatch.delenv("HCNR_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert user_data_dir() == tmp_path / "xdg" / "hcnr-deploy" / "benchmarks"
    with pytest.raises(Exception, match="run `hcnr-deploy data fetch`"):
        load_tasks(["nec"], None, [], None, 0)
    make_data_dir(user_data_dir())
    (task, _), = load_tasks(["nec"], None, [], None, 0)
    assert task.name == "nec" and len(task.items) == 2
    monkeypatch.setenv("HCNR_DATA_DIR", str(tmp_path / "mine"))
    assert user_data_dir() == tmp_path / "mine"


def test_sweep_without_eval_honesty_reads_the_user_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HCNR_DATA_DIR", str(tmp_path / "none"))
    f = tmp_path / "f.jsonl"
    f.write_text('{"question": "q?", "answers": ["a"]}\n')
    r = CliRunner().invoke(main, ["sweep", "--base", "b", "--finetuned", "f", "--honesty-data", str(f), "--task-data",
                                  str(f), "--eval-domain", str(f), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and f"user data folder {tmp_path / 'none'} does not exist" in r.output
    assert "hcnr-deploy data fetch" in r.output and not (tmp_path / "o").exists()
