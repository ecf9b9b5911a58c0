"""The guard's fit: features against transformers' hidden states, the folded probe, thresholds on hand numbers, the
calibration set's labels and split, and a probe that finds a planted signal."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from eval_harness.errors import UserError
from hcnr_deploy.guard import calibration as C
from hcnr_deploy.guard import fit as G
from hcnr_deploy.guard.options import GuardOptions


def test_threshold_at_false_refusal_on_hand_numbers():
    s = np.array([0.1, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0])
    assert G.threshold_at_false_refusal(s, 0.0) == 1.0           # nothing above the maximum
    t = G.threshold_at_false_refusal(s, 0.2)                       # 2 of 10 may be refused
    assert t == 0.8 and G.refusal_rate(s, t) == pytest.approx(0.2)
    t = G.threshold_at_false_refusal(s, 0.25)                      # floor(2.5) = 2
    assert G.refusal_rate(s, t) == pytest.approx(0.2)
    assert G.refusal_rate(s, G.threshold_at_false_refusal(s, 1.0)) == 1.0
    ties = np.array([0.5, 0.5, 0.5, 0.1])                          # ties never push the rate above the target
    assert G.refusal_rate(ties, G.threshold_at_false_refusal(ties, 0.5)) <= 0.5


def test_guard_threshold_keeps_every_kind_under_the_rate():
    scores = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0])
    t, rates = G.guard_threshold(scores, {"honesty": np.array([0, 1, 2, 3]), "task": np.array([4, 5, 6, 7])}, 0.25)
    assert t == 12.0 and rates == {"honesty": 0.0, "task": 0.25}


def test_fold_probe_equals_the_pipeline_decision_function():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6)) * np.array([1, 10, 0.1, 5, 2, 1]) + np.array([3, -2, 0, 1, 0, 7])
    y = (x[:, 0] + 0.1 * x[:, 1] + rng.normal(size=80) * 0.5 > 2).astype(int)
    from hcnr_deploy.probe.fit import fit_probe

    pipe, _ = fit_probe(x, y, seed=0)
    w, b = G.fold_probe(pipe)
    np.testing.assert_allclose(G.probe_scores(x, w, b), pipe.decision_function(x), rtol=1e-9, atol=1e-9)


def test_normed_features_equal_transformers_hidden_states(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    from hcnr_deploy.guard.features import extract

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    feats = extract(model, prompts, pad_id=0, batch_size=2)
    assert feats.shape == (model.config.num_hidden_layers, 3, model.config.hidden_size)
    for i, p in enumerate(prompts):  # one prompt at a time, no padding: the naive reference
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states
        for block in range(model.config.num_hidden_layers - 1):
            with torch.no_grad():
                ref = model.model.norm(hs[block + 1][0, -1]).numpy()
            np.testing.assert_allclose(feats[block, i], ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(feats[-1, i], hs[-1][0, -1].numpy(), rtol=1e-4, atol=1e-5)  # already normed


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_calibration_labels_refusal_text_and_split(tmp_path):
    hon = [{"prompt": f"who is person {i}?", "response": "The answer is unknown." if i % 2 else f"Person {i}."}
           for i in range(40)]
    hon[1]["response"] = "I'm not sure."
    _write(tmp_path / "h.jsonl", hon)
    _write(tmp_path / "t.jsonl", [{"prompt": f"passage {i}. where?", "response": "Here."} for i in range(10)])
    cal = C.build_set(tmp_path / "h.jsonl", tmp_path / "t.jsonl", num_samples=None, calibration_dir=None,
                      benchmarks=None, per_class=None, refusal_text=None, seed=0)
    assert cal.labels.tolist() == [i % 2 for i in range(40)] + [0] * 10
    assert cal.kinds == ["honesty"] * 40 + ["task"] * 10
    assert cal.refusal_text == "The answer is unknown."              # the most common refusal
    assert C.check_refusal_text(cal.refusal_text) == []
    assert C.too_few_answerable(cal) is None
    fit, held = C.held_out_split(cal, 0.4, seed=0)
    assert sorted(fit.tolist() + held.tolist()) == list(range(50))
    assert len(held) == 8 + 8 + 4                                      # 40% of each (kind, label) group
    again = C.held_out_split(cal, 0.4, seed=0)
    assert np.array_equal(held, again[1])


def test_calibration_warns_without_answerable_questions_of_its_kind(tmp_path):
    _write(tmp_path / "h.jsonl", [{"prompt": f"q{i}?", "response": "The answer is unknown."} for i in range(20)]
           + [{"prompt": "q?", "response": "Yes."}])
    _write(tmp_path / "t.jsonl", [{"prompt": f"t{i}?", "response": "Here."} for i in range(20)])
    cal = C.build_set(tmp_path / "h.jsonl", tmp_path / "t.jsonl", num_samples=None, calibration_dir=None,
                      benchmarks=None, per_class=None, refusal_text=None, seed=0)
    assert "1 answerable questions of its own kind beside 20" in C.too_few_answerable(cal)


def test_calibration_from_a_benchmark_folder_is_balanced(tmp_path):
    from conftest import SHARED_DATA

    _write(tmp_path / "h.jsonl", [{"prompt": "q?", "response": "The answer is unknown."}])
    _write(tmp_path / "t.jsonl", [{"prompt": f"t{i}?", "response": "Here."} for i in range(5)])
    cal = C.build_set(tmp_path / "h.jsonl", tmp_path / "t.jsonl", num_samples=None, calibration_dir=SHARED_DATA,
                      benchmarks="selfaware", per_class=30, refusal_text=None, seed=0)
    assert int(cal.labels[:60].sum()) == 30 and len(cal) == 65
    assert cal.messages[0][-1]["role"] == "user" and set(cal.sources[:60]) == {"selfaware"}


def test_no_refusal_in_the_honesty_data_is_a_one_line_error(tmp_path):
    _write(tmp_path / "h.jsonl", [{"prompt": "q?", "response": "Yes."}])
    _write(tmp_path / "t.jsonl", [{"prompt": "t?", "response": "Here."}])
    with pytest.raises(UserError, match="--refusal-text"):
        C.build_set(tmp_path / "h.jsonl", tmp_path / "t.jsonl", num_samples=None, calibration_dir=None,
                    benchmarks=None, per_class=None, refusal_text=None, seed=0)


def test_guard_options_are_checked():
    with pytest.raises(UserError, match="--false-refusal must be in"):
        GuardOptions(false_refusal=1.0)
    with pytest.raises(UserError, match="--block must be"):
        GuardOptions(block="last")


def test_probe_finds_a_planted_signal(tiny_base, tmp_path):
    """Unanswerable questions carry a marker word; the probe must find it (held-out AUROC near 1 at its best block),
    and must not find anything when the labels are shuffled."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hcnr_deploy.guard.run import fit_guard

    rng = random.Random(0)
    words = ["river", "town", "bridge", "market", "school", "garden", "harbor", "mill", "tower", "road"]
    rows = []
    for i in range(120):
        q = " ".join(rng.choice(words) for _ in range(6))
        unans = i % 2 == 1
        rows.append({"prompt": ("zebra " if unans else "") + q + "?",
                     "response": "The answer is unknown." if unans else "It is here."})
    _write(tmp_path / "h.jsonl", rows)
    _write(tmp_path / "t.jsonl", [{"prompt": "where is the mill?", "response": "Here."}] * 4)
    cal = C.build_set(tmp_path / "h.jsonl", tmp_path / "t.jsonl", num_samples=None, calibration_dir=None,
                      benchmarks=None, per_class=None, refusal_text=None, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    gf = fit_guard(model, tok, cal, held_out=0.4, seed=0, batch_size=16)
    best = G.best_block(gf.probes)
    assert best.auroc > 0.95
    t, rates = gf.threshold(best.block, 0.05)
    assert rates["honesty"] <= 0.05 and rates["task"] <= 0.05
    shuffled = C.CalibrationSet(cal.messages, np.array(np.random.default_rng(1).permutation(cal.labels)),
                                cal.kinds, cal.sources, cal.refusal_text)
    control = fit_guard(model, tok, shuffled, held_out=0.4, seed=0, batch_size=16)
    assert max(p.auroc for p in control.probes) < 0.8


def test_guard_command_writes_a_classifier_that_scores_like_the_probe(tiny_base, tiny_lora, tmp_path):
    """`hcnr-deploy guard` on a LoRA fine-tune: guard.json, and a classifier whose HF score on each prompt equals the
    fitted probe's decision function on the fine-tune's own features at the chosen block."""
    from click.testing import CliRunner

    from hcnr_deploy.cli import main
    from hcnr_deploy.guard import artifact as A
    from hcnr_deploy.guard.classifier import hf_scores
    from hcnr_deploy.guard.features import extract
    from hcnr_deploy.guard.run import load_finetune, render_messages

    rows = [{"prompt": ("zebra " if i % 2 else "") + f"where is the mill number {i}?",
             "response": "The answer is unknown." if i % 2 else "It is here."} for i in range(48)]
    _write(tmp_path / "h.jsonl", rows)
    _write(tmp_path / "t.jsonl", [{"prompt": f"passage {i}: the mill is red. what colour?", "response": "Red."}
                                  for i in range(16)])
    out = tmp_path / "guard"
    args = ["guard", "--base", str(tiny_base), "--finetuned", str(tiny_lora), "--honesty-data",
            str(tmp_path / "h.jsonl"), "--task-data", str(tmp_path / "t.jsonl"), "--out", str(out),
            "--false-refusal", "0.1", "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    spec = A.read_spec(out)
    assert spec.refusal_text == "The answer is unknown." and spec.false_refusal_target == 0.1
    assert spec.fingerprints["finetuned"] == A.content_fingerprint(tiny_lora)
    assert len(spec.extra["blocks"]) == spec.num_blocks and 0 <= spec.block < spec.num_blocks
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "classifier", "guard.json"]
    model, tok, _ = load_finetune(str(tiny_base), str(tiny_lora), "cpu", "float32")
    msgs = [[{"role": "user", "content": r["prompt"]}] for r in rows[:10]]
    prompts = render_messages(tok, msgs)
    feats = extract(model, prompts, tok.pad_token_id)[spec.block]
    from safetensors.torch import load_file

    head = {k: v for f in (out / "classifier").glob("*.safetensors") for k, v in load_file(f).items()
            if k.startswith("score.")}
    expected = feats.astype(np.float64) @ head["score.weight"][0].double().numpy() + float(head["score.bias"][0])
    np.testing.assert_allclose(hf_scores(out / "classifier", prompts), expected, rtol=1e-4, atol=1e-4)
    again = CliRunner().invoke(main, args)                      # an existing --out is refused, nothing changed
    assert again.exit_code != 0 and "--overwrite" in again.output


def test_guard_device_is_one_device_a_gpu_list_is_a_one_line_error(tiny_base, tiny_lora, tmp_path, monkeypatch):
    """`guard --device cuda:0,1` (a repair's multi-GPU list) on a machine with two GPUs: the guard's forward holds
    the whole model on one device, so the list is refused before any work (exit 2, one line, nothing written)."""
    import torch
    from click.testing import CliRunner

    from hcnr_deploy.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _write(tmp_path / "h.jsonl", [{"prompt": f"q{i}?", "response": "The answer is unknown." if i % 2 else "Yes."}
                                  for i in range(16)])
    _write(tmp_path / "t.jsonl", [{"prompt": f"t{i}?", "response": "Red."} for i in range(8)])
    out = tmp_path / "guard"
    res = CliRunner().invoke(main, ["guard", "--base", str(tiny_base), "--finetuned", str(tiny_lora),
                                    "--honesty-data", str(tmp_path / "h.jsonl"), "--task-data",
                                    str(tmp_path / "t.jsonl"), "--out", str(out), "--device", "cuda:0,1", "-q"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, (res.exit_code, res.output, res.exception)
    assert "--device cuda:0,1" in lines[0] and "one device" in lines[0] and "auto, cpu, cuda" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.jsonl", "t.jsonl"]


def test_fit_bytes_by_hand_and_the_70b_fit_does_not_fit_one_80gb_gpu(monkeypatch):
    from pathlib import Path

    from hcnr_deploy.guard.memory import TOKENS_BOUND, fit_bytes

    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 100, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16"}
    from hcnr_deploy.engine.plan import Shape

    b = fit_bytes(cfg, on_gpu=True, dtype="auto", items=10, batch_size=2)
    assert b["model"] == Shape.from_config(cfg).params * 2  # bfloat16 on a GPU
    assert b["features"] == 3 * 10 * 64 * 4 and b["batch"] == 2 * TOKENS_BOUND * (6 * 64 + 4 * 128) * 2
    assert b["total"] == b["model"] + b["features"] + b["batch"]
    assert fit_bytes(cfg, on_gpu=False, dtype="auto", items=10, batch_size=2)["model"] == b["model"] * 2  # fp32
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from plan_scale_table import CONFIGS

    seventy = fit_bytes(CONFIGS["Llama-3.1-70B"], on_gpu=True, dtype="auto", items=512, batch_size=8)["total"]
    assert 80 * 10**9 < seventy < 160 * 10**9


def test_guard_that_cannot_fit_its_device_is_refused_before_loading(tiny_base, tiny_lora, tmp_path, monkeypatch):
    """The guard's fit needs the whole fine-tune on one device: with less free memory than the plan's figure, the
    command stops before loading anything (exit 2, one line naming the fix, nothing written)."""
    from click.testing import CliRunner

    from hcnr_deploy.cli import main
    from hcnr_deploy.guard import memory

    monkeypatch.setattr(memory, "available_memory", lambda: {"host": 1 << 20, "gpus": []})
    _write(tmp_path / "h.jsonl", [{"prompt": f"q{i}?", "response": "The answer is unknown." if i % 2 else "Yes."}
                                  for i in range(16)])
    _write(tmp_path / "t.jsonl", [{"prompt": f"t{i}?", "response": "Red."} for i in range(8)])
    res = CliRunner().invoke(main, ["guard", "--base", str(tiny_base), "--finetuned", str(tiny_lora),
                                    "--honesty-data", str(tmp_path / "h.jsonl"), "--task-data",
                                    str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "guard"), "--device", "cpu",
                                    "-q"])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, (res.exit_code, res.output, res.exception)
    assert "whole fine-tune on one device" in lines[0] and "the host has 0.0 GiB free" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.jsonl", "t.jsonl"]
