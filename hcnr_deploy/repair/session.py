"""``RepairSession``: load once, compute the statistics once, write any number of candidates.

    with RepairSession(base, finetuned, honesty_data, task_data, RepairOptions(...)) as session:
        session.write(out_a, method="hcnr", r_cw=0.2)
        session.write(out_b, method="regmean", task_weight=3.0)

``write(out, overwrite=False, **changes)`` takes the session's options with `changes` (validated,
``RepairOptions.replace``) and returns the report dict, written with the artifact into `out`
atomically; its bytes equal a fresh ``run_repair`` with the same options. ``write_many([(out, changes),
...])`` writes several: their stage 2 runs as one block-streamed pass (stage2.py), each block's Grams
computed once for every candidate (on the Fisher pass of the same data and model state where there is one,
engine/passes.py) and freed before the next block. Per write, options of the "data" and "compute" groups
(except ``seed`` and ``hessian_memory_gb``) must equal the session's: they define the statistics, and a
different value is a ``UserError``. Every "method" option may change: Fisher scores are kept per (data set,
model state, granularity) and computed once on first need; ``--hessian-inputs sequential`` (Hessians that
depend on the candidate) runs its own streamed stage 2 per candidate. ``--method sft`` trains once per (lr,
seed) and step count; ``session.sft([16, 32, 64])`` trains once for all three (constant learning rate: a
snapshot is the shorter run). ``seed`` may change per write (random selection, SVD extraction and sft only).

Memory: the model (over several GPUs: engine/placement.py), the Fisher scores (``4 in`` bytes per matrix), one block's
Grams, each pending candidate's edits (LoRA factors; a checkpoint's restored values and the fused passes' Grams are
spilled to disk). ``run_repair`` is a session with one write."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hcnr_deploy.data import encode, load_jsonl
from hcnr_deploy.engine.placement import parse_devices, place_model
from hcnr_deploy.engine.plan import check_fits
from eval_harness.atomic import refuse_existing, refuse_overlap
from eval_harness.errors import UserError
from eval_harness.progress import progress_bar
from hcnr_deploy.io.checkpoint import Checkpoint, resolve_model_dir
from hcnr_deploy.io.finetune import FineTune
from hcnr_deploy.io.load import load_model, load_tokenizer
from hcnr_deploy.options import RepairOptions
from hcnr_deploy.repair import candidates as cand
from hcnr_deploy.repair.report import build_report, write_output
from hcnr_deploy.engine.state import (BlockOffload, ModelState, offload_error, place_outside_blocks,
                                      resolve_device_dtype, return_freed_memory)
from hcnr_deploy.repair.stage2 import Pending, PatchStore, shared_stage2, shared_streams
from hcnr_deploy.engine.statistics import Matrix, Statistics, eligible, stage_name as _stage
from hcnr_deploy.engine.streaming import PLAIN_HEAD_MODELS, decoder_blocks

# options that define the statistics of a session (a write may not change them)
SESSION_FIXED = ("num_samples", "max_length", "device", "dtype", "batch_size", "offload")
NOTES = {
    "regmean": "--method regmean needs no Fisher pass (no fisher stage in timings_s): every column of every "
               "eligible matrix is edited from the Grams of the honesty inputs (base) and the task inputs "
               "(fine-tune).",
    "scale": "--method scale needs no calibration statistics: W = W0 + alpha D on every eligible matrix.",
    "lines": "--method lines needs no calibration statistics: W = W0 + (alpha + beta l / (L - 1)) D on every "
             "eligible matrix of block l of L.",
}


@dataclass
class Inputs:
    """What a session loaded: the paths as given and resolved, the fine-tune, the encoded calibration data."""

    given: dict  # base, finetuned, honesty_data, task_data as the caller gave them
    base_dir: Path
    ft_dir: Path
    finetune: FineTune
    enc_hon: list
    enc_task: list
    notes: list
    device: str
    dtype: torch.dtype


def _progress(console, enabled: bool):
    return progress_bar(console, enabled, spinner=True, unit="samples")


def check_out(out, overwrite: bool, *folders: tuple[str, Path]) -> Path:
    """The resolved output folder; refuses an existing one (without `overwrite`) and one overlapping an input."""
    out = Path(out).expanduser().resolve()
    refuse_existing(out, overwrite)
    refuse_overlap(out, folders, "the repair")
    return out


class RepairSession:
    """Statistics computed once, candidates written from them (module docstring)."""

    def __init__(self, base, finetuned, honesty_data, task_data, opts: RepairOptions | None = None, console=None,
                 progress: bool = False, statistics_dir=None):
        """`statistics_dir`: Fisher scores read from and written to this folder (Statistics' ``store``)."""
        self.opts = opts if opts is not None else RepairOptions()
        self.statistics_dir = statistics_dir
        self.given = dict(base=base, finetuned=finetuned, honesty_data=honesty_data, task_data=task_data)
        self.progress = progress
        if console is None:
            from rich.console import Console

            console = Console(stderr=True, quiet=not progress)
        self.console = console
        self.inputs: Inputs | None = None
        self.stats: Statistics | None = None
        self._sft: dict[tuple, dict[int, tuple]] = {}  # (lr, seed) -> {steps: (factors, losses)}
        self._sft_s: dict[tuple, float] = {}

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per statistics stage (``load``, ``fisher_honesty``, ``gram_task``, ..., ``sft``), each computed
        once."""
        if not self.stats:
            return {}
        sft = {"sft" if k == (self.opts.lr, self.opts.seed) else f"sft_lr{k[0]:g}_seed{k[1]}": v
               for k, v in self._sft_s.items()}
        return {"load": self._load_s, **self.stats.timings, **sft}

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def open(self):
        """Resolve and check the inputs, encode the data, load the base model (done once)."""
        if self.inputs is not None:
            return
        t0 = time.perf_counter()
        o, g = self.opts, self.given
        torch.manual_seed(o.seed)
        return_freed_memory()
        base_dir = resolve_model_dir(g["base"], "--base")
        ft_dir = resolve_model_dir(g["finetuned"], "--finetuned")
        base_ck = Checkpoint(base_dir, "--base")
        finetune = FineTune(ft_dir, base_ck)
        hon = load_jsonl(g["honesty_data"], o.num_samples)
        task_examples = load_jsonl(g["task_data"], o.num_samples)
        tokenizer = load_tokenizer(ft_dir, base_dir)  # the fine-tune's own tokenizer when it ships one
        notes = []
        for label, examples, path in (("honesty", hon, g["honesty_data"]), ("task", task_examples, g["task_data"])):
            if len(examples) < o.num_samples:
                notes.append(f"{path} has {len(examples)} {label} examples, fewer than --num-samples "
                             f"{o.num_samples}; all of them were used.")
                self.console.print(f"[yellow]note[/]: {notes[-1]}")
        enc_hon = encode(tokenizer, hon, o.max_length)
        enc_task = encode(tokenizer, task_examples, o.max_length)
        devices = parse_devices(o.device, torch.cuda.device_count() if torch.cuda.is_available() else 0)
        dev, dt = resolve_device_dtype(devices[0] if len(devices) > 1 else o.device, o.dtype, base_ck.config)
        if o.offload and base_ck.config.get("model_type") not in PLAIN_HEAD_MODELS:
            raise offload_error(base_dir, base_ck.config.get("model_type"))
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        model = load_model(base_dir, dt, "cpu" if o.offload or len(devices) > 1 else dev)
        for name, p in model.named_parameters():
            if not torch.isfinite(p).all():
                raise UserError(f"tensor {name} of --base {base_dir} contains NaN or Inf values; the checkpoint is "
                                f"corrupt, re-export it before repairing.")
        move, blocks = None, decoder_blocks(model)
        self.placement = place_model(model, blocks, devices, o.offload, self.console.print) if devices[1:] else None
        device_of = self.placement.device_of if self.placement else None
        if o.offload:
            if blocks is None:
                raise offload_error(base_dir, base_ck.config.get("model_type"))
            if not self.placement:
                place_outside_blocks(model, blocks[1], dev)
            move = BlockOffload(dev, blocks[1], device_of)
        state = ModelState(model, finetune, dt)
        mats = eligible(model, finetune)
        if not mats:
            raise UserError(f"--finetuned {ft_dir} does not differ from --base {base_dir} in any decoder Linear; "
                            f"there is nothing to repair.")
        self.inputs = Inputs(g, base_dir, ft_dir, finetune, enc_hon, enc_task, notes, dev, dt)
        self.model, self.state, self.move, self.mats = model, state, move, mats
        self.bar = _progress(self.console, self.progress)
        self.bar.start()
        self.stats = Statistics(model, state, mats, {"honesty": enc_hon, "task": enc_task}, o.batch_size, dev,
                                self.bar, move, device_of, store=self.statistics_dir)
        self._load_s = round(time.perf_counter() - t0, 4)

    def close(self):
        """Stop the progress display and drop the model and the statistics."""
        if self.inputs is None:
            return
        self.bar.stop()
        dev = self.inputs.device
        self.stats.close()
        self.model = self.state = self.move = self.stats = None
        self._sft.clear()
        self.inputs = None
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()

    def _options(self, changes: dict) -> RepairOptions:
        o = self.opts.replace(**changes)
        for key in SESSION_FIXED:
            if getattr(o, key) != getattr(self.opts, key):
                flag = "--" + key.replace("_", "-")
                raise UserError(f"{flag} cannot change within a RepairSession (its statistics were computed with "
                                f"{getattr(self.opts, key)!r}); open another session for {getattr(o, key)!r}.")
        return o

    def write(self, out, overwrite: bool = False, command: str | None = None, **changes) -> dict:
        """Write one candidate (the session's options with `changes`) to `out`; return its report."""
        return self.write_many([(out, changes)], overwrite, command)[0]

    def write_many(self, jobs, overwrite: bool = False, command: str | None = None) -> list[dict]:
        """Write every candidate of `jobs` (``[(out, changes)]``); return their reports in order. Every option set
        and folder is checked before any work. The candidates that need Grams share one block-streamed stage 2
        (stage2.py: each block's Grams computed once for all of them, then freed); the others (scale, sft,
        ``--compensation none``, ``--hessian-inputs sequential``) are written one at a time."""
        self.open()
        inp = self.inputs
        todo = [(check_out(out, overwrite, ("--base", inp.base_dir), ("--finetuned", inp.ft_dir)),
                 self._options(changes)) for out, changes in jobs]
        reports: list[dict | None] = [None] * len(todo)
        self.stats.want_grams(s for _, o in todo for s in shared_streams(o))  # Grams ride on the Fisher passes
        deferred: list[tuple[int, _Job]] = []
        try:
            for k, (out, o) in enumerate(todo):
                job = self._prepare(out, o)
                if job.pending is None:
                    reports[k] = self._finish(job, overwrite, command)
                else:
                    deferred.append((k, job))
            if deferred:
                pending = [job.pending for _, job in deferred]
                self.stats.record("hessian", shared_stage2(
                    self.model, decoder_blocks(self.model), self.state, inp.finetune, pending, self.stats.encoded,
                    self.opts.batch_size, inp.device, self.bar, self.move, self.stats.grams, self.stats.device_of))
                for k, job in deferred:
                    reports[k] = self._finish(job, overwrite, command)
        finally:
            for _, job in deferred:
                if isinstance(job.patches, PatchStore):
                    job.patches.close()
        return reports

    def _prepare(self, out: Path, o: RepairOptions) -> _Job:
        """One candidate up to its stage 2: statistics it needs (Fisher: cached), selection, and either its edits
        (statistic-free methods, sft, sequential or whole-model stage 2) or a ``Pending`` for the shared pass."""
        inp, stats = self.inputs, self.stats
        finetune = inp.finetune
        granularity = o.granularity if o.method == "hcnr" else "column"
        lora_exact = finetune.is_lora and granularity == "column"
        fmt = ("adapter" if lora_exact else "checkpoint") if o.format == "auto" else o.format
        want_lora = lora_exact and fmt == "adapter"
        mats = [Matrix(m.name, m.shape, m.d_col_sq, m.w0_col_sq) for m in self.mats]
        job = _Job(out, o, fmt, want_lora, mats, granularity, stats)
        lap = job.lap
        patches, new_a, new_b = {}, {}, {}
        if o.method in ("hcnr", "regmean"):
            if o.method == "hcnr":
                job.used = self._hcnr_select(o, mats, granularity)
                chosen = [m for m in mats if m.selected]
                method = o.compensation
            else:
                cand.select_all(mats)
                chosen, method = mats, "regmean"
            lap("selection")
            blocks = decoder_blocks(self.model)
            if method != "none" and o.hessian_inputs != "sequential" and blocks is not None and chosen:
                if not want_lora:
                    patches = PatchStore(out)
                job.pending = Pending(chosen, method, o, want_lora, patches, new_a)
                job.used.append("hessian")
            else:
                patches, new_a = self._streamed(o, chosen, method, want_lora, lap)
        elif o.method == "scale":
            patches, new_b = cand.scale_candidate(mats, finetune, o.alpha, want_lora)
            lap("selection")
        elif o.method == "lines":
            patches, new_b = cand.lines_candidate(mats, finetune, o.alpha, o.beta, want_lora)
            lap("selection")
        else:
            factors, job.losses = self.sft(o.steps, o.lr, o.seed)
            job.clock[0] = time.perf_counter()  # the training is timed as "sft" (once per session and lr, seed)
            job.timings["sft"] = self._sft_s[(o.lr, o.seed)]
            patches, new_a, new_b = cand.sft_candidate(mats, finetune, factors, want_lora)
            lap("selection")
        job.patches, job.new_a, job.new_b = patches, new_a, new_b
        return job

    def _finish(self, job: _Job, overwrite: bool, command: str | None) -> dict:
        """The report and the artifact of one prepared candidate (its stage 2 done)."""
        inp, stats, o = self.inputs, self.stats, job.o
        job.restart()
        if job.pending is not None:
            job.timings["compensation"] = round(job.pending.compensation_s, 4)
        timings = job.timings
        shared = {stage: t for stage, t in stats.timings.items()
                  if stage in job.used or stats.counts.get(stage, 0) != job.used_before.get(stage, 0)}
        own = dict(timings)
        timings.clear()
        timings.update({"load": self._load_s, **shared, **own})  # stage order: load, statistics, candidate
        notes = list(inp.notes) + ([NOTES[o.method]] if o.method in NOTES else [])
        report = build_report(inp, job.out, o, job.fmt, job.mats, job.granularity, overwrite, notes, command)
        if o.method == "sft":
            report["sft"] = {"steps": o.steps, "lr": o.lr, "losses": job.losses}

        def finish():
            job.lap("export")
            timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 4)

        return write_output(job.out, overwrite, report, inp, job.mats, job.granularity, job.patches, job.new_a,
                            job.new_b, job.want_lora, o, timings, finish)

    def sft(self, steps: int | list[int], lr: float | None = None, seed: int | None = None):
        """``--method sft``'s trained LoRA after `steps` (sft.sft_snapshots): ``(factors, losses)``; a list of
        step counts trains once and keeps every snapshot (a constant learning rate: the 16-step snapshot of a
        64-step run is the 16-step run), so later writes with those steps train nothing."""
        from hcnr_deploy.sft import sft_snapshots

        lr = self.opts.lr if lr is None else lr
        seed = self.opts.seed if seed is None else seed
        self.open()
        wanted = sorted({steps} if isinstance(steps, int) else set(steps))
        runs = self._sft.setdefault((lr, seed), {})
        missing = [n for n in wanted if n not in runs]
        if missing:
            t0 = time.perf_counter()
            losses: list[float] = []
            inp = self.inputs
            snaps = sft_snapshots(self.model, inp.finetune, inp.enc_hon, inp.enc_task, missing, lr=lr, seed=seed,
                                  device=inp.device, micro_batch=self.opts.batch_size,
                                  progress=self.bar if self.progress else None, losses=losses)
            for n, factors in snaps.items():
                runs[n] = (factors, losses[:n])
            self._sft_s[(lr, seed)] = round(self._sft_s.get((lr, seed), 0.0) + time.perf_counter() - t0, 4)
        return runs[wanted[-1]] if isinstance(steps, int) else {n: runs[n] for n in wanted}

    def _streamed(self, o, chosen, method, want_lora, lap):
        patches, new_a = cand.streamed_stage2(self.model, self.state, self.inputs.finetune, chosen, self.inputs.enc_hon,
                                              self.inputs.enc_task, o, method, self.inputs.device, self.bar,
                                              want_lora, lap, self.move)
        if o.hessian_inputs == "sequential":
            self.state.reset()  # the next candidate starts from the base again
        return patches, new_a

    def _hcnr_select(self, o, mats, granularity) -> list[str]:
        """Eq. 4 (cached), Eqs. 5-7: marks the selected matrices; returns the statistics stages used."""
        stats, finetune = self.stats, self.inputs.finetune
        hon_state, task_state = cand.fisher_states(o.fisher_model)
        s_hon = s_task = None
        used = []
        if o.selection != "random":
            s_hon = stats.fisher("honesty", hon_state, granularity)
            used.append(_stage("fisher", "honesty", hon_state, granularity))
        if o.selection == "hcnr":
            s_task = stats.fisher("task", task_state, granularity)
            used.append(_stage("fisher", "task", task_state, granularity))
        cand.select(mats, s_hon, s_task, finetune, o)
        return used


class _Job:
    """One candidate between ``_prepare`` and ``_finish``: its options, matrices, edits and stage timings."""

    def __init__(self, out, o, fmt, want_lora, mats, granularity, stats):
        self.out, self.o, self.fmt, self.want_lora = out, o, fmt, want_lora
        self.mats, self.granularity = mats, granularity
        self.stats = stats
        self.timings: dict[str, float] = {}
        self.used: list[str] = []
        self.used_before = dict(stats.counts)
        self.pending: Pending | None = None
        self.patches = self.new_a = self.new_b = None
        self.losses = None
        self.clock = [time.perf_counter(), sum(stats.timings.values())]

    def restart(self):
        """Start the clock again (other candidates' work between prepare and finish is not this one's)."""
        self.clock[:] = [time.perf_counter(), sum(self.stats.timings.values())]

    def lap(self, stage: str):
        """Time since the last lap, less the statistics passes that ran meanwhile, added to `stage`."""
        now, spent = time.perf_counter(), sum(self.stats.timings.values())
        self.timings[stage] = round(self.timings.get(stage, 0.0) + now - self.clock[0] - (spent - self.clock[1]), 4)
        self.clock[:] = [now, spent]


def run_repair(base, finetuned, honesty_data, task_data, out, *, overwrite=False, progress=False, console=None,
               command=None, **options) -> dict:
    """Repair `finetuned` (full folder or PEFT LoRA on `base`) and write the result to `out`; return the report.

    Keyword arguments are ``RepairOptions`` fields (``hcnr-deploy repair``'s options: ``--r-iw`` -> ``r_iw``).
    A ``RepairSession`` with one write and no Gram cache (stage 2 streamed, bounded memory).
    Raises ``UserError`` on bad input, leaving nothing at `out`.
    """
    opts = RepairOptions().replace(**options)
    base_dir = resolve_model_dir(base, "--base")
    ft_dir = resolve_model_dir(finetuned, "--finetuned")
    check_out(out, overwrite, ("--base", base_dir), ("--finetuned", ft_dir))  # before any loading
    check_fits(base_dir, ft_dir, opts, [(opts.method, opts.settings())])
    with RepairSession(base, finetuned, honesty_data, task_data, opts, console, progress) as session:
        return session.write(out, overwrite=overwrite, command=command)
