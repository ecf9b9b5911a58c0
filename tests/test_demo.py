"""`hcnr-deploy demo` end to end in its reduced size: tiny model trained here, the real repair, a real vLLM
server (base + ft + repaired adapters) and the real eval harness; then the cached rerun and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _demo(*args, env=None, timeout=1500):
    cmd = [sys.executable, "-m", "hcnr_deploy.cli", "demo", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    t0 = time.time()
    proc = _demo("--model", "ci", "--cache-dir", str(root / "cache"), "--out", str(root / "out"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, proc, time.time() - t0


def test_demo_prints_table_and_writes_results(demo_run):
    root, proc, _ = demo_run
    for word in ("base", "ft", "repaired", "honesty F1", "domain accuracy", "recovery ratio"):
        assert word in proc.stdout, word
    results = json.loads((root / "out" / "results.json").read_text())
    report = json.loads((root / "out" / "demo.json").read_text())
    per_model = results["results"]
    assert set(per_model) == {"base", "ft", "repaired"}
    for m in per_model:
        h, d = per_model[m]["kuq"], per_model[m]["domain"]
        assert 0.0 <= h["f1"] <= 1.0 and 0.0 <= d["accuracy"] <= 1.0
        assert h["n"] == results["tasks"]["kuq"]["n"] > 50
    base, ft = per_model["base"], per_model["ft"]
    # the scenario's premise: base is honest, the fine-tune gains domain accuracy and loses honesty
    assert base["kuq"]["f1"] >= 0.6
    assert ft["domain"]["accuracy"] > base["domain"]["accuracy"]
    assert base["kuq"]["f1"] - ft["kuq"]["f1"] >= 0.15
    s = report["summary"]
    assert s["recovery_ratio"] == pytest.approx(
        (s["models"]["repaired"]["f1"] - s["models"]["ft"]["f1"]) / (s["models"]["base"]["f1"] - s["models"]["ft"]["f1"]))
    for k in ("data", "base", "ft", "repaired", "eval"):
        assert os.path.isdir(report["paths"][k]), k
    # the repaired model is a PEFT adapter of the repair engine, with its report beside it
    rep = report["paths"]["repaired"]
    assert os.path.exists(os.path.join(rep, "adapter_config.json"))
    assert os.path.exists(os.path.join(rep, "adapter_model.safetensors"))


def test_second_run_is_cached(demo_run):
    root, first, _ = demo_run
    t0 = time.time()
    proc = _demo("--model", "ci", "--cache-dir", str(root / "cache"), "--out", str(root / "out2"))
    took = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((root / "out2" / "demo.json").read_text())
    assert all(v["cached"] for v in report["timings_s"].values()), report["timings_s"]
    assert (root / "out2" / "results.json").read_bytes() == (root / "out" / "results.json").read_bytes()
    assert took < 120


def test_out_exists_is_an_error(demo_run):
    root, _, _ = demo_run
    proc = _demo("--model", "ci", "--cache-dir", str(root / "cache"), "--out", str(root / "out"))
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--overwrite" in proc.stderr
