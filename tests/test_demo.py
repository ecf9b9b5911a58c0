"""`hcnr-deploy demo` end to end in its reduced size: tiny model trained here, a real sweep (the ci scenario's
small grid: HCNR at two R_CW, RegMean, delta scaling, calibration SFT from one repair session), one real vLLM
server with every candidate as an adapter, the real eval harness; then the cached rerun and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _demo(*args, env=None, timeout=1500):
    cmd = [sys.executable, "-m", "hcnr_deploy.cli", "demo", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    proc = _demo("--model", "ci", "--cache-dir", str(root / "cache"), "--out", str(root / "out"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, proc


def test_demo_runs_a_sweep_and_prints_the_four_rows_and_the_frontier(demo_run):
    root, proc = demo_run
    results = json.loads((root / "out" / "results.json").read_text())
    report = json.loads((root / "out" / "demo.json").read_text())
    fr = json.loads((root / "out" / "frontier.json").read_text())
    shipped = ["shipped: ft itself, unchanged. No candidate helped at this data size"] if fr["chosen"] == "ft" else \
        [f"chosen: {fr['chosen']}: honesty recovery ", "(paired 95% intervals; margin 0.02)", "recovery ratio"]
    for word in ("base", "ft", "HCNR (paper settings)", "honesty F1", "Δ domain", "recovery", "candidate",
                 "F1 [95% CI]", "regmean-mu3", "scale-a0.5", "hcnr-rcw0.2", "always-refuse", *shipped):
        assert word in proc.stdout, word
    assert (root / "out" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    names = [c["name"] for c in fr["candidates"]]
    assert names[:5] == ["base", "ft", "hcnr-rcw0.2", "hcnr-rcw0.4", "regmean-mu3"] and "scale-a0.5" in names
    assert set(results["results"]) == set(names)
    by = {c["name"]: c for c in fr["candidates"]}
    for c in fr["candidates"]:
        assert 0.0 <= c["f1"] <= 1.0 and 0.0 <= c["domain_accuracy"] <= 1.0
        assert c["f1"] == pytest.approx(results["results"][c["name"]]["kuq"]["f1"], abs=1e-6)
    assert results["tasks"]["kuq"]["n"] > 50
    base, ft = by["base"], by["ft"]
    # the scenario's premise: base is honest, the fine-tune gains domain accuracy and loses honesty
    assert base["f1"] >= 0.6
    assert ft["domain_accuracy"] > base["domain_accuracy"]
    assert base["f1"] - ft["f1"] >= 0.15
    # the choice: the paired rule of hcnr_deploy.sweep.choice (tested on written numbers in test_sweep.py), ci's margin
    from hcnr_deploy import sweep as F

    assert fr["max_domain_drop"] == 0.02 and fr["honesty_metric"] == "rf_delta"
    assert F.choose(fr["candidates"], 0.02, "rf_delta") == (fr["chosen"], fr["reason"])
    assert fr["domain_resolution"]["questions"] == 60
    s = report["summary"]
    paper = s["models"]["HCNR (paper settings)"]
    assert paper["name"] == "hcnr-rcw0.4"
    assert paper["recovery_ratio"] == pytest.approx((paper["f1"] - ft["f1"]) / (base["f1"] - ft["f1"]), abs=1e-5)
    assert s["chosen"] == fr["chosen"] and s["shipped_ft"] == (fr["chosen"] == "ft")
    for k in ("data", "base", "ft", "sweep", "chosen"):
        assert os.path.isdir(report["paths"][k]), k
    # every candidate is a PEFT adapter of the repair engine, with its report beside it; chosen/ is one of them
    for n in names[2:]:
        art = by[n]["artifact"]
        assert os.path.exists(os.path.join(art, "adapter_model.safetensors"))
        assert os.path.exists(os.path.join(art, "report.json"))
    assert os.path.exists(os.path.join(report["paths"]["chosen"], "adapter_config.json"))


def test_second_run_is_cached(demo_run):
    root, _ = demo_run
    cached = sorted(p.name for p in (root / "cache").iterdir())
    proc = _demo("--model", "ci", "--cache-dir", str(root / "cache"), "--out", str(root / "out2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((root / "out2" / "demo.json").read_text())
    assert all(v["cached"] for v in report["timings_s"].values()), report["timings_s"]
    assert (root / "out2" / "results.json").read_bytes() == (root / "out" / "results.json").read_bytes()
    assert sorted(p.name for p in (root / "cache").iterdir()) == cached  # nothing built, nothing left half-built


def test_out_exists_is_an_error(demo_run):
    root, _ = demo_run
    proc = _demo("--model", "ci", "--cache-dir", str(root / "cache"), "--out", str(root / "out"))
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--overwrite" in proc.stderr
