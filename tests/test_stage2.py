"""Issue 20: stage 2 of any number of candidates in one block-streamed pass (repair/stage2.py), float32 Grams."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from safetensors.torch import load_file

from hcnr_deploy.options import RepairOptions
from hcnr_deploy.engine import hooks
from hcnr_deploy.repair import RepairSession, run_repair, stage2
from hcnr_deploy.repair.stage2 import PatchStore

from conftest import repair_pair

WORDS = "the capital city river country born wrote unknown answer question sure Paris 1492 future".split()
SMALL = dict(num_samples=8, max_length=40, batch_size=4, device="cpu")
# relative Frobenius error of the edits W - W0 from float32 Grams against float64 Grams (measured: below 2e-6)
GRAM_FLOAT32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return repair_pair(tmp_path_factory.mktemp("stage2"), "llama", 8, WORDS)


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("kw", [dict(), dict(compensation="exact"), dict(compensation="task-aware", task_weight=2.0),
                                dict(method="regmean", task_weight=3.0)])
def test_float32_grams_give_the_float64_edits_within_tolerance(pair, tmp_path, monkeypatch, kw):
    """Gram products in the compute dtype, accumulated in float32 (float64 only in the solves): the edits
    W - W0 equal those from float64 Grams (products and sums in float64) to GRAM_FLOAT32_TOLERANCE."""
    r = pair["root"]
    args = (pair["base"], pair["full"], r / "hon.jsonl", r / "task.jsonl")
    rep = run_repair(*args, tmp_path / "f32", **SMALL, **kw)
    monkeypatch.setattr(hooks, "GRAM_DTYPE", torch.float64)
    run_repair(*args, tmp_path / "f64", **SMALL, **kw)
    a, b, base = _tensors(tmp_path / "f32"), _tensors(tmp_path / "f64"), _tensors(pair["base"])
    names = [m["name"] + ".weight" for m in rep["matrices"] if m["selected"]]
    assert names
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in names)
    den = sum(float((b[k].double() - base[k].double()).square().sum()) for k in names)
    assert math.sqrt(num / den) < GRAM_FLOAT32_TOLERANCE
    assert not all(torch.equal(a[k], b[k]) for k in names)  # the two paths really differ (float32 is not float64)


def test_patch_store_gives_the_tensors_back_bit_identical_and_leaves_nothing(tmp_path):
    store = PatchStore(tmp_path / "cand")
    e = torch.randn(5, 3, dtype=torch.float32)
    mask = torch.rand(4, 6) > 0.5
    store["a.weight"] = ("columns", torch.tensor([0, 4, 2]), e)
    store["b.weight"] = ("elements", mask, torch.randn(4, 6))
    store["c.weight"] = ("scale", 0.5)
    kind, f, back = store["a.weight"]
    assert kind == "columns" and f.tolist() == [0, 4, 2] and torch.equal(back, e)
    assert store["b.weight"][0] == "elements" and torch.equal(store["b.weight"][1], mask)
    assert store["c.weight"] == ("scale", 0.5) and set(store) == {"a.weight", "b.weight", "c.weight"}
    assert "d.weight" not in store and store.folder.name.startswith(".cand.tmp-patches-")
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_each_blocks_grams_are_freed_before_the_next_block(pair, tmp_path, monkeypatch):
    """Peak memory is one block's statistics: when block i+1's edits are derived, no Gram of block i is alive,
    whatever the number of candidates (here three sharing the pass)."""
    seen: list[tuple[int, list]] = []
    real = stage2.compensate_group

    def spy(group, finetune, h_hon, n_hon, h_task, *args, **kw):
        block = int(group[0].name.split(".layers.")[1].split(".")[0])
        alive = [i for i, refs in seen if i != block and any(ref() is not None for ref in refs)]
        assert not alive, f"Grams of blocks {alive} still alive at block {block}"
        seen.append((block, [weakref.ref(t) for t in [*h_hon.values(), *h_task.values()]]))
        return real(group, finetune, h_hon, n_hon, h_task, *args, **kw)

    def collecting(*a, **kw):
        gc.collect()
        return spy(*a, **kw)

    monkeypatch.setattr(stage2, "compensate_group", collecting)
    r = pair["root"]
    with RepairSession(pair["base"], pair["lora"], r / "hon.jsonl", r / "task.jsonl", RepairOptions(**SMALL)) as s:
        s.write_many([(tmp_path / "a", dict(r_cw=1.0)), (tmp_path / "b", dict(method="regmean")),
                      (tmp_path / "c", dict(method="scale", alpha=0.5))])
        assert s.stats.counts["hessian"] == 1
    assert sorted({i for i, _ in seen}) == [0, 1, 2]


def test_a_sweep_skips_an_sft_candidate_that_cannot_train_with_a_note(pair, tmp_path, monkeypatch):
    """Issue 20 item 7: an sft candidate that fails (here: out of memory, raised by a stand-in trainer) is skipped
    with a note; the candidates built before it stay built and the sweep goes on."""
    import hcnr_deploy.sft
    from hcnr_deploy import sweep as F
    from hcnr_deploy.sweep import build_candidates

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(hcnr_deploy.sft, "sft_snapshots", oom)
    r = pair["root"]
    cands = [c for c in F.parse_grid("sft:steps=1; scale:a=0.5; regmean:mu=1") if c.family in F.METHODS]
    out = build_candidates(cands, tmp_path / "c", pair["base"], pair["lora"], r / "hon.jsonl", r / "task.jsonl",
                           SMALL)
    assert out["built"] == ["scale-a0.5", "regmean-mu1"] and "sft-s1" not in out["artifacts"]
    assert out["notes"] == ["sft-s1 skipped: CUDA out of memory. Tried to allocate 2.00 GiB"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["regmean-mu1", "scale-a0.5"]
