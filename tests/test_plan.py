"""Issue 20: `repair --plan` / `sweep --plan` from config.json alone, and the refusal of a run that cannot fit."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from eval_harness.errors import UserError
from hcnr_deploy.cli import main
from hcnr_deploy.engine import plan as P
from hcnr_deploy.repair import run_repair, session

from conftest import repair_pair

WORDS = "the capital city river country born wrote unknown answer question sure Paris 1492 future".split()
LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return repair_pair(tmp_path_factory.mktemp("plan"), "llama", 8, WORDS)


def test_plan_of_llama_8b_follows_the_shape():
    """Parameters of Llama-3.1-8B; one block's float32 Grams are 4 (3 h^2 + I^2) bytes per stream; the stage-2
    memory does not depend on the depth; the blocks are spread over the 8 GPUs (placement.py)."""
    shape = P.Shape.from_config(LLAMA_8B)
    assert shape.params == 8_030_261_248
    kw = dict(num_samples=128, max_length=512, batch_size=8, gpus=8)
    p32 = P.plan(shape, [("hcnr", {})], **kw)
    assert p32["stages"]["grams_per_block"] == 4 * (3 * 4096**2 + 14336**2)
    assert len(p32["gpu_bytes"]) == 8 and min(p32["gpu_bytes"]) > 0 and p32["model_bytes"] == 2 * shape.params
    assert sum(p32["gpu_bytes"]) > p32["model_bytes"] > max(p32["gpu_bytes"])
    deeper = P.plan(P.Shape.from_config({**LLAMA_8B, "num_hidden_layers": 64}), [("hcnr", {})], **kw)
    assert deeper["stages"]["stage2"] == p32["stages"]["stage2"]
    sweep = P.plan(shape, [("hcnr", {"r_cw": 0.4}), ("regmean", {}), ("scale", {})], **kw)
    assert sweep["stages"]["grams_per_block"] == 2 * p32["stages"]["grams_per_block"]  # + the task stream
    off = P.plan(shape, [("hcnr", {})], **{**kw, "offload": True})
    one = P.plan(shape, [("hcnr", {})], **{**kw, "gpus": 1})
    off = P.plan(shape, [("hcnr", {})], **{**kw, "gpus": 1, "offload": True})
    assert off["gpu_bytes"][0] < one["gpu_bytes"][0] - 12 * 2**30 and off["host_bytes"] > p32["model_bytes"]


def test_repair_and_sweep_plan_json_read_only_the_config(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(session, "load_model", lambda *a, **k: pytest.fail("the plan loaded the model"))
    r = CliRunner().invoke(main, ["repair", "--base", str(pair["base"]), "--finetuned", str(pair["lora"]), "--plan",
                                  "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    assert set(p) >= {"gpu_bytes", "host_bytes", "disk_bytes", "flops"} and p["gpu_bytes"] == []
    assert p["host_bytes"] > P.INTERPRETER_BYTES and p["flops"]["fisher"] > 0
    r = CliRunner().invoke(main, ["sweep", "--base", str(pair["base"]), "--finetuned", str(pair["lora"]), "--plan"])
    assert r.exit_code == 0 and "host RAM" in r.output and "FLOPs" in r.output, r.output
    r = CliRunner().invoke(main, ["repair", "--base", str(pair["base"]), "--finetuned", str(pair["lora"])])
    assert r.exit_code == 2 and "Missing option '--honesty-data'" in r.output  # a real run still needs its inputs


def test_plan_of_a_hub_id_not_in_the_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^--base meta-llama/Llama-3.1-8B: no local folder and no config.json "
                                        r"of that hub id in the local Hugging Face cache"):
        P.read_config("meta-llama/Llama-3.1-8B")


def test_a_run_the_plan_says_cannot_fit_stops_before_loading_and_writes_nothing(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "available_memory", lambda: {"host": 200 << 20, "gpus": []})
    monkeypatch.setattr(session, "load_model", lambda *a, **k: pytest.fail("loaded before the refusal"))
    r = pair["root"]
    with pytest.raises(UserError) as err:
        run_repair(pair["base"], pair["lora"], r / "hon.jsonl", r / "task.jsonl", tmp_path / "out", device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("this run cannot fit: the plan needs ")
    assert "--max-length" in msg and "--num-samples" in msg
    assert not (tmp_path / "out").exists()


def test_refusal_names_offload_and_gpus_when_the_gpu_is_short():
    p = P.plan(P.Shape.from_config(LLAMA_8B), [("hcnr", {})], num_samples=128, max_length=512, batch_size=8, gpus=1)
    msg = P.refusal(p, {"host": 1 << 40, "gpus": [20 << 30]}, offload=False, sweep=True)
    assert "on GPU 0" in msg and "--offload" in msg and "more GPUs" in msg and "--grid" in msg
    assert P.refusal(p, {"host": 1 << 40, "gpus": [140 << 30]}, offload=False) is None
