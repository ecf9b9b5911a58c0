"""Supervised training loops of the scenario: loss on response tokens only, bf16 autocast on CPU.

One recipe (`sft`, on the project's one loop `hcnr_deploy.sft.train_loop`) serves the trainings:
pretraining the tiny model from scratch, the refusal-aware LoRA of the base (merged into its
weights), the domain LoRA fine-tune and the Rehearsal and RAIT baselines (kept as PEFT adapters).
Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import math
from pathlib import Path

from hcnr_deploy.sft import train_loop

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def encode_pair(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of chat(prompt) + response + end-of-turn, and labels (-100 on the prompt)."""
    head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = (head_ids + tail_ids)[:max_len]
    labels = ([-100] * len(head_ids) + tail_ids)[:max_len]
    return ids, labels


def encode_rows(tokenizer, rows: list[dict], max_len: int = 128) -> list[tuple[list[int], list[int]]]:
    return [encode_pair(tokenizer, r["prompt"], r["response"], max_len) for r in rows]


def sft(model, tokenizer, rows: list[dict], *, steps: int, batch_size: int, lr: float, seed: int = 0,
        warmup: int = 10, weight_decay: float = 0.0, max_len: int = 128, bf16: bool = True, progress=None,
        description: str = "training") -> list[float]:
    """Train `model` in place on `rows` ({"prompt","response"}) for `steps` steps; returns the losses.

    hcnr_deploy.sft.train_loop (batches epoch by epoch from a seeded shuffle) with the trainable
    parameters of `model`; lr warms up linearly then decays by a cosine to 10%. `progress` is a rich
    Progress (optional). The model is left in eval mode.
    """
    data = encode_rows(tokenizer, rows, max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    params = [p for p in model.parameters() if p.requires_grad]
    losses = train_loop(model, params, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed, pad_id=pad_id,
                        lr_lambda=lambda s: min(1.0, (s + 1) / max(1, warmup))
                        * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))),
                        weight_decay=weight_decay, betas=(0.9, 0.98), clip=1.0, bf16=bf16, progress=progress,
                        description=description)
    model.eval()
    return losses


def add_lora(model, rank: int, alpha: int | None = None, targets=LORA_TARGETS, seed: int | None = None):
    """Wrap `model` with a fresh PEFT LoRA (vLLM-compatible: no bias, no modules_to_save).

    PEFT draws the A factors from torch's global RNG: `seed` seeds it first; None leaves it as the
    process has it (then the init depends on what ran before in the process)."""
    from peft import LoraConfig, get_peft_model

    if seed is not None:
        import torch

        torch.manual_seed(seed)

    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def save_adapter(peft_model, out_dir: Path, base_path: Path):
    """Save a PEFT adapter whose config names `base_path` as its base model."""
    import json

    peft_model.save_pretrained(out_dir, safe_serialization=True)
    cfg_path = Path(out_dir) / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(Path(base_path).resolve())
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
