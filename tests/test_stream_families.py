"""Every family streamed (issue 20, item 3): block streaming decided from the model's own modules, the head on the
response positions only, and the result equal to the model's own whole-model forward with full logits."""

from __future__ import annotations

import json

import pytest
import torch

from hcnr_deploy.data import batches
from hcnr_deploy.engine import families, streaming
from hcnr_deploy.engine.families import STREAMED, WHOLE_MODEL, WHOLE_MODEL_FULL_LOGITS, StreamPlan
from hcnr_deploy.engine.streaming import fisher_importance

from conftest import float64_tiny_model, repair_pair, token_samples


def _family(name: str):
    """A tiny float64 model of a family tiny.py does not build (random weights, seed 0)."""
    from transformers import AutoModelForCausalLM, OlmoConfig, Phi3Config

    config = {"phi3": Phi3Config, "olmo": OlmoConfig}[name](
        num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=64, pad_token_id=0, bos_token_id=None, eos_token_id=None, initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _model(name: str):
    return float64_tiny_model(name, 3) if name == "gemma3" else _family(name)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def _fisher(model, samples):
    return fisher_importance(model, _linears(model), batches(samples, 3), len(samples))


@pytest.mark.parametrize("name", ["gemma3", "phi3", "olmo"])
def test_streamed_fisher_equals_the_models_own_forward(name, monkeypatch):
    """The block-by-block Fisher (prologue recorded from the decoder, its own final norm, its own head on the
    response positions in chunks) equals per-sample losses from the model's full forward and full logits."""
    model = _model(name)
    plan = families.stream_plan(model)
    assert plan.path == STREAMED and plan.reason == ""
    assert plan.epilogue is model.get_decoder().norm
    samples = token_samples([(5, 4), (9, 3), (3, 7), (6, 6)])
    streamed = _fisher(model, samples)
    monkeypatch.setattr(streaming, "stream_plan", lambda m: StreamPlan(None, None, None, False, "forced"))
    monkeypatch.setattr(streaming, "decoder_blocks", lambda m: None)
    full = _fisher(model, samples)
    monkeypatch.setattr(streaming, "stream_plan", lambda m: StreamPlan(plan.decoder, None, None, True, "forced"))
    response_only = _fisher(model, samples)
    assert set(streamed) == set(_linears(model))
    for n in streamed:
        torch.testing.assert_close(streamed[n], full[n], rtol=1e-9, atol=0)
        torch.testing.assert_close(response_only[n], full[n], rtol=1e-9, atol=0)


@pytest.mark.parametrize("blocks", [True, False])
def test_the_head_sees_only_response_predicting_positions(blocks, monkeypatch):
    model = _model("gemma3")
    families.stream_plan(model)  # the probe's own two rows are not counted
    if not blocks:
        monkeypatch.setattr(streaming, "decoder_blocks", lambda m: None)
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    samples = token_samples([(5, 4), (9, 3), (3, 7)])
    _fisher(model, samples)
    handle.remove()
    assert sum(s[-2] for s in rows) == sum(sum(mask[1:]) for _, mask in samples) == 4 + 3 + 7


def test_the_streamed_head_applies_gemmas_soft_capping(monkeypatch):
    """Without the model's own head the streamed Fisher would miss the soft-capping: switching it off changes
    every matrix's scores, so the equality above depends on it."""
    model = _model("gemma3")
    samples = token_samples([(5, 4), (9, 3)])
    capped = _fisher(model, samples)
    monkeypatch.setattr(model.config, "final_logit_softcapping", None)
    uncapped = _fisher(model, samples)
    for n in capped:
        assert not torch.allclose(capped[n], uncapped[n], rtol=1e-3, atol=0)


def test_the_plan_from_config_json_is_the_plan_of_the_loaded_model():
    from transformers import AutoModelForCausalLM, GPT2Config

    for name in ("gemma3", "phi3", "olmo"):
        model = _model(name)
        assert families.config_stream_plan(model.config.to_dict()).path == families.stream_plan(model).path
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).eval()
    for plan in (families.stream_plan(gpt2), families.config_stream_plan(gpt2.config.to_dict())):
        assert plan.path != STREAMED and plan.reason == "the decoder keeps no `layers` list of blocks"
    unknown = families.config_stream_plan({"model_type": "no-such-family"})
    assert unknown.path == WHOLE_MODEL_FULL_LOGITS and "transformers does not know" in unknown.reason


def test_blocks_keep_a_forward_set_before_the_probe():
    """A forward set on a block's instance before (accelerate's hooks put one there) is put back, not deleted."""
    model = _model("olmo")
    layer = model.get_decoder().layers[0]
    own = layer.forward
    layer.forward = lambda *a, **k: own(*a, **k)
    mine = layer.forward
    families.probe(model)
    assert layer.__dict__["forward"] is mine


@pytest.fixture(scope="module")
def gemma_pair(tmp_path_factory):
    words = "the capital city river country born wrote unknown answer question sure Paris 1492".split()
    return repair_pair(tmp_path_factory.mktemp("gemma"), "gemma3", 10, words)


@pytest.mark.parametrize("ft, kw", [("full", {}), ("lora", dict(compensation="task-aware"))])
def test_gemma_repair_streamed_equals_the_whole_model_path(gemma_pair, tmp_path, monkeypatch, ft, kw):
    """A Gemma 3 style model (scaled embeddings, sliding / full attention, soft-capped logits) repaired with
    block streaming selects the same columns and writes the weights of the whole-model passes with the model's
    own full logits; report.json names the path."""
    from hcnr_deploy.repair import candidates, run_repair, session

    r = gemma_pair["root"]

    def run(out, **extra):
        report = run_repair(gemma_pair["base"], gemma_pair[ft], r / "hon.jsonl", r / "task.jsonl", out,
                            num_samples=10, max_length=40, batch_size=4, **kw, **extra)
        tensors = {}
        for f in sorted(out.glob("*.safetensors")):
            from safetensors.torch import load_file

            tensors.update(load_file(f))
        return report, tensors

    streamed, s_tensors = run(tmp_path / "streamed")
    assert streamed["calibration_passes"] == {"path": STREAMED}
    assert json.loads((tmp_path / "streamed" / "report.json").read_text())["calibration_passes"]["path"] == STREAMED
    for mod in (streaming, candidates, session):
        monkeypatch.setattr(mod, "decoder_blocks", lambda model: None)
    monkeypatch.setattr(streaming, "stream_plan", lambda m: StreamPlan(None, None, None, False, "forced"))
    whole, w_tensors = run(tmp_path / "whole", hessian_memory_gb=1e-9)
    assert [m["restored_columns"] for m in streamed["matrices"]] == [m["restored_columns"] for m in whole["matrices"]]
    assert sum(m["selected"] for m in streamed["matrices"]) > 0
    assert s_tensors.keys() == w_tensors.keys()
    for k in s_tensors:
        torch.testing.assert_close(s_tensors[k], w_tensors[k], rtol=1e-5, atol=1e-6)


def test_whole_model_passes_are_named_in_the_plan():
    from hcnr_deploy.engine import plan as P

    cfg = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1,
           "num_key_value_heads": 1, "head_dim": 64, "num_hidden_layers": 2, "vocab_size": 512}
    shape = P.Shape.from_config(cfg)
    assert shape.passes == STREAMED
    p = P.plan(shape, [("hcnr", {})], num_samples=8, max_length=32, batch_size=4)
    assert p["streamed"] and "not streamed" not in P.format_plan(p, "plan")
    whole = P.plan(P.Shape(**{**shape.__dict__, "passes": WHOLE_MODEL, "passes_reason": "why"}), [("hcnr", {})],
                   num_samples=8, max_length=32, batch_size=4)
    assert "not streamed block by block (why): " + WHOLE_MODEL in P.format_plan(whole, "plan")
