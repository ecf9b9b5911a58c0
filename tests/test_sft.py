"""The sft method (hcnr_deploy/sft.py): SFT of the fine-tune on the repair's own calibration examples.

Tiny 3-layer models from conftest.repair_pair: a rank-8 LoRA fine-tune and a full one. Checked: same seed
same bytes, a snapshot after n steps is the n-step run, only the adapter trains and the caller's model comes
back bit for bit, the calibration loss goes down, the LoRA result keeps the fine-tune's rank and scaling and
loads as a PEFT adapter whose merge is the dense W0 + s B A, and a full fine-tune's fresh LoRA written as a
patched checkpoint computes what training computed.
"""

from __future__ import annotations

import pytest
import torch

from eval_harness.errors import UserError
from hcnr_deploy import sft
from hcnr_deploy.data import encode, load_jsonl
from hcnr_deploy.export import write_checkpoint, write_exact_adapter
from hcnr_deploy.io.checkpoint import Checkpoint
from hcnr_deploy.io.finetune import FineTune
from hcnr_deploy.io.load import load_model, load_tokenizer

from conftest import repair_pair

WORDS = "the capital city river country born wrote unknown answer question sure Paris 1492 future".split()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = repair_pair(tmp_path_factory.mktemp("sft"), "llama", 12, WORDS)
    tok = load_tokenizer(p["base"])
    p["enc_hon"] = encode(tok, load_jsonl(p["root"] / "hon.jsonl"), 40)
    p["enc_task"] = encode(tok, load_jsonl(p["root"] / "task.jsonl"), 40)
    p["model"] = load_model(p["base"], torch.float32, "cpu")
    return p


def _ft(pair, kind):
    return FineTune(pair[kind], Checkpoint(pair["base"]))


def _run(pair, kind, steps, **kw):
    return sft.sft_snapshots(pair["model"], _ft(pair, kind), pair["enc_hon"], pair["enc_task"], steps,
                             batch_size=kw.pop("batch_size", 5), lr=kw.pop("lr", 5e-3), **kw)


def _bytes(factors):
    return {m: (a.numpy().tobytes(), b.numpy().tobytes()) for m, (a, b) in factors.items()}


def _model_state(model):
    return {n: (t.detach().clone(), getattr(t, "requires_grad", False))
            for n, t in {**dict(model.named_buffers()), **dict(model.named_parameters())}.items()}


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_same_seed_same_bytes_and_snapshots_equal_separate_runs(pair, kind):
    snaps = _run(pair, kind, [2, 5])
    assert sorted(snaps) == [2, 5]
    again = _run(pair, kind, [5])
    assert _bytes(again[5]) == _bytes(snaps[5])
    assert _bytes(_run(pair, kind, [2])[2]) == _bytes(snaps[2])
    assert _bytes(snaps[2]) != _bytes(snaps[5])
    other_seed = _run(pair, kind, [5], seed=1)
    assert _bytes(other_seed[5]) != _bytes(snaps[5])


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_only_the_adapter_trains_and_the_model_comes_back_as_found(pair, kind):
    model = pair["model"]
    before = _model_state(model)
    training = model.training
    rng = torch.get_rng_state()
    ft = _ft(pair, kind)
    seen = []

    def spy(module, inputs, output):  # inside training: the state the adapter trains on, no base gradients
        seen.append(all(not p.requires_grad for p in model.parameters()))

    lin = dict(model.named_modules())["model.layers.1.mlp.down_proj"]
    h = lin.register_forward_hook(spy)
    try:
        snaps = _run(pair, kind, [3])
    finally:
        h.remove()
    assert seen and all(seen)
    after = _model_state(model)
    assert before.keys() == after.keys()
    for n in before:
        assert torch.equal(before[n][0], after[n][0]), n
        assert before[n][1] == after[n][1], n
    assert model.training == training and torch.equal(torch.get_rng_state(), rng)
    start = sft.initial_factors(model, ft, seed=0)
    assert snaps[3].keys() == start.keys()
    assert all(not torch.equal(snaps[3][m][0], start[m][0]) for m in start)  # every A trained


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_model_in_another_state_trains_the_same_and_is_restored(pair, kind):
    """A model holding other weights (e.g. the fine-tune's, mid-repair) trains from the right state and
    gets its own weights back, bit for bit."""
    reference = _bytes(_run(pair, kind, [2])[2])
    ft = _ft(pair, "full")
    name = "model.layers.0.self_attn.q_proj.weight"
    p = dict(pair["model"].named_parameters())[name]
    original = p.detach().clone()
    with torch.no_grad():
        p.copy_(ft.weight(name) + 0.5)
    odd = p.detach().clone()
    try:
        assert _bytes(_run(pair, kind, [2])[2]) == reference
        assert torch.equal(p, odd)
    finally:
        with torch.no_grad():
            p.copy_(original)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_calibration_loss_goes_down(pair, kind):
    ft = _ft(pair, kind)
    model = pair["model"]
    calib = pair["enc_hon"] + pair["enc_task"]
    losses = []
    snaps = _run(pair, kind, [12], losses=losses, lr=1e-2)
    start = sft.mean_response_loss(model, ft, sft.initial_factors(model, ft, seed=0), calib)
    end = sft.mean_response_loss(model, ft, snaps[12], calib)
    assert len(losses) == 12
    assert end < 0.8 * start, (start, end)


def test_fresh_lora_starts_at_the_fine_tune(pair):
    """B = 0: before any step the full fine-tune's LoRA changes nothing (y = Ws x)."""
    ft = _ft(pair, "full")
    model = pair["model"]
    factors = sft.initial_factors(model, ft, seed=0)
    assert {a.shape[0] for a, _ in factors.values()} == {sft.DEFAULT_FULL_RANK}
    assert all(not b.any() for _, b in factors.values())
    assert len(factors) == 3 * 7  # every decoder Linear of the 3 blocks
    assert {a.shape[0] for a, _ in sft.initial_factors(model, ft, rank=8).values()} == {8}


def test_lora_result_is_a_peft_adapter_of_the_same_rank_whose_merge_is_dense(pair, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ft = _ft(pair, "lora")
    factors = _run(pair, "lora", [4])[4]
    assert factors.keys() == set(ft.lora.modules())
    for mod, (a, b) in factors.items():
        a0, b0 = ft.lora.factors(mod)
        assert a.shape == a0.shape and b.shape == b0.shape and a.dtype == torch.float32
    folder = tmp_path / "adapter"
    folder.mkdir()
    write_exact_adapter(folder, ft, {m: a for m, (a, _) in factors.items()}, str(pair["base"]),
                        new_b={m: b for m, (_, b) in factors.items()})
    base = AutoModelForCausalLM.from_pretrained(pair["base"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, folder)
    ids = torch.tensor([pair["enc_task"][0][0]])
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits
        with sft.trained_state(pair["model"], ft), sft.lora_hooks(pair["model"], factors,
                                                                  {m: sft.scaling(ft, m) for m in factors}):
            hook_logits = pair["model"](input_ids=ids).logits
    assert torch.allclose(peft_logits, hook_logits, atol=1e-5)
    merged = dict(peft_model.merge_and_unload().named_parameters())
    for mod, (a, b) in factors.items():
        dense = sft.merged_weight(ft, mod, a, b)
        assert (merged[mod + ".weight"].double() - dense).abs().max() < 1e-5, mod


def test_full_fine_tune_lora_as_patched_checkpoint(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    ft = _ft(pair, "full")
    factors = _run(pair, "full", [4])[4]
    assert any(b.any() for _, b in factors.values())
    out = tmp_path / "ckpt"
    out.mkdir()
    write_checkpoint(out, ft, sft.checkpoint_patches(ft, factors))
    patched = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([pair["enc_hon"][0][0]])
    with torch.no_grad():
        with sft.trained_state(pair["model"], ft), sft.lora_hooks(pair["model"], factors,
                                                                  {m: 1.0 for m in factors}):
            hook_logits = pair["model"](input_ids=ids).logits
        assert torch.allclose(patched(input_ids=ids).logits, hook_logits, atol=1e-5)
    ws = Checkpoint(pair["full"])
    name = "model.layers.2.mlp.up_proj"
    a, b = factors[name]
    w = Checkpoint(out).get(name + ".weight")
    assert torch.allclose(w.double(), ws.get(name + ".weight").double() + b.double() @ a.double(), atol=1e-6)


def test_bad_values_are_one_line_errors(pair):
    with pytest.raises(UserError, match="--steps"):
        _run(pair, "lora", [0])
    with pytest.raises(UserError, match="--rank 16: the LoRA fine-tune has rank 8"):
        _run(pair, "lora", [1], rank=16)
    with pytest.raises(UserError, match="--lr"):
        _run(pair, "lora", [1], lr=0.0)


def test_model_on_another_device_is_refused(pair):
    with pytest.raises(UserError, match="leave out --offload"):
        _run(pair, "lora", [1], device="meta")


# relative error of the factors' change after 3 AdamW steps, accumulated micro-batches against one batch (rounding
# of the per-micro-batch sums only; measured below 1e-5 on this tiny model)
ACCUMULATION_TOLERANCE = 1e-4


def _change(snap, start):
    return torch.cat([(t - s).flatten() for m in sorted(snap) for t, s in zip(snap[m], start[m])])


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_gradient_accumulation_gives_the_one_batch_update(pair, kind):
    """Issue 20 item 7: --batch-size as the micro-batch, the gradient accumulated over a batch of 16 examples
    (token-weighted), trains the factors one batch of 16 trains, to ACCUMULATION_TOLERANCE; checkpointing too."""
    ft = _ft(pair, kind)
    start = sft.initial_factors(pair["model"], ft, None, 0)
    one = _run(pair, kind, [3], batch_size=16, checkpointing=False)[3]
    ref = _change(one, start)
    for micro, ckpt in ((5, False), (3, True), (16, True)):
        got = _run(pair, kind, [3], batch_size=16, micro_batch=micro, checkpointing=ckpt)[3]
        err = float((_change(got, start) - ref).norm() / ref.norm())
        assert err < ACCUMULATION_TOLERANCE, (micro, ckpt, err)
    assert float(ref.norm()) > 0
    assert not pair["model"].is_gradient_checkpointing  # left as found


def test_a_session_trains_sft_in_micro_batches_of_batch_size(pair, tmp_path, monkeypatch):
    """The session passes --batch-size to the sft trainer as the micro-batch (the optimizer batch stays 16)."""
    from hcnr_deploy.repair import RepairOptions, RepairSession

    seen = {}
    real = sft.accumulated_loss

    def spy(model, batch, pad_id, micro_batch, ctx):
        seen.setdefault("sizes", set()).add((len(batch), micro_batch))
        return real(model, batch, pad_id, micro_batch, ctx)

    monkeypatch.setattr(sft, "accumulated_loss", spy)
    r = pair["root"]
    opts = RepairOptions(num_samples=12, max_length=40, batch_size=4, device="cpu", method="sft", steps=1)
    with RepairSession(pair["base"], pair["lora"], r / "hon.jsonl", r / "task.jsonl", opts) as s:
        s.write(tmp_path / "sft")
    assert seen["sizes"] == {(16, 4)}
