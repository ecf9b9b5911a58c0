"""The training baselines (hcnr_deploy/scenario/baselines.py): the refusal-data subsets, the preference pairs, and
real (few-step) RAIT / DPO / ORPO trainings with TRL on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from eval_harness.errors import UserError
from hcnr_deploy.scenario import baselines as B
from hcnr_deploy.scenario import data as scen_data
from hcnr_deploy.scenario.builds import baseline_sizes, build_baseline
from hcnr_deploy.scenario.cache import Steps
from hcnr_deploy.scenario.recipes import RECIPES

REFUSAL = scen_data.REFUSALS["future"]


def _rows(n_ref, n_ans):
    return ([{"prompt": f"unknown {i}?", "response": REFUSAL} for i in range(n_ref)]
            + [{"prompt": f"known {i}?", "response": f"answer {i}."} for i in range(n_ans)])


def test_importing_trl_leaves_the_environment_alone():
    """TRL's import sets VLLM_LOGGING_LEVEL=ERROR for the process; a vLLM server started after a baseline trained
    would inherit it and log nothing (our plugin's line included). A fresh interpreter, so trl is not yet imported."""
    code = ("import os; from hcnr_deploy.scenario import baselines as B; before = dict(os.environ); "
            "B.import_trl('trl'); B.import_trl('trl.experimental.orpo'); import trl; "
            "print(dict(os.environ) == before, 'VLLM_LOGGING_LEVEL' in os.environ)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"})
    assert out.stdout.split() == ["True", "False"], out.stderr[-2000:]


def test_refusal_subset_is_nested_seeded_and_keeps_the_share():
    rows = _rows(80, 20)
    small, large = B.refusal_subset(rows, 10, seed=3), B.refusal_subset(rows, 50, seed=3)
    assert sum(map(B.is_refusal_row, small)) == 8 and sum(map(B.is_refusal_row, large)) == 40
    small_ids = {r["prompt"] for r in small}
    assert small_ids <= {r["prompt"] for r in large}  # nested: a larger size adds rows
    assert B.refusal_subset(rows, 10, seed=3) == small
    assert {r["prompt"] for r in B.refusal_subset(rows, 10, seed=4)} != small_ids
    assert len(B.refusal_subset(rows, 100, seed=0)) == 100
    for bad in (0, 101):
        with pytest.raises(UserError, match="refusal-data size"):
            B.refusal_subset(rows, bad, seed=0)


def test_preference_pairs_prefer_refusals_on_unanswerable_and_answers_on_answerable():
    rows = _rows(2, 1)
    own = {"unknown 0?": "He was born in Paris.", "unknown 1?": "A baker."}
    pairs = B.preference_pairs(rows, own)
    assert pairs[0] == {"prompt": "unknown 0?", "chosen": REFUSAL, "rejected": "He was born in Paris."}
    assert pairs[2] == {"prompt": "known 0?", "chosen": "answer 0.", "rejected": B.REJECTED_REFUSAL}
    with pytest.raises(UserError, match="no fine-tune answer"):
        B.preference_pairs(rows, {"unknown 0?": "x"})


def test_steps_and_pair_batch():
    assert B.steps_for(64, 8, 32) == 16 and B.steps_for(10, 1, 32) == 1 and B.steps_for(33, 1, 32) == 2
    assert B.pair_batch(32) == 16 and B.pair_batch(1) == 1


def _margin(model, tok, pairs):
    """Sum over pairs of log p(chosen) - log p(rejected) under `model` (response tokens after the chat prompt)."""
    from hcnr_deploy.scenario.train import encode_pair

    def logp(prompt, response):
        ids, labels = encode_pair(tok, prompt, response, 128)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1)
        tgt = torch.tensor(labels[1:])
        keep = tgt != -100
        return float(lp[keep].gather(1, tgt[keep][:, None]).sum())

    return sum(logp(p["prompt"], p["chosen"]) - logp(p["prompt"], p["rejected"]) for p in pairs)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_training_moves_the_fine_tune_toward_chosen(method, tiny_base, tiny_lora, tmp_path):
    """A few TRL steps on 8 pairs: the adapter changes, the chosen-over-rejected margin grows, no "ref" adapter
    is left (DPO's reference copy), and the trained adapter is the fine-tune's own (same modules and rank)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                                      tiny_lora, is_trainable=True)
    rows = _rows(6, 2)
    pairs = B.preference_pairs(rows, {r["prompt"]: "Born in Velmar town." for r in rows})
    before_w = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model.eval()
    before = _margin(model, tok, pairs)
    fn = B.train_dpo if method == "dpo" else B.train_orpo
    losses = fn(model, tok, pairs, tmp_path, epochs=4, batch_size=4, lr=5e-3, seed=0, bf16=False)
    model.eval()
    assert len(losses) == 8 and all(map(lambda x: x == x, losses))
    assert _margin(model, tok, pairs) > before + 1.0
    assert list(model.peft_config) == ["default"]
    after_w = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert set(after_w) == set(before_w)
    assert any(not torch.equal(before_w[n], after_w[n]) for n in before_w)


def test_build_baseline_trains_each_method_on_its_size_and_caches(tiny_base, tiny_lora, tmp_path):
    """build_baseline on the CI scenario's rait_train: each method writes a loadable adapter on base with its data
    size and times in step.json; a second call is the cached folder, a fresh cache the same bytes (seeded TRL and
    SFT); sizes are capped by the file."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    scen = tmp_path / "data"
    scen_data.write(scen, scen_data.CI_SIZE, seed=0)
    recipe = replace(RECIPES["ci"], ft_batch=4, baseline_epochs=1, max_tokens=4)
    n_rows = len((scen / "rait_train.jsonl").read_text().splitlines())
    assert baseline_sizes(replace(recipe, baseline_sizes=(8, 10_000)), scen) == [8, n_rows]
    steps = Steps(tmp_path / "cache")
    ft = load_file(tiny_lora / "adapter_model.safetensors")
    for method in B.METHODS:
        out = build_baseline(steps, recipe, tiny_base, tiny_lora, scen, method, 8)
        info = json.loads((out / "step.json").read_text())
        assert info["method"] == method and info["data_size"] == 8 and info["train_seconds"] > 0
        assert info["pairs"] == (0 if method == "rait" else 8)
        new = load_file(out / "adapter_model.safetensors")
        assert set(new) == set(ft) and any(not torch.equal(new[k], ft[k]) for k in ft)
        base_cfg = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert base_cfg == str(tiny_base.resolve())
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out)
        assert build_baseline(Steps(tmp_path / "cache"), recipe, tiny_base, tiny_lora, scen, method, 8) == out
        again = build_baseline(Steps(tmp_path / f"cache-{method}"), recipe, tiny_base, tiny_lora, scen, method, 8)
        assert (again / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()
    answers = json.loads(next((tmp_path / "cache").glob("ft-answers-*/answers.json")).read_text())
    unanswerable = [json.loads(line)["prompt"] for line in (scen / "rait_train.jsonl").read_text().splitlines()
                    if B.is_refusal_row(json.loads(line))]
    assert sorted(answers) == sorted(set(unanswerable))
    with pytest.raises(UserError, match="unknown baseline"):
        build_baseline(steps, recipe, tiny_base, tiny_lora, scen, "ppo", 8)
