"""Issue 20 item 2: one forward per (model state, data set), the Grams riding on the Fisher pass (engine/passes.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hcnr_deploy.data import batches, encode, load_jsonl
from hcnr_deploy.engine import passes
from hcnr_deploy.io.checkpoint import Checkpoint, layer_index
from hcnr_deploy.io.finetune import FineTune
from hcnr_deploy.io.load import load_model, load_tokenizer
from hcnr_deploy.repair import run_repair
from hcnr_deploy.engine.state import ModelState
from hcnr_deploy.engine.statistics import Statistics, eligible, stream_block_grams
from hcnr_deploy.engine.streaming import decoder_blocks, fisher_importance

from conftest import repair_pair

WORDS = "the capital city river country born wrote unknown answer question sure Paris 1492 future".split()
SMALL = dict(num_samples=8, max_length=40, batch_size=3, device="cpu")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return repair_pair(tmp_path_factory.mktemp("passes"), "llama", 8, WORDS)


class _Bar:
    def add_task(self, *a, **k):
        return 0

    def advance(self, *a):
        pass


def _setup(pair, ft="lora"):
    base_ck = Checkpoint(pair["base"], "--base")
    finetune = FineTune(pair[ft], base_ck)
    model = load_model(pair["base"], torch.float32, "cpu")
    enc = encode(load_tokenizer(pair[ft], pair["base"]), load_jsonl(pair["root"] / "hon.jsonl", 8), 40)
    return model, ModelState(model, finetune, torch.float32), eligible(model, finetune), enc


@pytest.mark.parametrize("granularity", ["column", "element"])
def test_the_fused_pass_grams_and_fisher_equal_the_separate_passes(pair, granularity):
    """Fisher scores and every block's Gram sums (and token count) from the one fused forward are bit-identical to
    the separate Fisher pass's and the block-streamed Gram pass's; q/k/v and gate/up still share one Gram."""
    model, state, mats, enc = _setup(pair)
    stats = Statistics(model, state, mats, {"honesty": enc}, 3, "cpu", _Bar())
    stats.want_grams([("honesty", "base")])
    fused = stats.fisher("honesty", "base", granularity)
    store = stats.grams[("honesty", "base")]
    state.set("base")
    modules = {m.name: model.get_submodule(m.module) for m in mats}
    separate = fisher_importance(model, modules, batches(enc, 3), len(enc), granularity, "cpu",
                                 lowest_block=min(layer_index(m.name) for m in mats))
    assert fused.keys() == separate.keys() and all(torch.equal(fused[k], separate[k]) for k in fused)
    seen = 0
    for i, group, sums, counts in stream_block_grams(model, decoder_blocks(model), state, mats,
                                                     [("h", "base", enc)], 3, "cpu", _Bar(), lambda s: None):
        back = store.get(i, [m.name for m in group])
        assert counts["h"] == store.tokens > 0
        for m in group:
            assert torch.equal(back[m.name], sums["h"][m.name]), m.name
            seen += 1
        q, k = (f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qk")
        assert back[q] is back[k]
    assert seen == len(mats) and store.nbytes > 0
    folder = store.folder
    stats.close()
    assert not folder.exists()


@pytest.mark.parametrize("ft,kw", [("lora", dict()), ("full", dict(compensation="task-aware", task_weight=2.0)),
                                   ("lora", dict(method="regmean"))])
def test_repair_with_grams_from_the_fisher_pass_writes_the_same_bytes(pair, tmp_path, monkeypatch, ft, kw):
    """A repair whose Grams come from the Fisher pass writes the bytes of one that runs the Gram pass
    (today's path, fusion switched off), and leaves no Gram folder behind."""
    r = pair["root"]
    args = (pair["base"], pair[ft], r / "hon.jsonl", r / "task.jsonl")
    made = []
    real = passes.GramStore.__init__

    def tracked(self, label):
        real(self, label)
        made.append(self.folder)

    monkeypatch.setattr(passes.GramStore, "__init__", tracked)
    fused = run_repair(*args, tmp_path / "fused", **SMALL, **kw)
    assert bool(made) == (kw.get("method") != "regmean")  # regmean runs no Fisher pass: nothing to ride on
    assert not any(f.exists() for f in made)
    monkeypatch.setattr(Statistics, "want_grams", lambda self, streams: None)
    run_repair(*args, tmp_path / "separate", **SMALL, **kw)
    for f in sorted((tmp_path / "separate").glob("*.safetensors")):
        a, b = load_file(f), load_file(tmp_path / "fused" / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
    assert fused["matrices"]


def test_the_grams_ride_on_the_fisher_pass_on_the_cpu_only_and_the_plan_says_so():
    """On a GPU the forward is cheaper than the Grams' disk traffic (fuse_pays); the plan counts the fused streams
    and the bytes they put on disk (every eligible matrix of every block: 4 (3 h^2 + I^2) per block)."""
    from hcnr_deploy.engine import plan as P

    assert passes.fuse_pays("cpu") and not passes.fuse_pays("cuda:1")
    shape = P.Shape.from_config({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                                 "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
                                 "vocab_size": 128256, "torch_dtype": "bfloat16"})
    kw = dict(num_samples=16, max_length=64, batch_size=4)
    cpu, gpu = P.plan(shape, [("hcnr", {})], **kw), P.plan(shape, [("hcnr", {})], gpus=1, **kw)
    assert cpu["stages"]["fused_streams"] == 1 and cpu["stages"]["grams_on_disk"] == 32 * 4 * (3 * 4096**2 + 14336**2)
    assert gpu["stages"]["fused_streams"] == 0 and gpu["stages"]["grams_on_disk"] == 0
    assert cpu["flops"]["hessian"] < gpu["flops"]["hessian"]  # the forward it saves
    task_aware = P.plan(shape, [("hcnr", {"compensation": "task-aware"})], **kw)
    assert task_aware["stages"]["fused_streams"] == 2  # honesty on the base and task on the fine-tune


@pytest.mark.parametrize("ft", ["full"])
def test_fisher_scores_kept_on_disk_are_read_by_a_later_session_and_give_the_same_bytes(pair, tmp_path, ft):
    """A session with a statistics folder writes its Fisher scores there; a later one reads them instead of running
    the Fisher passes, and writes the bytes of a session without the folder (its Grams from stage 2's forward)."""
    from hcnr_deploy.repair import RepairOptions, RepairSession

    r = pair["root"]
    args = (pair["base"], pair[ft], r / "hon.jsonl", r / "task.jsonl", RepairOptions(**SMALL))
    with RepairSession(*args) as plain:
        plain.write_many([(tmp_path / "plain", {})])
    store = tmp_path / "statistics"
    with RepairSession(*args, statistics_dir=store) as first:
        first.write_many([(tmp_path / "first", {})])
        assert any(k.startswith("fisher_") and not k.endswith("_read") for k in first.timings)
    assert sorted(p.name for p in store.iterdir()) == ["fisher-honesty-base-column.safetensors",
                                                       "fisher-task-finetuned-column.safetensors"]
    with RepairSession(*args, statistics_dir=store) as later:
        later.write_many([(tmp_path / "later", {})])
        fisher = [k for k in later.timings if k.startswith("fisher_")]
        assert fisher and all(k.endswith("_read") for k in fisher)  # no Fisher pass ran
    for name in ("first", "later"):
        for f in sorted((tmp_path / "plain").glob("*.safetensors")):
            a, b = load_file(f), load_file(tmp_path / name / f.name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, f.name)
