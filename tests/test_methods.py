"""`repair --method regmean|scale|lines|sft`, task-aware compensation, RepairSession: closed forms, limits,
exact LoRAs, statistics reuse."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from hcnr_deploy.equations.compensation import depth_factor, interpolate, regmean_compensation, task_aware_compensation
from eval_harness.errors import UserError
from hcnr_deploy.options import RepairOptions
from hcnr_deploy.repair import RepairSession, run_repair

from conftest import repair_pair

WORDS = "the capital city river country born wrote unknown answer question sure Paris 1492 future".split()
DAMP = 0.01
SMALL = dict(num_samples=8, max_length=40, batch_size=4, device="cpu")


def _grams(seed=0, n_in=10, n_out=6, n_h=40, n_t=30):
    gen = torch.Generator().manual_seed(seed)
    x_h = torch.randn(n_in, n_h, generator=gen, dtype=torch.float64)
    x_t = torch.randn(n_in, n_t, generator=gen, dtype=torch.float64) + 0.5
    w0 = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
    d = 0.3 * torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
    return x_h, x_t, w0, d


def _regmean_closed_form(w0, ws, x_h, x_t, mu):
    """W = (W0 (G_h + lambda I) + mu Ws G_t) (G_h + mu G_t + lambda I)^-1, literally, with an explicit inverse."""
    g_h, g_t = x_h @ x_h.T / x_h.shape[1], x_t @ x_t.T / x_t.shape[1]
    lam = DAMP * torch.diagonal(g_h + mu * g_t).mean()
    eye = torch.eye(g_h.shape[0], dtype=torch.float64)
    return (w0 @ (g_h + lam * eye) + mu * ws @ g_t) @ torch.linalg.inv(g_h + mu * g_t + lam * eye)


@pytest.mark.parametrize("mu", [0.3, 1.0, 10.0])
def test_regmean_equals_its_float64_closed_form_and_task_aware_with_every_column(mu):
    x_h, x_t, w0, d = _grams()
    h_h, h_t = x_h @ x_h.T, x_t @ x_t.T
    e, retries = regmean_compensation(d, h_h, x_h.shape[1], h_t, x_t.shape[1], mu, DAMP)
    torch.testing.assert_close(w0 + e, _regmean_closed_form(w0, w0 + d, x_h, x_t, mu), rtol=1e-9, atol=1e-10)
    assert retries == 0
    every = torch.arange(d.shape[1])
    e_ta, _ = task_aware_compensation(d, h_h, x_h.shape[1], h_t, x_t.shape[1], mu, DAMP, every[:0], every)
    assert float((e - e_ta).abs().max()) < 1e-6


def test_regmean_limits_base_on_honesty_inputs_and_finetune_on_task_inputs():
    x_h, x_t, w0, d = _grams(1)
    h_h, h_t = x_h @ x_h.T, x_t @ x_t.T
    small, _ = regmean_compensation(d, h_h, x_h.shape[1], h_t, x_t.shape[1], 1e-4, DAMP)
    large, _ = regmean_compensation(d, h_h, x_h.shape[1], h_t, x_t.shape[1], 1e4, DAMP)
    undamped, _ = regmean_compensation(d, h_h, x_h.shape[1], h_t, x_t.shape[1], 1e4, 1e-9)
    # small MU: W acts like W0 on honesty inputs; large MU: W acts like Ws on task inputs, up to the ridge
    # lambda ||W - W0||^2, whose lambda grows with MU (damp * mean diag(G_h + MU G_t)): an error of order damp
    assert float((small @ x_h).norm() / (d @ x_h).norm()) < 1e-3
    assert float(((large - d) @ x_t).norm() / (d @ x_t).norm()) < 2 * DAMP
    assert float(((undamped - d) @ x_t).norm() / (d @ x_t).norm()) < 1e-3  # order 1 / MU
    mid, _ = regmean_compensation(d, h_h, x_h.shape[1], h_t, x_t.shape[1], 1.0, DAMP)
    assert 0.05 < float((mid @ x_h).norm() / (d @ x_h).norm()) < 0.95  # in between: a dial, not a switch


def test_regmean_rows_of_a_lora_give_the_dense_edit():
    x_h, x_t, _, _ = _grams(2)
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    b = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    h_h, h_t = x_h @ x_h.T, x_t @ x_t.T
    e_a, _ = regmean_compensation(a, h_h, 40, h_t, 30, 2.0, DAMP)
    e_d, _ = regmean_compensation(0.5 * b @ a, h_h, 40, h_t, 30, 2.0, DAMP)
    torch.testing.assert_close(0.5 * b @ e_a, e_d, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mu", [0.0, 0.5, 4.0])
def test_task_aware_equals_a_naive_least_squares_on_small_matrices(mu):
    """E_F = argmin ||E X_h||^2 / n_h + MU ||(E - D) X_t||^2 / n_t + lambda ||E_F||^2 with E_T = D_T, solved
    naively: every term stacked into one least-squares problem E_F A = C (torch.linalg.lstsq)."""
    x_h, x_t, _, d = _grams(3)
    n_h, n_t = x_h.shape[1], x_t.shape[1]
    f, t = torch.tensor([1, 4, 5, 8]), torch.tensor([0, 2, 3, 6, 7, 9])
    g_h, g_t = x_h @ x_h.T / n_h, x_t @ x_t.T / n_t
    lam = DAMP * float(torch.diagonal(g_h + mu * g_t).mean())
    a = torch.cat([x_h[f] / math.sqrt(n_h), math.sqrt(mu / n_t) * x_t[f],
                   math.sqrt(lam) * torch.eye(len(f), dtype=torch.float64)], dim=1)  # [|F|, n_h + n_t + |F|]
    c = torch.cat([-d[:, t] @ x_h[t] / math.sqrt(n_h), math.sqrt(mu / n_t) * d[:, f] @ x_t[f],
                   torch.zeros(d.shape[0], len(f), dtype=torch.float64)], dim=1)
    naive = torch.linalg.lstsq(a.T, c.T).solution.T
    e_f, retries = task_aware_compensation(d, x_h @ x_h.T, n_h, x_t @ x_t.T, n_t, mu, DAMP, t, f)
    torch.testing.assert_close(e_f, naive, rtol=1e-8, atol=1e-10)
    assert retries == 0


def test_depth_factor_runs_from_alpha_at_the_first_block_to_alpha_plus_beta_at_the_last():
    assert [depth_factor(0.2, 0.6, l, 4) for l in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [depth_factor(1.0, -0.6, l, 3) for l in range(3)] == pytest.approx([1.0, 0.7, 0.4])
    assert depth_factor(0.3, 0.9, 0, 1) == 0.3  # one block: alpha


def _naive_lines(w0, ws, name, alpha, beta, n_layers):
    """W0 + (alpha + beta l / (L - 1)) (Ws - W0), the block l read from the weight's name, entry by entry."""
    layer = int(name.split(".layers.")[1].split(".")[0])
    factor = alpha + beta * layer / (n_layers - 1)
    w0, ws = w0.double(), ws.double()
    out = torch.empty_like(w0)
    for i in range(w0.shape[0]):
        for j in range(w0.shape[1]):
            out[i, j] = w0[i, j] + factor * (ws[i, j] - w0[i, j])
    return out


@pytest.mark.parametrize("ft", ["full", "lora"])
def test_lines_checkpoint_equals_the_naive_formula_per_block(pair, tmp_path, ft):
    from hcnr_deploy.io.checkpoint import Checkpoint
    from hcnr_deploy.io.finetune import FineTune

    rep = _run(pair, ft, tmp_path / "lines", method="lines", alpha=0.2, beta=0.6, format="checkpoint")
    assert rep["settings"]["method"] == "lines" and rep["settings"]["beta"] == 0.6 and rep["edited_fraction"] == 1.0
    assert any("--method lines needs no calibration statistics" in n for n in rep["notes"])
    out, base = _tensors(tmp_path / "lines"), _tensors(pair["base"])
    finetune = FineTune(pair[ft], Checkpoint(pair["base"]))
    names = [m["name"] + ".weight" for m in rep["matrices"]]
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in names} == {0, 1, 2}
    for k in names:
        want = _naive_lines(base[k], finetune.weight(k), k, 0.2, 0.6, 3)
        assert float((out[k].double() - want).abs().max()) < 1e-6, k
    # beta = 0 is delta scaling, byte for byte
    _run(pair, ft, tmp_path / "flat", method="lines", alpha=0.4, beta=0.0, format="checkpoint")
    _run(pair, ft, tmp_path / "scale", method="scale", alpha=0.4, format="checkpoint")
    flat, scaled = _tensors(tmp_path / "flat"), _tensors(tmp_path / "scale")
    assert flat.keys() == scaled.keys() and all(torch.equal(flat[k], scaled[k]) for k in flat)


def test_lines_on_a_lora_scales_b_per_block_and_equals_the_dense_edit(pair, tmp_path):
    rep = _run(pair, "lora", tmp_path / "adapter", method="lines", alpha=1.0, beta=-0.6)
    _run(pair, "lora", tmp_path / "ckpt", method="lines", alpha=1.0, beta=-0.6, format="checkpoint")
    assert rep["format"] == "adapter"
    old, new = load_file(pair["lora"] / "adapter_model.safetensors"), load_file(tmp_path / "adapter" /
                                                                                 "adapter_model.safetensors")
    assert old.keys() == new.keys()
    for k in old:
        layer = int(k.split(".layers.")[1].split(".")[0])
        want = old[k] * depth_factor(1.0, -0.6, layer, 3) if ".lora_B." in k else old[k]
        assert torch.allclose(new[k], want, rtol=0, atol=1e-7), k
    names = [m["name"] + ".weight" for m in rep["matrices"]]
    assert _rel(_merged(pair, tmp_path / "adapter"), _tensors(tmp_path / "ckpt"), names) < 1e-5


def test_task_aware_on_a_lora_is_an_exact_adapter(pair, tmp_path):
    """The grid's taskaware family: HCNR's selection with task-aware compensation, an exact rank-r LoRA."""
    kw = dict(compensation="task-aware", task_weight=1.0)
    rep = _run(pair, "lora", tmp_path / "adapter", **kw)
    _run(pair, "lora", tmp_path / "ckpt", format="checkpoint", **kw)
    assert rep["format"] == "adapter" and rep["settings"]["compensation"] == "task-aware"
    old, new = load_file(pair["lora"] / "adapter_model.safetensors"), load_file(tmp_path / "adapter" /
                                                                                 "adapter_model.safetensors")
    assert all(torch.equal(old[k], new[k]) for k in old if ".lora_B." in k)  # same B
    assert any(not torch.equal(old[k], new[k]) for k in old if ".lora_A." in k)
    names = [m["name"] + ".weight" for m in rep["matrices"]]
    assert _rel(_merged(pair, tmp_path / "adapter"), _tensors(tmp_path / "ckpt"), names) < 1e-5


def test_interpolate_is_exact_at_the_ends():
    gen = torch.Generator().manual_seed(0)
    w0, ws = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    assert torch.equal(interpolate(w0, ws, 0.0).float(), w0) and torch.equal(interpolate(w0, ws, 1.0).float(), ws)
    torch.testing.assert_close(interpolate(w0, ws, 0.25), w0.double() + 0.25 * (ws.double() - w0.double()))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return repair_pair(tmp_path_factory.mktemp("methods"), "llama", 8, WORDS)


def _run(pair, ft, out, **kw):
    r = pair["root"]
    return run_repair(pair["base"], pair[ft], r / "hon.jsonl", r / "task.jsonl", out, **{**SMALL, **kw})


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _merged(pair, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(pair["base"], dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()


def _rel(a: dict, b: dict, names) -> float:
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in names)
    return math.sqrt(num / sum(float(b[k].double().square().sum()) for k in names))


def test_regmean_pipeline_equals_task_aware_at_r_iw_r_cw_one(pair, tmp_path):
    rep = _run(pair, "full", tmp_path / "regmean", method="regmean", task_weight=3.0)
    _run(pair, "full", tmp_path / "ta", r_iw=1.0, r_cw=1.0, compensation="task-aware", task_weight=3.0)
    a, b = _tensors(tmp_path / "regmean"), _tensors(tmp_path / "ta")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert rep["edited_fraction"] == 1.0 and rep["selected_matrices"] == rep["eligible_matrices"]
    assert rep["settings"]["method"] == "regmean" and rep["settings"]["task_weight"] == 3.0
    assert not [k for k in rep["timings_s"] if k.startswith("fisher")]
    assert any("no Fisher pass" in n for n in rep["notes"])
    assert (tmp_path / "regmean" / "README.md").is_file()


def test_regmean_on_a_lora_is_an_exact_adapter(pair, tmp_path):
    rep = _run(pair, "lora", tmp_path / "adapter", method="regmean", task_weight=2.0)
    _run(pair, "lora", tmp_path / "ckpt", method="regmean", task_weight=2.0, format="checkpoint")
    assert rep["format"] == "adapter"
    old, new = load_file(pair["lora"] / "adapter_model.safetensors"), load_file(tmp_path / "adapter" /
                                                                                 "adapter_model.safetensors")
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in old if ".lora_B." in k)  # same B: new A = A MU G_t K^-1
    assert all(not torch.equal(old[k], new[k]) for k in old if ".lora_A." in k)
    dense = _tensors(tmp_path / "ckpt")
    names = [m["name"] + ".weight" for m in rep["matrices"]]
    assert _rel(_merged(pair, tmp_path / "adapter"), dense, names) < 1e-5


@pytest.mark.parametrize("ft", ["full", "lora"])
def test_scale_zero_is_the_base_and_one_the_finetune(pair, tmp_path, ft):
    base = _tensors(pair["base"])
    fmt = dict(format="checkpoint")
    at0, at1 = _tensors_of_run(pair, ft, tmp_path / "a0", alpha=0.0, **fmt), _tensors_of_run(pair, ft, tmp_path / "a1",
                                                                                            alpha=1.0, **fmt)
    assert all(torch.equal(at0[k], base[k]) for k in base if ".layers." in k and k.endswith("proj.weight"))
    if ft == "full":
        ft_dense = _tensors(pair["full"])
        assert all(torch.equal(at1[k], ft_dense[k]) for k in ft_dense)
    else:  # the LoRA merged in float64, as every checkpoint of a LoRA fine-tune is written
        from hcnr_deploy.io.checkpoint import Checkpoint
        from hcnr_deploy.io.finetune import FineTune

        finetune = FineTune(pair["lora"], Checkpoint(pair["base"]))
        for k in base:
            want = finetune.weight(k) if ".layers." in k and k.endswith("proj.weight") else base[k]
            assert float((at1[k] - want).abs().max()) < 1e-6, k
    half = _run(pair, ft, tmp_path / "half", method="scale", alpha=0.5)
    assert half["settings"]["alpha"] == 0.5 and half["edited_fraction"] == 1.0
    if ft == "lora":  # an exact adapter: B scaled by alpha, A kept
        old, new = load_file(pair["lora"] / "adapter_model.safetensors"), load_file(tmp_path / "half" /
                                                                                     "adapter_model.safetensors")
        assert all(torch.equal(new[k], old[k] * 0.5 if ".lora_B." in k else old[k]) for k in old)


def _tensors_of_run(pair, ft, out, **kw):
    kw.setdefault("method", "scale")
    _run(pair, ft, out, **kw)
    return _tensors(out)


def test_scale_alpha_must_be_non_negative(pair, tmp_path):
    with pytest.raises(UserError, match=r"^--alpha must be >= 0, got -0.5\.$"):
        _run(pair, "lora", tmp_path / "out", method="scale", alpha=-0.5)
    assert not (tmp_path / "out").exists()


CANDIDATES = [dict(method="hcnr"), dict(method="hcnr", r_cw=0.2, compensation="task-aware", task_weight=2.0),
              dict(method="regmean", task_weight=3.0), dict(method="hcnr", compensation="exact", selection="no-task"),
              dict(method="scale", alpha=0.6), dict(method="regmean", task_weight=0.3), dict(method="hcnr", r_cw=0.8),
              dict(method="hcnr", r_cw=0.6, hessian_inputs="finetuned"), dict(method="hcnr", compensation="none"),
              dict(method="lines", alpha=0.2, beta=0.6)]


@pytest.mark.parametrize("ft", ["lora", "full"])
def test_session_computes_statistics_once_and_writes_the_bytes_of_run_repair(pair, tmp_path, ft):
    """write_many: Fisher once per (data set, state), one block-streamed stage 2 (Grams of three streams: honesty on
    the base and on the fine-tune, task on the fine-tune) for every candidate; each candidate's bytes equal a
    separate run_repair's. Checkpoint edits were spilled to disk beside the output and removed."""
    r = pair["root"]
    with RepairSession(pair["base"], pair[ft], r / "hon.jsonl", r / "task.jsonl", RepairOptions(**SMALL)) as s:
        reports = s.write_many([(tmp_path / f"s{i}", kw) for i, kw in enumerate(CANDIDATES)])
        counts = dict(s.stats.counts)
        assert set(s.timings) == {"load", "fisher_honesty", "fisher_task", "hessian"}
    assert counts == {"fisher_honesty": 1, "fisher_task": 1, "hessian": 1}
    assert not list(tmp_path.glob(".*"))
    for i, kw in enumerate(CANDIDATES):
        one = _run(pair, ft, tmp_path / f"r{i}", **kw)
        files = sorted(p.name for p in (tmp_path / f"r{i}").iterdir())
        assert files == sorted(p.name for p in (tmp_path / f"s{i}").iterdir())
        for name in files:
            if name not in ("report.json", "README.md"):
                assert (tmp_path / f"s{i}" / name).read_bytes() == (tmp_path / f"r{i}" / name).read_bytes(), (kw, name)
        assert reports[i]["matrices"] == one["matrices"] and reports[i]["settings"]["command"] == \
            one["settings"]["command"].replace(f"/r{i}", f"/s{i}")


def test_session_refuses_a_change_of_its_statistics_and_writes_nothing(pair, tmp_path):
    r = pair["root"]
    with RepairSession(pair["base"], pair["lora"], r / "hon.jsonl", r / "task.jsonl", RepairOptions(**SMALL)) as s:
        with pytest.raises(UserError, match=r"--num-samples cannot change within a RepairSession"):
            s.write(tmp_path / "a", num_samples=4)
        with pytest.raises(UserError, match="--r-cw must be in"):
            s.write(tmp_path / "b", r_cw=2.0)
        with pytest.raises(UserError, match="unknown repair option 'rcw'"):
            s.write(tmp_path / "c", rcw=0.2)
        s.write(tmp_path / "d", seed=3, selection="random")  # selection-only options may change
        with pytest.raises(UserError, match="already exists"):
            s.write(tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize("ft", ["lora", "full"])
def test_sft_session_snapshots_equal_fresh_runs_and_keep_the_adapter_rank(pair, tmp_path, ft):
    r = pair["root"]
    with RepairSession(pair["base"], pair[ft], r / "hon.jsonl", r / "task.jsonl", RepairOptions(**SMALL)) as s:
        s.sft([1, 3])
        rep = s.write(tmp_path / "s1", method="sft", steps=1)
        s.write(tmp_path / "s3", method="sft", steps=3)
        assert s.timings["sft"] > 0
        s.write(tmp_path / "hcnr")  # the model is left as it was found: hcnr after sft is a plain hcnr
    _run(pair, ft, tmp_path / "r1", method="sft", steps=1)
    _run(pair, ft, tmp_path / "hcnr_fresh")
    assert rep["settings"]["method"] == "sft" and len(rep["sft"]["losses"]) == 1
    for a, b in (("s1", "r1"), ("hcnr", "hcnr_fresh")):
        ta, tb = _tensors(tmp_path / a), _tensors(tmp_path / b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(x, y) for x, y in zip(_tensors(tmp_path / "s1").values(),
                                                     _tensors(tmp_path / "s3").values()))
    if ft == "lora":
        import json

        cfg = json.loads((tmp_path / "s1" / "adapter_config.json").read_text())
        assert rep["format"] == "adapter" and cfg["r"] == 8
    else:
        assert rep["format"] == "checkpoint"


def test_adapters_record_the_base_as_given(pair, tmp_path, monkeypatch):
    """Issue 12 item 6: `base_model_name_or_path` is what the user passed as --base (here a relative path), for the
    exact adapter and the SVD one alike; the report keeps the resolved folder beside it."""
    import json

    monkeypatch.chdir(pair["root"])
    r = pair["root"]
    for ft, kw in (("lora", {}), ("full", dict(format="adapter", max_rank=8))):
        out = tmp_path / ft
        rep = run_repair("base", pair[ft], r / "hon.jsonl", r / "task.jsonl", out, **SMALL, **kw)
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
        assert rep["settings"]["base"] == "base" and rep["base"] == str(pair["base"].resolve())
        assert (out / "README.md").is_file()
