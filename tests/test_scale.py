"""Repair at scale (issue 6): streaming checkpoint I/O, block-by-block passes that equal the whole-model ones and
leave no state behind, and the batched Fisher reduction against naive per-sample gradients."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hcnr_deploy.data import batches
from hcnr_deploy.equations.importance import per_sample_response_loss
from hcnr_deploy.engine import streaming
from hcnr_deploy.engine.hooks import FisherHooks
from hcnr_deploy.engine.streaming import (accumulate_hessians, block_hessians, blockwise_backward, decoder_blocks,
                                          fisher_importance, layer_inputs)
from hcnr_deploy.io.checkpoint import Checkpoint
from hcnr_deploy.io.shards import ShardWriter
from hcnr_deploy.tiny import reshard

from conftest import float64_tiny_model, repair_pair, token_samples


def _write_sharded(folder, tensors: dict, shards: int):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    reshard(folder, shards)


def test_streaming_reader_writer_round_trip(tmp_path):
    """A sharded checkpoint read one shard at a time and written shard by shard gives the same tensors, bytes,
    dtypes and layout (index included)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(5, 7, generator=gen) for i in range(4)}
    tensors["model.embed_tokens.weight"] = torch.randn(11, 5, generator=gen).to(torch.bfloat16)
    tensors["model.norm.weight"] = torch.ones(5, dtype=torch.float16)
    tensors["lm_head.weight"] = torch.randn(11, 5, generator=gen).double()
    src = tmp_path / "src"
    _write_sharded(src, tensors, shards=3)
    ck = Checkpoint(src)
    assert ck.names() == sorted(tensors)
    assert len(ck.shards()) == 3
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out)
    seen = []
    for file, names in ck.shards():
        shard = dict(ck.iter_shard(file, names))
        seen.append(set(shard))
        writer.write_shard(file, shard)
    writer.finish()
    (out / "config.json").write_text((src / "config.json").read_text())
    assert seen == [set(names) for _, names in ck.shards()]  # one shard's tensors in hand at a time
    src_index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == src_index
    assert out_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    back = Checkpoint(out)
    for name, t in back.iter_tensors(back.names()):
        assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name]), name
        assert ck.shape(name) == tuple(t.shape)
    for file in sorted(set(src_index.values())):  # each output shard holds exactly its source shard's tensors
        with safe_open(src / file, "pt") as a, safe_open(out / file, "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())


def test_single_shard_writer_writes_no_index(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.write_shard("model.safetensors", {"a": torch.arange(6.0).view(2, 3).T})  # non-contiguous in
    writer.finish()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as h:
        assert torch.equal(h.get_tensor("a"), torch.arange(6.0).view(2, 3).T)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_model(request):
    return float64_tiny_model(request.param, num_layers=3)


def _samples():
    return token_samples([(5, 3), (2, 6), (7, 2), (3, 3), (4, 1), (6, 4)])


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def _state(model):
    """Everything a pass could leave behind on the model."""
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), "forward" in vars(m),
                m.training) for n, m in model.named_modules()}


def test_fisher_on_a_batch_equals_naive_per_sample_gradients(tiny_model):
    """The batched, block-by-block, hook-reduced Fisher of Eq. 4 equals per-sample autograd on the weights,
    sample by sample, for every decoder Linear (column sums of squared gradients, averaged)."""
    names = sorted(_linears(tiny_model))
    samples = _samples()
    ref = {n: 0 for n in names}
    weights = [tiny_model.get_submodule(n).weight for n in names]
    for ids, mask in samples:
        for w in weights:
            w.requires_grad_(True)
        ids_t = torch.tensor([ids])
        loss = per_sample_response_loss(tiny_model(input_ids=ids_t).logits, ids_t, torch.tensor([mask]))[0]
        for n, g in zip(names, torch.autograd.grad(loss, weights)):
            ref[n] = ref[n] + g.square().sum(0)
        for w in weights:
            w.requires_grad_(False)
    before = _state(tiny_model)
    got = fisher_importance(tiny_model, _linears(tiny_model), batches(samples, 4), len(samples))  # 4 + 2, padded
    for n in names:
        torch.testing.assert_close(got[n].double(), ref[n] / len(samples), rtol=1e-6, atol=1e-12)
    assert _state(tiny_model) == before
    assert not any(p.requires_grad or p.grad is not None for p in tiny_model.parameters())


def test_blockwise_fisher_equals_whole_graph_fisher(tiny_model, monkeypatch):
    modules = _linears(tiny_model)
    samples = _samples()
    block = fisher_importance(tiny_model, modules, batches(samples, 3), len(samples))
    monkeypatch.setattr(streaming, "decoder_blocks", lambda model: None)
    whole = fisher_importance(tiny_model, modules, batches(samples, 3), len(samples))
    for n in modules:
        torch.testing.assert_close(block[n], whole[n], rtol=1e-9, atol=0)


def test_blockwise_backward_stops_at_lowest_block_and_pages_blocks(tiny_model):
    blocks = decoder_blocks(tiny_model)
    b = next(batches(_samples(), 6))
    calls = []
    modules = {n: m for n, m in _linears(tiny_model).items()}
    with FisherHooks(tiny_model, modules, embeddings=False) as hooks:
        blockwise_backward(tiny_model, blocks, b.input_ids, b.attention_mask, b.loss_mask, lowest=2,
                           move=lambda layer, on: calls.append((blocks[1].index(layer), on)))
    assert {n for n in hooks.sums} == {n for n in modules if ".layers.2." in n}
    # every block is paged in and out around its forward; the blocks above `lowest` again around the backward
    assert calls == [(0, True), (0, False), (1, True), (1, False), (2, True), (2, False), (2, True), (2, False)]


def test_layer_inputs_restores_blocks_even_on_error(tiny_model):
    decoder, layers = decoder_blocks(tiny_model)
    b = next(batches(_samples(), 2))
    before = _state(tiny_model)
    h, kwargs = layer_inputs(decoder, layers, b.input_ids, b.attention_mask)
    assert len(kwargs) == len(layers)
    torch.testing.assert_close(h, tiny_model.get_input_embeddings()(b.input_ids))
    assert _state(tiny_model) == before
    with pytest.raises(Exception):
        layer_inputs(decoder, layers, b.input_ids[:, :0].float(), b.attention_mask)
    assert _state(tiny_model) == before


def test_block_streamed_hessians_equal_whole_model_hessians(tiny_model):
    """Running the batches through one block at a time gives each block's X X^T exactly as hooks on a full
    forward do; hooks are gone afterwards."""
    decoder, layers = decoder_blocks(tiny_model)
    modules = _linears(tiny_model)
    samples = _samples()
    ref, ref_tokens = accumulate_hessians(tiny_model, modules, batches(samples, 4))
    before = _state(tiny_model)
    stream = []
    for b in batches(samples, 4):
        h, kw = layer_inputs(decoder, layers, b.input_ids, b.attention_mask)
        stream.append({"h": h, "kwargs": kw, "mask": b.attention_mask})
    for i, layer in enumerate(layers):
        mods = {n: m for n, m in modules.items() if f".layers.{i}." in n}
        hooks, tokens = block_hessians(layer, mods, stream, i)
        assert tokens == ref_tokens
        for n in mods:
            torch.testing.assert_close(hooks.hessian(n), ref.hessian(n), rtol=1e-10, atol=1e-10)
    assert _state(tiny_model) == before


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    words = "the capital city river country born wrote unknown answer question sure Paris 1492".split()
    return repair_pair(tmp_path_factory.mktemp("scale"), "llama", 10, words)


@pytest.mark.parametrize("ft, kw", [("full", dict(hessian_inputs="sequential")),
                                    ("lora", dict(compensation="task-aware", hessian_inputs="base"))])
def test_block_streamed_stage2_gives_the_bytes_of_whole_model_passes(tiny_pair, tmp_path, monkeypatch, ft, kw):
    """Stage 2 streamed one block at a time (per-block base/fine-tune switching, sequential repairs) writes the
    same bytes as whole-model calibration passes over one-block groups."""
    from hcnr_deploy import repair
    from hcnr_deploy.repair import candidates

    r = tiny_pair["root"]

    def run(out, **extra):
        repair.run_repair(tiny_pair["base"], tiny_pair[ft], r / "hon.jsonl", r / "task.jsonl", out, num_samples=10,
                          max_length=40, batch_size=4, **kw, **extra)
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    streamed = run(tmp_path / "streamed")
    monkeypatch.setattr(candidates, "decoder_blocks", lambda model: None)
    whole = run(tmp_path / "whole", hessian_memory_gb=1e-9)
    assert streamed and streamed == whole
