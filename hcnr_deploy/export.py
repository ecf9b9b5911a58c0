"""Artifacts: the patched checkpoint, the exact LoRA adapter, SVD-extracted adapters, report.json.

Writers stream: the checkpoint is produced shard by shard from the source's shards (the fine-tune's
for a full fine-tune, the base's with the LoRA merged otherwise), so untouched tensors are copied
byte for byte and only the restored columns of selected matrices change.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from hcnr_deploy.equations.compensation import interpolate
from hcnr_deploy.equations.svd import truncated_svd
from hcnr_deploy.io.checkpoint import Checkpoint, is_decoder_linear_weight
from hcnr_deploy.io.finetune import FineTune
from hcnr_deploy.io.shards import ShardWriter, copy_side_files
from hcnr_deploy.serve.lora import VLLM_LORA_RANKS

PEFT_PREFIX = "base_model.model."


def patched_weight(source: torch.Tensor, w0: torch.Tensor, patch) -> torch.Tensor:
    """Ws with its restored entries set to ``W0 + E`` (in Ws's dtype); everything else bit-identical to Ws.

    ``patch`` is ``("columns", F, E_F)``, ``("elements", mask, E)`` or ``("scale", alpha)`` (every entry
    ``W0 + alpha (Ws - W0)``, --method scale).
    """
    if patch[0] == "scale":
        return interpolate(w0, source, patch[1]).to(source.dtype)
    kind, where, e = patch
    out = source.clone()
    if kind == "columns":
        out[:, where] = (w0[:, where].double() + e.double()).to(source.dtype)
    else:
        out[where] = (w0.double()[where] + e.double()[where]).to(source.dtype)
    return out


def final_weight(name: str, source: torch.Tensor, finetune: FineTune, patches: dict) -> torch.Tensor:
    """The output tensor `name` given its source tensor (Ws for a full fine-tune, W0 for a LoRA)."""
    if finetune.is_lora:
        d = finetune.delta(name) if name.endswith(".weight") else None
        if d is not None and name in patches and patches[name][0] == "scale":  # W0 + alpha s B A, from the factors
            return (source.double() + patches[name][1] * d.double()).to(source.dtype)
        ws = source if d is None else (source.double() + d.double()).to(source.dtype)
        w0 = source
    else:
        ws = source
        w0 = None
    if name in patches:
        w0 = finetune.base.get(name) if w0 is None else w0
        return patched_weight(ws, w0, patches[name])
    return ws


def write_checkpoint(out_dir: Path, finetune: FineTune, patches: dict, dtype_note: dict | None = None):
    """Sharded safetensors (same shard layout as the source) + config, tokenizer and generation config."""
    source: Checkpoint = finetune.base if finetune.is_lora else finetune.ckpt
    writer = ShardWriter(out_dir)
    for file, names in source.shards():
        tensors = {}
        for name, t in source.iter_shard(file, names, check=False):
            tensors[name] = final_weight(name, t, finetune, patches)
        writer.write_shard(file, tensors)
        del tensors
    writer.finish()
    copy_side_files(source.folder, out_dir)
    if finetune.is_lora:  # a tokenizer shipped with the adapter wins
        from hcnr_deploy.io.shards import TOKENIZER_FILES

        copy_side_files(finetune.folder, out_dir, only=TOKENIZER_FILES)


def adapter_config(template: dict, base_ref: str, rank: int | None = None, targets: list[str] | None = None) -> dict:
    """A PEFT LoRA config that vLLM accepts: no modules_to_save, no bias, no DoRA; scaling kept consistent."""
    cfg = dict(template)
    cfg.update(base_model_name_or_path=base_ref, modules_to_save=None, bias="none", use_dora=False,
               inference_mode=True, peft_type="LORA", lora_dropout=0.0)
    cfg.setdefault("task_type", "CAUSAL_LM")
    if rank is not None:
        cfg.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    if targets is not None:
        cfg["target_modules"] = targets
    return cfg


def write_exact_adapter(out_dir: Path, finetune: FineTune, new_a: dict[str, torch.Tensor], base_ref: str,
                        new_b: dict[str, torch.Tensor] | None = None):
    """The fine-tune's adapter with A replaced on selected modules (same rank, same scaling), and B where
    `new_b` gives one (--method scale); everything else byte for byte the fine-tune's."""
    from safetensors import safe_open

    lora = finetune.lora
    tensors = {}
    with safe_open(lora.file, "pt") as h:
        for k in h.keys():
            tensors[k] = h.get_tensor(k)
    for mod, a in new_a.items():
        key = lora.keys[mod]["A"]
        tensors[key] = a.to(tensors[key].dtype).contiguous()
    for mod, b in (new_b or {}).items():
        key = lora.keys[mod]["B"]
        tensors[key] = b.to(tensors[key].dtype).contiguous()
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = adapter_config(lora.config, base_ref)
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    from hcnr_deploy.io.shards import TOKENIZER_FILES

    copy_side_files(finetune.folder, out_dir, only=TOKENIZER_FILES)


def write_svd_adapter(out_dir: Path, finetune: FineTune, patches: dict, max_rank: int, base_ref: str,
                      eligible: list[str], seed: int = 0) -> dict:
    """Extract a LoRA (rank `max_rank`, lora_alpha = r) from ``W_final - W0`` of every eligible matrix.

    Returns the extraction errors: total and per matrix relative Frobenius error, and tensors
    outside the decoder Linears that differ from the base (not representable in a LoRA).
    """
    base = finetune.base
    tensors: dict[str, torch.Tensor] = {}
    err_sq = ref_sq = 0.0
    per_matrix = {}
    targets = sorted({n[: -len(".weight")].rsplit(".", 1)[-1] for n in eligible})
    # every decoder Linear the target names reach gets factors (zeros where D == 0), so PEFT and vLLM
    # find weights for each module they wrap
    reached = [n for n in base.names() if is_decoder_linear_weight(n, base.shape(n))
               and n[: -len(".weight")].rsplit(".", 1)[-1] in targets]
    for name in reached:
        w0 = base.get(name)
        mod = name[: -len(".weight")]
        if name not in eligible:
            a, b = w0.new_zeros(max_rank, w0.shape[1]), w0.new_zeros(w0.shape[0], max_rank)
        else:
            ws = finetune.weight(name).to(w0.dtype) if finetune.is_lora else finetune.ckpt.get(name)
            w = patched_weight(ws, w0, patches[name]) if name in patches else ws
            delta = w.float() - w0.float()
            b, a = truncated_svd(delta, max_rank, seed)
            if a.shape[0] < max_rank:  # pad to a uniform rank with zeros (exact)
                a = torch.cat([a, a.new_zeros(max_rank - a.shape[0], a.shape[1])])
                b = torch.cat([b, b.new_zeros(b.shape[0], max_rank - b.shape[1])], dim=1)
            e = float((delta - b @ a).square().sum())
            r = float(delta.square().sum())
            err_sq += e
            ref_sq += r
            per_matrix[mod] = math.sqrt(e / r) if r > 0 else 0.0
        tensors[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = a.to(w0.dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = b.to(w0.dtype).contiguous()
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    template = finetune.lora.config if finetune.is_lora else {"task_type": "CAUSAL_LM"}
    cfg = adapter_config(template, base_ref, rank=max_rank, targets=targets)
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    not_representable = []
    if not finetune.is_lora:
        for name in base.names():
            if is_decoder_linear_weight(name, base.shape(name)):
                continue
            if not torch.equal(base.get(name, False), finetune.ckpt.get(name, False)):
                not_representable.append(name)
    return {"relative_error": math.sqrt(err_sq / ref_sq) if ref_sq > 0 else 0.0, "rank": max_rank,
            "per_matrix_relative_error": per_matrix, "not_representable": not_representable,
            "rank_supported_by_vllm": max_rank in VLLM_LORA_RANKS}
