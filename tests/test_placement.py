"""Issue 20 item 4: blocks placed over every visible GPU (engine/placement.py), on stand-in device lists."""

from __future__ import annotations

import pytest

from hcnr_deploy.engine import plan as P
from hcnr_deploy.engine.placement import Placement, parse_devices, place_blocks, split_counts
from eval_harness.errors import UserError

GIB = 2**30
LLAMA_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
             "num_key_value_heads": 8, "num_hidden_layers": 80, "vocab_size": 128256, "tie_word_embeddings": False,
             "torch_dtype": "bfloat16"}


def test_device_specs():
    assert parse_devices("auto", 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert parse_devices("auto", 0) == ["cpu"] and parse_devices("cpu", 8) == ["cpu"]
    assert parse_devices("cuda", 2) == ["cuda:0"] and parse_devices("cuda:1", 2) == ["cuda:1"]
    assert parse_devices("cuda:3,1", 4) == ["cuda:3", "cuda:1"]
    for spec, visible, says in (("cuda:0,4", 4, "has 4 visible GPU(s) (cuda:0 to cuda:3)"),
                                ("cuda:0,0", 4, "each GPU once"), ("cuda:a", 4, "expected GPU numbers"),
                                ("tpu", 4, "expected auto, cpu, cuda"), ("cuda", 0, "no CUDA device is available")):
        with pytest.raises(UserError, match=f"^--device {spec}: .*" + says.replace("(", r"\(").replace(")", r"\)")):
            parse_devices(spec, visible)


def test_split_in_proportion_to_room_and_contiguous():
    assert split_counts(10, [1, 1, 1, 1]) == [3, 3, 2, 2]
    assert split_counts(80, [3, 1]) == [60, 20]
    assert sum(split_counts(7, [0.3, 0.3, 0.4])) == 7
    p = place_blocks(10, GIB, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"], [40 * GIB] * 4, [2 * GIB, 0, 0, 0])
    assert p.blocks == (0, 0, 1, 1, 1, 2, 2, 2, 3, 3)  # GPU 0 holds the embeddings: it gets fewer blocks
    assert p.runs() == [("cuda:0", 0, 1), ("cuda:1", 2, 4), ("cuda:2", 5, 7), ("cuda:3", 8, 9)]
    assert p.device_of(4) == "cuda:1" and p.first == "cuda:0" and p.last == "cuda:3"
    assert p.describe() == "placement (cuda:0: blocks 0-1, cuda:1: blocks 2-4, cuda:2: blocks 5-7, cuda:3: blocks 8-9)"
    uneven = place_blocks(8, GIB, ["cuda:0", "cuda:1"], [20 * GIB, 8 * GIB], [4 * GIB, 4 * GIB])
    assert uneven.blocks.count(0) == 6 and uneven.blocks.count(1) == 2  # 16 GiB of room against 4


def test_one_device_cpu_and_offload():
    assert place_blocks(5, GIB, ["cpu"], None, [0]) == Placement(("cpu",), (0,) * 5)
    one = place_blocks(3, 100 * GIB, ["cuda:0"], [1 * GIB], [0])  # one device: nothing to choose (the plan refuses)
    assert one.blocks == (0, 0, 0)
    off = place_blocks(6, 50 * GIB, ["cuda:0", "cuda:1"], [60 * GIB, 10 * GIB], [0, 0], offload=True)
    assert off.blocks == (0, 0, 0, 1, 1, 1) and off.describe().startswith("placement (offload: blocks in pinned")


def test_blocks_that_do_not_fit_are_a_one_line_error_naming_the_fix():
    with pytest.raises(UserError) as err:
        place_blocks(80, 2 * GIB, ["cuda:0", "cuda:1"], [80 * GIB, 80 * GIB], [10 * GIB, 10 * GIB])
    msg = str(err.value)
    assert "\n" not in msg and "--offload or more GPUs" in msg and "20.0 GiB short in all" in msg


def test_the_plan_spreads_the_70b_model_over_8_gpus_and_offload_keeps_two_blocks_each():
    shape = P.Shape.from_config(LLAMA_70B)
    kw = dict(num_samples=128, max_length=512, batch_size=8, finetune=("lora", 16))
    one = P.plan(shape, [("hcnr", {})], gpus=1, **kw)
    eight = P.plan(shape, [("hcnr", {})], gpus=8, free_gpus=[80 * 10**9] * 8, **kw)
    assert len(eight["gpu_bytes"]) == 8 and all(g > 0 for g in eight["gpu_bytes"])
    assert max(eight["gpu_bytes"]) < one["gpu_bytes"][0] / 3  # each GPU also runs the passes of its blocks
    assert max(eight["gpu_bytes"]) < 80 * 10**9  # 70B repair fits 8 x H100 without --offload
    assert eight["placement"].startswith("placement (cuda:0: blocks 0-")
    off = P.plan(shape, [("hcnr", {})], gpus=1, offload=True, **kw)
    assert off["gpu_bytes"][0] < 141 * 10**9 < one["gpu_bytes"][0]  # one H200: only with --offload
    assert off["host_bytes"] > off["model_bytes"] + shape.layers * 128 * 512 * 8192 * 2  # + parked boundaries
    assert P.refusal(eight, {"host": 1 << 42, "gpus": [80 * 10**9] * 8}, offload=False) is None
    msg = P.refusal(one, {"host": 1 << 42, "gpus": [141 * 10**9]}, offload=False)
    assert "on GPU 0" in msg and "--offload, more GPUs" in msg


def test_a_repair_placed_over_two_stand_in_devices_writes_the_bytes_of_one(tmp_path, monkeypatch):
    """The multi-device path on the CPU: two stand-in devices (both the CPU), the blocks split between them, every
    block's inputs aligned by its pre-hook, statistics and edits per block device: the same bytes as one device."""
    import torch
    from safetensors.torch import load_file

    from hcnr_deploy.engine import placement
    from hcnr_deploy.repair import run_repair, session

    from conftest import repair_pair

    words = "the capital city river country born wrote unknown answer question sure Paris 1492 future".split()
    pair = repair_pair(tmp_path / "m", "llama", 8, words)
    r = pair["root"]
    kw = dict(num_samples=8, max_length=40, batch_size=4, device="cpu", compensation="task-aware")
    run_repair(pair["base"], pair["lora"], r / "hon.jsonl", r / "task.jsonl", tmp_path / "one", **kw)
    seen, aligned = [], []
    real_place, real_align = placement.place_model, placement.align_inputs

    def place(*a, **k):
        seen.append(real_place(*a, **k))
        return seen[-1]

    def align(module, device):
        module.register_forward_pre_hook(lambda m, args: aligned.append(device))
        return real_align(module, device)

    monkeypatch.setattr(session, "parse_devices", lambda spec, visible: ["cpu", "cpu"])
    monkeypatch.setattr(session, "place_model", place)
    monkeypatch.setattr(placement, "align_inputs", align)
    run_repair(pair["base"], pair["lora"], r / "hon.jsonl", r / "task.jsonl", tmp_path / "two", **kw)
    (p,) = seen
    assert p.blocks == (0, 0, 1) and p.describe() == "placement (cpu: blocks 0-1, cpu: block 2)"
    assert aligned  # the pre-hooks ran
    files = sorted((tmp_path / "one").glob("*.safetensors"))
    assert files
    for f in files:
        a, b = load_file(f), load_file(tmp_path / "two" / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
