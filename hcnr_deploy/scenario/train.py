"""Supervised training loops of the scenario: loss on response tokens only, bf16 autocast on CPU.

One loop (`sft`) serves the three trainings: pretraining the tiny model from scratch, the
refusal-aware LoRA of the base (merged into its weights) and the domain LoRA fine-tune (kept as
a PEFT adapter). Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from pathlib import Path

import torch

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


def collate(examples, pad_id: int):
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


def sft(model, tokenizer, rows: list[dict], *, steps: int, batch_size: int, lr: float, seed: int = 0,
        warmup: int = 10, weight_decay: float = 0.0, max_len: int = 128, bf16: bool = True, progress=None,
        description: str = "training") -> list[float]:
    """Train `model` in place on `rows` ({"prompt","response"}) for `steps` steps; returns the losses.

    Batches are drawn epoch by epoch from a seeded shuffle; lr warms up linearly then decays
    by a cosine to 10%. `progress` is a rich Progress (optional).
    """
    torch.manual_seed(seed)
    data = encode_rows(tokenizer, rows, max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    task = progress.add_task(description, total=steps) if progress else None
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            perm = list(range(len(data)))
            rng.shuffle(perm)
            order += perm
        batch = [data[i] for i in order[:batch_size]]
        del order[:batch_size]
        ids, labels, mask = collate(batch, pad_id)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with ctx:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress:
            progress.update(task, advance=1, description=f"{description} (loss {losses[-1]:.3f})")
    model.eval()
    return losses


def add_lora(model, rank: int, alpha: int | None = None, targets=LORA_TARGETS):
    """Wrap `model` with a fresh PEFT LoRA (vLLM-compatible: no bias, no modules_to_save)."""
    from peft import LoraConfig, get_peft_model

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
