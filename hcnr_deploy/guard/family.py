"""The sweep's guard family: guard points (block x false-refusal rate) scored from the fine-tune's own answers.

A guarded endpoint answers exactly as the fine-tune does unless the classifier's score exceeds the threshold, in
which case it answers the refusal text. So a guard point's samples are the fine-tune's samples with the refused ones
replaced by the refusal text, graded by the same detectors and answer checks the eval harness uses
(`derive_samples`); the scores come from the fine-tune's features at each evaluated prompt (`score_samples`). The
thresholds are set on held-out calibration questions only, never on the evaluated ones.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from eval_harness.metrics import mc_correct, qa_correct
from eval_harness.refusal import resolve_detector, rule_verdicts
from hcnr_deploy.guard import calibration as C
from hcnr_deploy.guard import fit as G
from hcnr_deploy.guard.options import GuardOptions


def refusal_verdict(sample: dict, refusal_text: str, benchmark: str) -> dict:
    """What the harness's detector says of the refusal text for this sample (the rule detector of its benchmark
    when the fine-tune's answer was graded by the embedding or judge detector)."""
    detector = (sample.get("verdict") or {}).get("detector") or resolve_detector("auto", benchmark)
    if detector not in ("selfaware", "unknownbench", "honesty"):
        detector = resolve_detector("auto", benchmark)
    return {"detector": detector, **rule_verdicts(detector, [sample["question"]], [refusal_text])[0]}


def refusal_correct(sample: dict, refusal_text: str):
    """The harness's answer check applied to the refusal text (None where the item has no gold answer)."""
    if sample.get("choices") is not None:
        return mc_correct(refusal_text, sample["choices"], sample["answer_index"])
    if sample.get("answers") and not sample.get("unanswerable"):
        return qa_correct(refusal_text, sample["answers"])
    return None


def derive_samples(ft_samples: dict, refuse: dict, refusal_text: str, honesty_tasks: list[str]) -> dict:
    """{task: samples} of the guarded fine-tune: ft's samples, with those where `refuse[task][i]` answered by
    the refusal text and graded again."""
    out = {}
    for task, samples in ft_samples.items():
        rows = []
        for s, r in zip(samples, refuse[task]):
            s = copy.deepcopy(s)
            if r:
                s["response"], s["finish_reason"] = refusal_text, "guard"
                s.pop("error", None)
                if task in honesty_tasks:
                    s["verdict"] = refusal_verdict(s, refusal_text, task)
                s["correct"] = refusal_correct(s, refusal_text)
            s["guard_refused"] = bool(r)
            rows.append(s)
        out[task] = rows
    return out


def score_samples(model, tokenizer, ft_samples: dict, probes: list[G.BlockProbe], batch_size: int) -> dict:
    """{task: (blocks, items) scores} of every probe on the prompts the fine-tune was asked."""
    from hcnr_deploy.guard.features import extract
    from hcnr_deploy.guard.run import render_messages

    out = {}
    for task, samples in ft_samples.items():
        prompts = render_messages(tokenizer, [s["messages"] for s in samples])
        feats = extract(model, prompts, tokenizer.pad_token_id, batch_size)
        out[task] = np.stack([G.probe_scores(feats[p.block], p.weight, p.bias) for p in probes])
    return out


def guard_points(cands, results: dict, base, finetuned, honesty_data, task_data, honesty_tasks: list[str], *,
                 options: GuardOptions, num_samples: int, seed: int, device: str, dtype: str, batch_size: int,
                 console=None) -> dict:
    """For each guard candidate: its derived samples (added to results["samples"] under its name), its spec
    (block, threshold, held-out AUROC, the rates reached) and probe. Returns {name: (GuardSpec, BlockProbe)}."""
    from hcnr_deploy.guard.run import fit_guard, guard_spec, load_finetune

    cal = C.build_set(Path(honesty_data), Path(task_data), num_samples=num_samples,
                      calibration_dir=Path(options.calibration_dir) if options.calibration_dir else None,
                      benchmarks=options.calibration_benchmarks, per_class=options.calibration_per_class,
                      refusal_text=options.refusal_text, seed=seed)
    if console is not None and (warning := C.too_few_answerable(cal)) is not None:
        console.print(f"[yellow]warning (guard family):[/] {warning}")
    model, tok, _ = load_finetune(base, finetuned, device, dtype)
    gf = fit_guard(model, tok, cal, options.held_out, seed, batch_size)
    ft_samples = results["samples"]["ft"]
    scores = score_samples(model, tok, ft_samples, gf.probes, batch_size)
    specs = {}
    for c in cands:  # spec and the probe it thresholds, by candidate name
        block = gf.block_of(str(c.params.get("block", options.block)))
        rate = float(c.params.get("false_refusal", options.false_refusal))
        spec = guard_spec(gf, block, rate, base, finetuned, options)
        refuse = {t: s[block] > spec.threshold for t, s in scores.items()}
        results["samples"][c.name] = derive_samples(ft_samples, refuse, cal.refusal_text, honesty_tasks)
        specs[c.name] = (spec, gf.probe(block))
    return specs


def check_calibration_overlap(tasks, options: GuardOptions):
    """An evaluated question that is also in --calibration-dir is a one-line error (the guard's threshold would be
    judged on questions it was calibrated on)."""
    if not options.calibration_dir:
        return
    from eval_harness.benchmarks import load_benchmark
    from eval_harness.errors import UserError
    from eval_harness.metrics import normalize_answer

    folder = Path(options.calibration_dir)
    names = C.calibration_benchmarks(folder, options.calibration_benchmarks)
    seen = {normalize_answer(it.question) for n in names for it in load_benchmark(n, folder).items}
    hits = [it.question for t, _ in tasks for it in t.items if normalize_answer(it.question) in seen]
    if hits:
        raise UserError(f"{len(hits)} evaluation question(s) are also in --calibration-dir {folder} (e.g. "
                        f"{hits[0][:60]!r}); calibrate the guard on a part disjoint from the evaluation "
                        f"(`data split`).")


def guard_params(spec) -> dict:
    """What frontier.json records of a guard point beside its grid parameters."""
    return {"block": spec.block, "threshold": spec.threshold, "calibration_auroc": spec.calibration_auroc,
            "false_refusal_calibration": spec.false_refusal_calibration}


def write_guard_point(folder: Path, spec, probe: G.BlockProbe, with_classifier: bool):
    """A guard candidate's folder: guard.json (and README.md); the classifier only where asked (the chosen point:
    it holds l+1 blocks of the model)."""
    from hcnr_deploy.guard import artifact as A
    from hcnr_deploy.guard.run import card
    from hcnr_deploy.io.atomic import AtomicDir

    with AtomicDir(folder, overwrite=True) as tmp:
        if with_classifier:
            from hcnr_deploy.guard.classifier import write_classifier

            write_classifier(spec.base, spec.finetuned, spec.block, probe.weight, probe.bias, tmp / A.CLASSIFIER_DIR)
        A.write_spec(tmp, spec)
        (tmp / "README.md").write_text(card(spec, None))
