"""report.json and the artifacts of one candidate, written into one atomic folder.

The report (DESIGN.md section 3): per matrix ``d_j``, kept or not, columns restored, compensation norm,
Cholesky retries; totals: edited-weight ratio, samples, wall time per stage, peak memory, versions,
the settings (every ``RepairOptions`` field, plus the paths) and the equivalent command line.
"""

from __future__ import annotations

import resource
import shlex
import sys
from pathlib import Path

import torch

from eval_harness.versions import versions as package_versions
from hcnr_deploy import __version__
from hcnr_deploy.export import write_checkpoint, write_exact_adapter, write_svd_adapter
from hcnr_deploy.io.atomic import AtomicDir, write_json
from hcnr_deploy.options import RepairOptions
from hcnr_deploy.engine.families import config_stream_plan
from hcnr_deploy.engine.statistics import Matrix

SIMPLIFICATIONS = [
    "--offload keeps the decoder blocks in pinned CPU memory (one model copy in the working dtype there) and "
    "copies one block at a time to the device while it runs (Fisher, block-major: each block twice per pass; "
    "Hessians: once per block), asynchronously with the next block prefetched, and copies a block back only when "
    "a weight was written while it was there; the embeddings, final norm and LM head stay on the device. Only "
    "the architectures streamed "
    "block by block (llama, mistral, qwen2, qwen3) can offload. Without it the device holds one model copy in "
    "the working dtype.",
    "Block-by-block passes (Fisher with block-level recomputation, Hessians streamed one block at a time) cover "
    "every family whose decoder can be driven block by block, decided from the model's own modules "
    "(calibration_passes says which path ran and why); others build the whole autograd graph per batch and "
    "accumulate Hessians in passes over groups of consecutive blocks that fit --hessian-memory (each pass "
    "re-running the blocks before its group). The LM head computes logits at response-predicting positions "
    "only, in chunks, unless the family's head cannot run apart from its decoder.",
    "The restored columns' new values of all selected matrices are held in CPU memory (float32) until the output "
    "is written.",
    "A RepairSession (several candidates from one set of statistics) keeps the Gram matrices of every eligible "
    "matrix's input in CPU memory (float64, one per distinct input), per data set used.",
]


def equivalent_command(base, finetuned, honesty_data, task_data, out, opts: RepairOptions,
                       overwrite: bool = False) -> str:
    """The `hcnr-deploy repair` command line, every option spelled out, that reproduces this run."""
    args = ["hcnr-deploy", "repair", "--base", str(base), "--finetuned", str(finetuned), "--honesty-data",
            str(honesty_data), "--task-data", str(task_data), "--out", str(out), *opts.command_args()]
    return shlex.join(args + (["--overwrite"] if overwrite else []))


def versions() -> dict:
    out = {"hcnr_deploy": __version__, **package_versions(("torch", "transformers", "peft", "safetensors"))}
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def peak_memory(device: str) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {"peak_memory_bytes": int(rss)}
    if device.startswith("cuda"):
        out["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def restored_count(m: Matrix, granularity: str) -> int:
    if granularity == "column":
        return m.shape[0] * len(m.restore)
    return int(m.restore.sum())


def matrix_entry(m: Matrix, granularity: str) -> dict:
    if not m.selected:
        cols = []
    elif granularity == "column":
        cols = [int(i) for i in m.restore]
    else:
        cols = [int(i) for i in torch.nonzero(m.restore.any(0)).flatten()]
    entry = {"name": m.module, "shape": list(m.shape), "displacement": m.displacement, "selected": m.selected,
             "restored_columns": cols, "compensation_norm": m.compensation_norm if m.selected else 0.0,
             "cholesky_retries": m.retries}
    if granularity == "element":
        entry["restored_elements"] = int(m.restore.sum()) if m.selected else 0
    return entry


def calibration_passes(config: dict) -> dict:
    """The path of the calibration passes for this family (engine/families.py: the same probe on the modules
    built from config.json as on the loaded model) and, when not block-streamed, why."""
    plan = config_stream_plan(config)
    return {"path": plan.path, **({"reason": plan.reason} if plan.reason else {})}


def build_report(inputs, out: Path, opts: RepairOptions, fmt: str, mats: list[Matrix], granularity: str,
                 overwrite: bool, notes: list[str], command: str | None) -> dict:
    """The report of one candidate, before the artifact is written (timings and matrices come last)."""
    chosen = [m for m in mats if m.selected]
    restored = sum(restored_count(m, granularity) for m in chosen)
    eligible_weights = sum(m.shape[0] * m.shape[1] for m in mats)
    given = inputs.given
    return {
        "hcnr_deploy_version": __version__,
        "base": str(inputs.base_dir),
        "finetuned": str(inputs.ft_dir),
        "finetune_kind": "lora" if inputs.finetune.is_lora else "full",
        "output": str(out),
        "format": fmt,
        "edited_fraction": restored / eligible_weights,
        "restored_weights": restored,
        "eligible_weights": eligible_weights,
        "eligible_matrices": len(mats),
        "selected_matrices": len(chosen),
        "num_samples": {"honesty": len(inputs.enc_hon), "task": len(inputs.enc_task)},
        "tokens": {"honesty": sum(len(i) for i, _ in inputs.enc_hon), "task": sum(len(i) for i, _ in inputs.enc_task)},
        "settings": {**opts.settings(), "overwrite": overwrite, **{k: str(v) for k, v in given.items()},
                     "out": str(out), "resolved_device": inputs.device,
                     "resolved_dtype": str(inputs.dtype).replace("torch.", ""),
                     "command": command or equivalent_command(*given.values(), out, opts, overwrite)},
        "versions": versions(),
        "notes": notes,
        "calibration_passes": calibration_passes(inputs.finetune.base.config),
        "simplifications": SIMPLIFICATIONS,
    }


def write_output(out: Path, overwrite: bool, report: dict, inputs, mats: list[Matrix], granularity: str,
                 patches: dict, new_a: dict, new_b: dict, want_lora: bool, opts: RepairOptions, timings: dict,
                 finish_timings):
    """The artifact (checkpoint, exact adapter or SVD adapter), report.json and README.md, atomically."""
    finetune = inputs.finetune
    base_ref = str(inputs.given["base"])  # as the user gave it (hub id or path), not resolved
    with AtomicDir(out, overwrite) as tmp:
        if report["format"] == "checkpoint":
            write_checkpoint(tmp, finetune, patches)
        elif want_lora:
            write_exact_adapter(tmp, finetune, new_a, base_ref, new_b)
        else:
            eligible = [m.name for m in mats]
            report["svd"] = write_svd_adapter(tmp, finetune, patches, opts.max_rank, base_ref, eligible, opts.seed)
            report["svd_relative_error"] = report["svd"]["relative_error"]
        finish_timings()
        report["timings_s"] = timings
        report.update(peak_memory(inputs.device))
        report["matrices"] = [matrix_entry(m, granularity) for m in mats]
        write_json(tmp / "report.json", report)
        write_card(tmp, report)
    return report


def write_card(folder: Path, report: dict):
    """README.md model card (hcnr_deploy.card) of the output."""
    from hcnr_deploy.card import write_model_card

    write_model_card(folder, report)
