"""The bug-B plugin's decisions (hcnr_deploy/vllm_plugin.py) on stand-in vLLM modules: patch only vLLM's CPU
platform, only ops that show the bug, skip (one log line, no exception) when the ops are missing, changed or fixed
upstream. The patch on vLLM's real ops is tested in test_serve.py, its effect in a served engine in
test_serve_e2e.py."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from hcnr_deploy import vllm_plugin
from hcnr_deploy.vllm_plugin import PATCHED_OPS, apply_lora_fix, applies_adapter_to_base_rows


def buggy_ops():
    """vLLM 0.32.0's torch bgmv ops, reduced: index -1 selects the last adapter slot (bug B)."""
    def pick(w, idx):
        w = w[idx]
        return w.squeeze(1) if w.dim() == 4 else w

    def bgmv_shrink(inputs, w, out, idx, scaling=1.0):
        out[:, :w.shape[-2]] = scaling * torch.einsum("bi,boi->bo", inputs, pick(w, idx))

    def bgmv_expand(inputs, w, out, idx, add_inputs=True):
        y = torch.einsum("bi,boi->bo", inputs, pick(w, idx))
        out[:, :y.shape[1]] = out[:, :y.shape[1]] + y if add_inputs else y

    def bgmv_expand_slice(inputs, w, out, idx, offset, size, add_inputs=True):
        y = torch.einsum("bi,boi->bo", inputs, pick(w, idx))
        out[:, offset:offset + size] = out[:, offset:offset + size] + y if add_inputs else y

    return {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}


def fixed_ops():
    """The same ops with the upstream fix: rows with index -1 get nothing."""
    def fix(op):
        def fixed(inputs, w, out, idx, *args):
            keep = out.clone()
            op(inputs, w, out, idx.clamp(min=0), *args)
            out[idx < 0] = keep[idx < 0]
        return fixed

    return {name: fix(op) for name, op in buggy_ops().items()}


def stand_in_vllm(is_cpu: bool, ops: dict):
    """import_module for a fake vLLM: its platform, its torch LoRA ops module and a module that binds them."""
    lora_ops = types.SimpleNamespace(**ops)
    punica_cpu = types.SimpleNamespace(**ops, other=object())
    platform = type("CpuPlatform" if is_cpu else "CudaPlatform", (), {"is_cpu": lambda self: is_cpu})()
    modules = {"vllm.platforms": types.SimpleNamespace(current_platform=platform),
               "vllm.lora.ops.torch_ops.lora_ops": lora_ops,
               "vllm.lora.punica_wrapper.punica_cpu": punica_cpu}

    def import_module(name):
        if name not in modules:
            raise ImportError(f"No module named {name!r}")
        return modules[name]

    return import_module, lora_ops, punica_cpu


def mixed_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 16, generator=g), torch.randn(2, 1, 4, 16, generator=g), torch.tensor([0, -1, 1])


def test_cpu_with_the_bug_patches_every_op_and_its_bindings():
    ops = buggy_ops()
    import_module, lora_ops, punica_cpu = stand_in_vllm(True, ops)
    assert all(applies_adapter_to_base_rows(op, name) for name, op in ops.items())
    status, line = apply_lora_fix(import_module)
    assert status == "patched" and "patched vLLM torch LoRA ops" in line
    for name in PATCHED_OPS:
        assert getattr(lora_ops, name)._hcnr_no_lora_fix and getattr(punica_cpu, name) is getattr(lora_ops, name)
        assert applies_adapter_to_base_rows(getattr(lora_ops, name), name) is False
    x, a, idx = mixed_batch()
    before, after = torch.zeros(3, 4), torch.zeros(3, 4)
    ops["bgmv_shrink"](x, a, before, idx)
    lora_ops.bgmv_shrink(x, a, after, idx)
    assert torch.equal(after[[0, 2]], before[[0, 2]]) and torch.equal(after[1], torch.zeros(4))
    assert apply_lora_fix(import_module)[0] == "patched"  # idempotent: wrapped once
    assert lora_ops.bgmv_shrink.__wrapped__ is ops["bgmv_shrink"]


def test_gpu_platform_is_left_alone():
    ops = buggy_ops()
    import_module, lora_ops, punica_cpu = stand_in_vllm(False, ops)
    status, line = apply_lora_fix(import_module)
    assert status == "not-needed" and "CudaPlatform" in line
    assert all(getattr(lora_ops, n) is ops[n] and getattr(punica_cpu, n) is ops[n] for n in PATCHED_OPS)


def test_fixed_upstream_is_left_alone():
    ops = fixed_ops()
    import_module, lora_ops, _ = stand_in_vllm(True, ops)
    assert not any(applies_adapter_to_base_rows(op, name) for name, op in ops.items())
    status, line = apply_lora_fix(import_module)
    assert status == "not-needed" and "already skip index -1" in line
    assert all(getattr(lora_ops, n) is ops[n] for n in PATCHED_OPS)


def test_renamed_op_skips_without_patching_any():
    ops = buggy_ops()
    ops["bgmv_expand_slice_v2"] = ops.pop("bgmv_expand_slice")
    import_module, lora_ops, _ = stand_in_vllm(True, ops)
    status, line = apply_lora_fix(import_module)
    assert status == "skipped" and "have no bgmv_expand_slice" in line
    assert lora_ops.bgmv_shrink is ops["bgmv_shrink"] and lora_ops.bgmv_expand is ops["bgmv_expand"]


def test_changed_signature_skips():
    ops = buggy_ops()
    ops["bgmv_expand"] = lambda inputs, w, out, idx, offsets, add_inputs=True: None  # a new required argument
    import_module, lora_ops, _ = stand_in_vllm(True, ops)
    assert applies_adapter_to_base_rows(ops["bgmv_expand"], "bgmv_expand") is None
    status, line = apply_lora_fix(import_module)
    assert status == "skipped" and "bgmv_expand do not run or compute as the ops" in line
    assert lora_ops.bgmv_shrink is ops["bgmv_shrink"]


def test_missing_lora_module_is_not_needed():
    def import_module(name):
        if name == "vllm.platforms":
            return types.SimpleNamespace(current_platform=type("CpuPlatform", (), {"is_cpu": lambda s: True})())
        raise ImportError(name)

    assert apply_lora_fix(import_module)[0] == "not-needed"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("outcome,level", [(("skipped", "x skipped"), logging.WARNING),
                                           (("patched", "x patched"), logging.INFO),
                                           (RuntimeError("boom"), logging.WARNING)])
def test_register_logs_one_line_and_never_raises(monkeypatch, outcome, level):
    def fake():
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.delenv(vllm_plugin.DISABLE_ENV, raising=False)
    monkeypatch.setattr(vllm_plugin, "apply_lora_fix", fake)
    handler = _Records()
    vllm_plugin.logger.addHandler(handler)
    old_level = vllm_plugin.logger.level
    vllm_plugin.logger.setLevel(logging.DEBUG)
    try:
        vllm_plugin.register()
    finally:
        vllm_plugin.logger.removeHandler(handler)
        vllm_plugin.logger.setLevel(old_level)
    assert [r.levelno for r in handler.records] == [level]
    if isinstance(outcome, Exception):
        assert "boom" in handler.records[0].getMessage()
