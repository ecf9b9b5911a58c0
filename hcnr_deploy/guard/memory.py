"""What the guard's fit holds, and the refusal before anything is loaded when its device cannot hold it.

The fit (guard/run.py, and the sweep's guard family) runs the fine-tune (a LoRA merged) on one device and keeps
only the last prompt token's state of every block: the model's weights, ``blocks x items x hidden`` float32
features, and one batch's activations of one block. At Llama-3.1-70B in bfloat16 that is 141 GB of weights: more
than one 80 GB GPU holds, so the fit runs on the CPU there (host RAM) or on a GPU with room for the whole model.
"""

from __future__ import annotations

from eval_harness.errors import UserError
from hcnr_deploy.engine.plan import GIB, Shape, available_memory, plan_check_off, read_config, working_dtype_bytes

TOKENS_BOUND = 512  # prompt tokens per item assumed for the activations (calibration questions are shorter)


def fit_bytes(config: dict, on_gpu: bool, dtype: str, items: int, batch_size: int) -> dict:
    """Bytes the guard's fit holds on its device: ``model`` (every parameter in the working dtype), ``features``
    (float32, every block's last-token state of every item), ``batch`` (one block's activations for one batch of
    `TOKENS_BOUND` tokens), and their ``total``."""
    shape = Shape.from_config(config)
    b = working_dtype_bytes(shape, dtype, on_gpu)
    out = {"model": shape.params * b, "features": shape.layers * items * shape.hidden * 4,
           "batch": batch_size * TOKENS_BOUND * (6 * shape.hidden + 4 * shape.intermediate) * b}
    out["total"] = sum(out.values())
    return out


def model_with_config(base, finetuned):
    """The folder whose config.json gives the fine-tune's shape: a full fine-tune's own, a LoRA's base."""
    from pathlib import Path

    return finetuned if (Path(str(finetuned)).expanduser() / "config.json").is_file() else base


def check_guard_fits(base, device: str, dtype: str, items: int, batch_size: int):
    """A one-line UserError, before anything is loaded, when the guard's fit cannot fit `device`'s free memory
    (engine/plan.available_memory). A config that cannot be read is left to the loader."""
    import torch

    if plan_check_off():
        return
    try:
        config = read_config(str(base))
    except UserError:
        return
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    need = fit_bytes(config, on_gpu, dtype, items, batch_size)
    free = available_memory()
    index = int(device.split(":")[1]) if ":" in device else 0
    have = (free["gpus"][index] if index < len(free["gpus"]) else None) if on_gpu else free["host"]
    if have is not None and need["total"] > have:
        where = f"GPU {index}" if on_gpu else "the host"
        fix = "--device cpu (host RAM) or a GPU with room for the whole model" if on_gpu else (
            "a machine with more RAM or --device cuda on a GPU with room for the whole model")
        raise UserError(f"the guard's fit holds the whole fine-tune on one device: it needs {need['total'] / GIB:.1f}"
                        f" GiB (the model {need['model'] / GIB:.1f} GiB) and {where} has {have / GIB:.1f} GiB free; "
                        f"use {fix}.")
