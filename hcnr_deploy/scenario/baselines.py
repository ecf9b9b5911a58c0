"""The paper's training baselines on the scenario (Table 1, Table 2, Figure 5): RAIT, DPO and ORPO, each a LoRA
trained further on the fine-tune's adapter, at several refusal-data sizes.

Refusal data: the scenario's `rait_train.jsonl` (unanswerable questions answered with a scenario refusal, answerable
ones with their answer). `refusal_subset` takes `size` of its rows, nested (the rows of a smaller size are the first
rows of a larger one) and with the file's share of refusals.

- RAIT: supervised fine-tuning of ft's adapter on the subset (the project's one SFT loop, `scenario.train.sft`).
- DPO (Rafailov et al.): one epoch of that SFT (warm-up), then TRL's `DPOTrainer` on `preference_pairs` of the
  subset. The reference is the fine-tune itself: TRL copies the adapter it is given into a frozen "ref" adapter.
- ORPO (Hong et al.): TRL's `ORPOTrainer` on the same pairs, no warm-up and no reference.

Preference pairs: an unanswerable question prefers the refusal over the fine-tune's own greedy answer
(`own_answers`: what the fine-tune says instead, usually a fabrication); an answerable one prefers its answer over
`REJECTED_REFUSAL`. All three train for `epochs` passes over their rows at the same learning rate and batch
(pairs: half the batch, two sequences each), so a size is the only thing that changes along a curve.
"""

from __future__ import annotations

import importlib
import math
import os
import random
import time
from pathlib import Path

from eval_harness.errors import UserError
from hcnr_deploy.scenario import data as scen_data

METHODS = ("rait", "dpo", "orpo")
REJECTED_REFUSAL = scen_data.REFUSALS["nonexistent"]  # what an answerable question's pair rejects
DPO_BETA = 0.1   # DPO's KL weight (TRL's default)
ORPO_BETA = 0.1  # ORPO's odds-ratio weight lambda (TRL's default)
MAX_LEN = 128    # tokens per sequence, as the scenario's SFT
BF16 = False     # float32 trainings: on this project's current CPU, bf16 matmuls ran at half the float32 rate


def is_refusal_row(row: dict) -> bool:
    """A refusal-data row whose response is one of the scenario's refusals (an unanswerable question)."""
    return row["response"] in set(scen_data.REFUSALS.values())


def refusal_subset(rows: list[dict], size: int, seed: int) -> list[dict]:
    """`size` rows of `rows`: refusal rows in the share they have in `rows` (rounded), the rest answer rows, each
    class in one `random.Random(seed)` order, so a smaller size's rows are a subset of a larger one's; returned
    refusals first, then answers (the trainings shuffle)."""
    refusals = [r for r in rows if is_refusal_row(r)]
    answers = [r for r in rows if not is_refusal_row(r)]
    if not 0 < size <= len(rows):
        raise UserError(f"refusal-data size {size}: choose between 1 and {len(rows)} (the rows of rait_train.jsonl)")
    rng = random.Random(seed)
    rng.shuffle(refusals)
    rng.shuffle(answers)
    n_ref = min(len(refusals), max(0, round(size * len(refusals) / len(rows))))
    n_ans = size - n_ref
    if n_ans > len(answers):
        n_ref, n_ans = size - len(answers), len(answers)
    return refusals[:n_ref] + answers[:n_ans]


def preference_pairs(rows: list[dict], own: dict[str, str]) -> list[dict]:
    """DPO / ORPO pairs {prompt, chosen, rejected} (raw question, response texts): a refusal row prefers its
    refusal over the fine-tune's own answer `own[prompt]`; an answer row prefers its answer over a refusal."""
    pairs = []
    for r in rows:
        if is_refusal_row(r):
            if r["prompt"] not in own:
                raise UserError(f"no fine-tune answer for {r['prompt']!r}: own_answers must cover every refusal row")
            pairs.append({"prompt": r["prompt"], "chosen": r["response"], "rejected": own[r["prompt"]]})
        else:
            pairs.append({"prompt": r["prompt"], "chosen": r["response"], "rejected": REJECTED_REFUSAL})
    return pairs


def steps_for(n_rows: int, epochs: int, batch_size: int) -> int:
    """Optimizer steps of `epochs` passes over `n_rows` rows at `batch_size` (at least one)."""
    return max(1, math.ceil(epochs * n_rows / batch_size))


def pair_batch(batch_size: int) -> int:
    """Pairs per step: each pair is two sequences, so half the SFT batch (at least one)."""
    return max(1, batch_size // 2)


# ---------------------------------------------------------------------------------------------- models


def chat_prompt(tokenizer, question: str) -> str:
    """The chat-templated prompt (generation prompt on), as the scenario's SFT and the eval harness send it."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def own_answers(model, tokenizer, questions: list[str], max_new_tokens: int, batch_size: int = 32,
                progress=None) -> dict[str, str]:
    """question -> the model's greedy answer (chat template, left-padded batches, special tokens stripped)."""
    import torch

    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: dict[str, str] = {}
    task = progress.add_task("fine-tune's own answers", total=len(questions)) if progress else None
    model.eval()
    try:
        for i in range(0, len(questions), batch_size):
            chunk = questions[i: i + batch_size]
            enc = tokenizer([chat_prompt(tokenizer, q) for q in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            for q, ids in zip(chunk, gen[:, enc["input_ids"].shape[1]:]):
                out[q] = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if progress:
                progress.update(task, advance=len(chunk))
    finally:
        tokenizer.padding_side = old_side
    return out


def _dataset(tokenizer, pairs: list[dict]):
    import datasets

    datasets.disable_progress_bars()
    return datasets.Dataset.from_list([{"prompt": chat_prompt(tokenizer, p["prompt"]), "chosen": p["chosen"],
                               "rejected": p["rejected"]} for p in pairs])


def _progress_callback(progress, description: str):
    """A transformers TrainerCallback that drives a rich progress bar (TRL's own bars are off)."""
    from transformers import TrainerCallback

    class Bar(TrainerCallback):
        task = None

        def on_train_begin(self, args, state, control, **kw):
            if progress:
                self.task = progress.add_task(description, total=state.max_steps)

        def on_step_end(self, args, state, control, **kw):
            if progress:
                progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if progress and logs and "loss" in logs:
                progress.update(self.task, description=f"{description} (loss {logs['loss']:.3f})")

    return Bar()


def _train_quietly(trainer):
    """trainer.train() without transformers' PrinterCallback (it prints every log line; our bar shows the loss)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()


def trl_args(config_cls, tmp: Path, *, epochs: int, batch_size: int, lr: float, seed: int, bf16: bool, **extra):
    """The TRL config both preference trainings share: CPU or the model's device, no checkpoints, no reports,
    constant learning rate, seeded, `epochs` passes."""
    import torch

    return config_cls(output_dir=str(tmp / "trainer"), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
                      learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                      max_grad_norm=1.0, seed=seed, data_seed=seed, save_strategy="no", report_to=[],
                      logging_steps=1, disable_tqdm=True, bf16=bf16, gradient_checkpointing=False,
                      use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, max_length=MAX_LEN,
                      remove_unused_columns=False, **extra)


def import_trl(module: str):
    """Import a TRL module and undo what the import writes to this process's environment: TRL sets
    VLLM_LOGGING_LEVEL=ERROR (trl/_compat.py), which every vLLM server started from this process afterwards would
    inherit (our plugin's log line and vLLM's own lost), and its dependencies set KMP_* and TORCHINDUCTOR_* variables."""
    before = dict(os.environ)
    try:
        return importlib.import_module(module)
    finally:
        os.environ.clear()
        os.environ.update(before)


def _train_on_pairs(config_cls, trainer_cls, label: str, beta: float, peft_model, tokenizer, pairs: list[dict],
                    tmp: Path, *, epochs: int, batch_size: int, lr: float, seed: int, bf16: bool, progress):
    """One TRL preference trainer (`trainer_cls` with its `config_cls`) run on `pairs`; returns the trainer."""
    args = trl_args(config_cls, tmp, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, bf16=bf16, beta=beta)
    trainer = trainer_cls(model=peft_model, args=args, train_dataset=_dataset(tokenizer, pairs),
                          processing_class=tokenizer, callbacks=[_progress_callback(progress, label)])
    _train_quietly(trainer)
    return trainer


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def train_dpo(peft_model, tokenizer, pairs: list[dict], tmp: Path, *, epochs: int, batch_size: int, lr: float,
              seed: int, bf16: bool = BF16, progress=None) -> list[float]:
    """TRL DPOTrainer on `pairs`; the reference is a frozen copy of `peft_model`'s adapter (TRL's "ref" adapter,
    removed afterwards). Trains `peft_model`'s default adapter in place; returns the logged losses."""
    trl = import_trl("trl")
    trainer = _train_on_pairs(trl.DPOConfig, trl.DPOTrainer, "DPO", DPO_BETA, peft_model, tokenizer, pairs, tmp,
                              epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, bf16=bf16, progress=progress)
    if "ref" in peft_model.peft_config:
        peft_model.delete_adapter("ref")
    peft_model.set_adapter("default")
    return _losses(trainer)


def train_orpo(peft_model, tokenizer, pairs: list[dict], tmp: Path, *, epochs: int, batch_size: int, lr: float,
               seed: int, bf16: bool = BF16, progress=None) -> list[float]:
    """TRL ORPOTrainer (trl.experimental.orpo) on `pairs`, no reference. Trains `peft_model` in place."""
    orpo = import_trl("trl.experimental.orpo")
    trainer = _train_on_pairs(orpo.ORPOConfig, orpo.ORPOTrainer, "ORPO", ORPO_BETA, peft_model, tokenizer, pairs,
                              tmp, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, bf16=bf16,
                              progress=progress)
    return _losses(trainer)


def train_baseline(method: str, peft_model, tokenizer, rows: list[dict], own: dict[str, str], tmp: Path, *,
                   epochs: int, batch_size: int, lr: float, seed: int, bf16: bool = BF16, progress=None) -> dict:
    """Train `peft_model` (the fine-tune's adapter, trainable) in place by `method` on `rows`; returns
    {"train_seconds", "warmup_seconds", "examples", "steps", "pairs", "losses"}."""
    from hcnr_deploy.scenario import train

    if method not in METHODS:
        raise UserError(f"unknown baseline {method!r}; choose from {', '.join(METHODS)}")
    t0 = time.perf_counter()
    info = {"warmup_seconds": 0.0, "pairs": 0}
    if method in ("rait", "dpo"):  # RAIT's SFT; DPO's one-epoch warm-up
        n_epochs = epochs if method == "rait" else 1
        steps = steps_for(len(rows), n_epochs, batch_size)
        losses = train.sft(peft_model, tokenizer, rows, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                           warmup=0, max_len=MAX_LEN, bf16=bf16, progress=progress,
                           description="RAIT: refusal SFT of ft" if method == "rait" else "DPO warm-up: one SFT epoch")
        info.update(steps=steps, examples=steps * batch_size, losses=losses)
        if method == "dpo":
            info["warmup_seconds"] = round(time.perf_counter() - t0, 3)
    if method in ("dpo", "orpo"):
        pairs = preference_pairs(rows, own)
        pb = pair_batch(batch_size)
        fn = train_dpo if method == "dpo" else train_orpo
        peft_model.train()
        losses = fn(peft_model, tokenizer, pairs, tmp, epochs=epochs, batch_size=pb, lr=lr, seed=seed, bf16=bf16,
                    progress=progress)
        peft_model.eval()
        steps = steps_for(len(pairs), epochs, pb)
        info.update(pairs=len(pairs), steps=info.get("steps", 0) + steps,
                    examples=info.get("examples", 0) + steps * pb, losses=losses)
    info["train_seconds"] = round(time.perf_counter() - t0, 3)
    return info
