"""benchmarks/reproduce.py's own logic: Fisher reuse across repair variants, averaging, curve gaps, F1."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from hcnr_deploy import repair as repair_module
from hcnr_deploy.repair import run_repair
from hcnr_deploy.tiny import build_tiny_model, random_lora
from test_repair_pipeline import tensors_of, write_calibration

from conftest import REPO


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    base = build_tiny_model(root / "base", arch="llama", hidden_size=64, seed=0)
    lora = random_lora(base, root / "lora", rank=8, seed=1, scale=0.2)
    hon, task = write_calibration(root)
    return base, lora, hon, task


def test_reused_fisher_gives_the_bytes_of_a_full_repair(reproduce, pair, tmp_path):
    base, lora, hon, task = pair
    variants = [{}, {"r_cw": 0.2}, {"compensation": "exact"}, {"selection": "no-task"}]
    kw = dict(num_samples=8, max_length=48)
    for i, v in enumerate(variants):
        run_repair(base, lora, hon, task, tmp_path / f"plain{i}", **kw, **v)
    calls = []
    original = repair_module._fisher
    with reproduce.ReusedFisher() as reuse:
        assert repair_module._fisher is not original
        spy = repair_module._fisher

        def counting(*a, **k):
            calls.append(a[-1] if a else k.get("label"))
            return spy(*a, **k)

        repair_module._fisher = counting
        try:
            for i, v in enumerate(variants):
                run_repair(base, lora, hon, task, tmp_path / f"reused{i}", **kw, **v)
        finally:
            repair_module._fisher = spy
    assert repair_module._fisher is original
    # 4 variants ask for 7 Fisher passes; 2 distinct ones (honesty on base, task on the fine-tune) run
    assert len(calls) == 7 and len(reuse.scores) == 2 and reuse.hits == 5
    for i in range(len(variants)):
        a, b = tensors_of(tmp_path / f"plain{i}"), tensors_of(tmp_path / f"reused{i}")
        assert a.keys() == b.keys()
        assert all(a[k].equal(b[k]) for k in a)


def test_reused_fisher_keys_on_the_weights(reproduce, pair):
    import torch

    lin = torch.nn.Linear(3, 2)
    o = {"granularity": "column", "batch_size": 8, "max_length": 48}
    k1 = reproduce.ReusedFisher.key(lin, [([1, 2], [0, 1])], o, "honesty, base")
    with torch.no_grad():
        lin.weight[0, 0] += 1e-6
    assert reproduce.ReusedFisher.key(lin, [([1, 2], [0, 1])], o, "honesty, base") != k1
    assert reproduce.ReusedFisher.key(lin, [([1, 2], [0, 1])], o, "task, finetuned") != \
        reproduce.ReusedFisher.key(lin, [([1, 2], [0, 1])], o, "honesty, base")


def test_average_rows_over_the_seeds_that_scored_each_model(reproduce):
    def row(f1, acc):
        return {"kuq": {"f1": f1, "rf_delta": f1 / 2}, "mean_f1": f1, "mean_rf_delta": f1 / 2, "domain_accuracy": acc}

    seeds = [{"ft": row(0.2, 0.5), "sweep": row(0.4, 0.3)}, {"ft": row(0.4, 0.7)}]
    avg = reproduce.average_rows(seeds)
    assert avg["ft"]["mean_f1"]["mean"] == pytest.approx(0.3) and avg["ft"]["n_seeds"] == 2
    assert avg["ft"]["mean_f1"]["std"] == pytest.approx(0.1)
    assert avg["sweep"]["n_seeds"] == 1 and avg["sweep"]["domain_accuracy"]["per_seed"] == [0.3]
    assert avg["ft"]["kuq"]["rf_delta"]["mean"] == pytest.approx(0.15)


def test_curve_gap_and_f1(reproduce):
    curve = [(0.0, 1.0), (1.0, 0.0)]
    assert reproduce.curve_gap([(0.5, 0.7), (0.25, 0.5), (1.5, 0.0)], curve) == [pytest.approx(0.2),
                                                                                 pytest.approx(-0.25), None]
    refused = np.array([1, 1, 0, 1, 0], bool)
    unans = np.array([1, 1, 1, 0, 0], bool)
    # tp 2, fp 1, 3 unanswerable: precision 2/3, recall 2/3, F1 2/3
    assert reproduce.f1_of(refused, unans) == pytest.approx(2 / 3)
