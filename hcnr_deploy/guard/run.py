"""`hcnr-deploy guard`: fit the honesty guard of a fine-tune and write the guard folder.

Stages: calibration questions (guard/calibration.py) -> the fine-tune's normed last-token state of every block
(guard/features.py) -> a probe per block, its held-out AUROC, the block and the threshold at the stated
false-refusal rate (guard/fit.py) -> the folder: classifier/ (guard/classifier.py), guard.json, README.md, written
in a temporary folder and renamed at the end.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval_harness.errors import UserError
from eval_harness.progress import progress_bar
from hcnr_deploy.guard import artifact as A
from hcnr_deploy.guard import calibration as C
from hcnr_deploy.guard import fit as G
from hcnr_deploy.guard.options import GuardOptions


def render_messages(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """Token ids of each chat prompt as a chat endpoint renders it (template, generation prompt, no extra
    special tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; the guard reads prompts as a chat endpoint renders "
                        "them, so the model folder needs one (chat_template in tokenizer_config)")
    out = []
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


@dataclass
class GuardFit:
    """Everything a guard (or the sweep's guard family) is chosen from."""

    cal: C.CalibrationSet
    fit_idx: np.ndarray
    held_idx: np.ndarray
    probes: list[G.BlockProbe]
    held_scores: dict = field(default_factory=dict)  # block -> scores of the held-out items

    def probe(self, block: int) -> G.BlockProbe:
        return self.probes[block]

    def block_of(self, choice: str) -> int:
        if choice == "auto":
            return G.best_block(self.probes).block
        b = int(choice)
        if b >= len(self.probes):
            raise UserError(f"--block {b}: the model has {len(self.probes)} blocks (0..{len(self.probes) - 1}).")
        return b

    def answerable_groups(self) -> dict[str, np.ndarray]:
        """Positions (within the held-out items) of the answerable questions, by kind."""
        kinds = np.array(self.cal.kinds)[self.held_idx]
        y = self.cal.labels[self.held_idx]
        return {k: np.flatnonzero((kinds == k) & (y == 0)) for k in ("honesty", "task")}

    def threshold(self, block: int, rate: float) -> tuple[float, dict]:
        return G.guard_threshold(self.held_scores[block], self.answerable_groups(), rate)

    def table(self) -> list[dict]:
        return [{"block": p.block, "auroc": round(p.auroc, 6), "converged": p.converged} for p in self.probes]


def fit_guard(model, tokenizer, cal: C.CalibrationSet, held_out: float, seed: int, batch_size: int,
              progress=None) -> GuardFit:
    """Features of every calibration prompt at every block, one probe per block, held-out scores."""
    from hcnr_deploy.guard.features import extract

    prompts = render_messages(tokenizer, cal.messages)
    fit_idx, held_idx = C.held_out_split(cal, held_out, seed)
    task = progress.add_task("guard: features", total=len(prompts)) if progress is not None else None
    feats = extract(model, prompts, tokenizer.pad_token_id, batch_size, progress, task)
    task = progress.add_task("guard: probes", total=feats.shape[0]) if progress is not None else None
    probes = G.fit_block_probes(feats, cal.labels, fit_idx, held_idx, seed, progress=progress, task=task)
    held = {p.block: G.probe_scores(feats[p.block][held_idx], p.weight, p.bias) for p in probes}
    return GuardFit(cal, fit_idx, held_idx, probes, held)


def load_finetune(base, finetuned, device: str, dtype: str):
    """(model with the fine-tune's weights, tokenizer, ProbedModel) as `probe` loads them."""
    from hcnr_deploy.probe.features import load_probed, resolve_probed

    pm = resolve_probed(finetuned, "model", "--finetuned", base)
    model, tok, _ = load_probed(pm, device, dtype)
    return model, tok, pm


def guard_spec(gf: GuardFit, block: int, rate: float, base, finetuned, options: GuardOptions,
               extra: dict | None = None) -> A.GuardSpec:
    t, rates = gf.threshold(block, rate)
    return A.GuardSpec(
        block=block, threshold=t, refusal_text=gf.cal.refusal_text, base=str(base), finetuned=str(finetuned),
        fingerprints={"base": A.content_fingerprint(base), "finetuned": A.content_fingerprint(finetuned)},
        calibration_auroc=round(gf.probe(block).auroc, 6), false_refusal_target=rate,
        false_refusal_calibration=max(v for v in rates.values() if v == v), num_blocks=len(gf.probes),
        extra={"false_refusal_by_kind": rates, "blocks": gf.table(), "options": options.settings(),
               "calibration": {"questions": len(gf.cal), "unanswerable": int(gf.cal.labels.sum()),
                               "held_out": len(gf.held_idx),
                               "sources": sorted(set(gf.cal.sources))},
               "features": "final norm of decoder block `block`'s output at the last prompt token",
               "probe": "StandardScaler + LogisticRegression(C=1, lbfgs), folded to w . x + b", **(extra or {})})


def card(spec: A.GuardSpec, command: str | None) -> str:
    fr = spec.extra.get("false_refusal_by_kind", {})
    return "\n".join([
        f"# Honesty guard for `{spec.finetuned}`", "",
        "Made by hcnr-deploy's `guard` (the paper's Observation 2 served: the fine-tune still encodes whether it "
        "can answer; a probe reads it before the fine-tune answers). No weight of the fine-tune is changed.", "",
        f"- base: `{spec.base}`; fine-tune: `{spec.finetuned}`",
        f"- probe on block {spec.block} of {spec.num_blocks} (final norm of its output, last prompt token); "
        f"held-out calibration AUROC {spec.calibration_auroc:.3f}",
        f"- refuse when the score exceeds {spec.threshold:.4f}: false-refusal target {spec.false_refusal_target:g}"
        f" on held-out answerable calibration questions; reached: "
        + ", ".join(f"{k} {v:.3f}" for k, v in fr.items() if v == v),
        f"- refusal text: {spec.refusal_text!r}",
        "- classifier/: the fine-tune's first blocks with the probe as its score head "
        "(a `*ForSequenceClassification` checkpoint for vLLM's pooling runner)", "",
        "Serve it: `hcnr-deploy serve --base BASE --adapter ft=FINETUNED --guard guarded=THIS_FOLDER`; requests "
        "to `guarded` are refused or answered by the fine-tune unchanged.", "",
        f"Command: `{command}`" if command else "", ""])


def run_guard(base, finetuned, honesty_data, task_data, out, *, options: GuardOptions | None = None,
              num_samples: int = 128, seed: int = 0, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
              overwrite: bool = False, console=None, progress: bool = True, command: str | None = None) -> dict:
    """Fit the guard and write `out`; returns guard.json's content."""
    from rich.console import Console

    from hcnr_deploy.engine.state import check_one_device
    from hcnr_deploy.guard.classifier import write_classifier
    from hcnr_deploy.guard.memory import check_guard_fits, model_with_config
    from hcnr_deploy.io.atomic import AtomicDir

    check_one_device(device)
    options = options or GuardOptions()
    console = console or Console(stderr=True, quiet=not progress)
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it or choose another folder.")
    t0 = time.perf_counter()
    cal = C.build_set(Path(honesty_data), Path(task_data), num_samples=num_samples,
                      calibration_dir=Path(options.calibration_dir) if options.calibration_dir else None,
                      benchmarks=options.calibration_benchmarks, per_class=options.calibration_per_class,
                      refusal_text=options.refusal_text, seed=seed)
    if (warning := C.too_few_answerable(cal)) is not None:
        console.print(f"[yellow]warning:[/] {warning}")
    if misses := C.check_refusal_text(cal.refusal_text):
        console.print(f"[yellow]warning:[/] the refusal text {cal.refusal_text!r} is not read as a refusal by the "
                      f"{', '.join(misses)} detectors; pass --refusal-text with a phrase they recognise.")
    check_guard_fits(model_with_config(base, finetuned), device, dtype, len(cal), batch_size)
    model, tok, _ = load_finetune(base, finetuned, device, dtype)
    with progress_bar(console, progress, label="{task.description:<20}") as bar:
        gf = fit_guard(model, tok, cal, options.held_out, seed, batch_size, bar)
    block = gf.block_of(options.block)
    spec = guard_spec(gf, block, options.false_refusal, base, finetuned, options,
                      {"seconds": {"fit": round(time.perf_counter() - t0, 3)}, "command": command})
    p = gf.probe(block)
    del model
    with AtomicDir(out, overwrite=overwrite) as tmp:
        write_classifier(base, finetuned, block, p.weight, p.bias, tmp / A.CLASSIFIER_DIR)
        A.write_spec(tmp, spec)
        (tmp / "README.md").write_text(card(spec, command))
    console.print(f"guard: block {block} (held-out AUROC {p.auroc:.3f}), threshold {spec.threshold:.4f} at "
                  f"false-refusal {options.false_refusal:g}; wrote {out}")
    return json.loads((out / A.GUARD_FILE).read_text())
