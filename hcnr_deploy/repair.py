"""The HCNR pipeline: load -> Fisher (Eq. 4) -> select (Eqs. 5-7) -> Hessians -> compensate (Eqs. 9-10) -> export.

One copy of the model lives in memory (the base, in the working dtype). It is switched between the
base and fine-tuned states by streaming tensors from disk (for a LoRA: ``W0 + s B A`` on the adapted
modules only), whole or one decoder block at a time, so base and fine-tune are never both held in
full. The Fisher passes go block by block (a no-grad forward keeps each block's input, the backward
recomputes one block at a time) and reduce per-sample gradients inside per-module hooks. Stage 2
streams the calibration hidden states through one block at a time: that block's selected matrices
get their Hessians, are compensated, and the Hessians are dropped before the next block.

``run_repair(**options)`` is the Python API (the CLI's options as keyword arguments); it returns
the report dict that is also written to ``OUT/report.json``.
"""

from __future__ import annotations

import math
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hcnr_deploy import __version__
from hcnr_deploy.compensation import accumulate_hessians, block_hessians, compensate_columns, compensate_elements
from hcnr_deploy.data import batches, encode, load_jsonl
from hcnr_deploy.errors import UserError
from hcnr_deploy.export import write_checkpoint, write_exact_adapter, write_svd_adapter
from hcnr_deploy.importance import PLAIN_HEAD_MODELS, decoder_blocks, fisher_importance, layer_inputs
from hcnr_deploy.modelio import (DECODER_LINEAR_RE as DECODER_BLOCK_RE, AtomicDir, Checkpoint, FineTune, is_decoder_linear_weight, layer_index,
                                 load_model, load_tokenizer, resolve_model_dir, write_json)
from hcnr_deploy import selection as sel

CHOICES = {
    "granularity": ("column", "element"),
    "selection": ("hcnr", "no-task", "random"),
    "compensation": ("obs", "exact", "none", "task-aware"),
    "fisher_model": ("paired", "base", "finetuned"),
    "hessian_inputs": ("base", "finetuned", "sequential"),
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "format": ("auto", "adapter", "checkpoint"),
}
DEFAULTS = dict(num_samples=128, max_length=512, r_iw=0.5, r_cw=0.4, granularity="column", selection="hcnr",
                compensation="obs", task_weight=1.0, fisher_model="paired", hessian_inputs="base", damp=0.01,
                seed=0, device="auto", dtype="auto", overwrite=False, format="auto", max_rank=64, batch_size=8,
                hessian_memory_gb=8.0, offload=False)
SIMPLIFICATIONS = [
    "--offload keeps the decoder blocks in CPU memory (one model copy in the working dtype there) and moves one "
    "block at a time to the device while it runs (Fisher: each block twice per batch, forward and backward; "
    "Hessians: once per block), synchronously and copied back after each visit (no prefetch overlapping "
    "compute); the embeddings, final norm and LM head stay on the device. Only the architectures streamed "
    "block by block (llama, mistral, qwen2, qwen3) can offload. Without it the device holds one model copy in "
    "the working dtype.",
    "Block-by-block passes (Fisher with block-level recomputation, Hessians streamed one block at a time) cover "
    "the architectures whose logits are lm_head(norm(blocks)) (llama, mistral, qwen2, qwen3); others build the "
    "whole autograd graph per batch and accumulate Hessians in passes over groups of consecutive blocks that "
    "fit --hessian-memory (each pass re-running the blocks before its group).",
    "The restored columns' new values of all selected matrices are held in CPU memory (float32) until the output "
    "is written.",
]


@dataclass
class Matrix:
    """One eligible Linear: its state through the pipeline."""

    name: str  # weight name, e.g. model.layers.3.mlp.down_proj.weight
    shape: tuple
    d_col_sq: torch.Tensor | None = None
    w0_col_sq: torch.Tensor | None = None
    restore: torch.Tensor | None = None  # column indices (column) or bool mask (element)
    displacement: float = 0.0
    selected: bool = False
    compensation_norm: float = 0.0
    retries: int = 0

    @property
    def module(self) -> str:
        return self.name[: -len(".weight")]


def _validate(o: dict):
    for key, choices in CHOICES.items():
        if o[key] not in choices:
            raise UserError(f"--{key.replace('_', '-')} must be one of {', '.join(choices)}, got {o[key]!r}.")
    for key in ("r_iw", "r_cw"):
        v = o[key]
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1):
            raise UserError(f"--{key.replace('_', '-')} must be in (0, 1], got {v}.")
    if o["num_samples"] < 1:
        raise UserError(f"--num-samples must be at least 1, got {o['num_samples']}.")
    if o["batch_size"] < 1:
        raise UserError(f"--batch-size must be at least 1, got {o['batch_size']}.")
    if not (o["damp"] >= 0 and math.isfinite(o["damp"])):
        raise UserError(f"--damp must be >= 0, got {o['damp']}.")
    if not (o["task_weight"] >= 0 and math.isfinite(o["task_weight"])):
        raise UserError(f"--task-weight must be >= 0, got {o['task_weight']}.")
    if not o["hessian_memory_gb"] > 0:
        raise UserError(f"--hessian-memory must be > 0, got {o['hessian_memory_gb']}.")
    if o["max_rank"] < 1:
        raise UserError(f"--max-rank must be at least 1, got {o['max_rank']}.")
    if o["device"] == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu.")


def _resolve_device_dtype(device: str, dtype: str, config: dict) -> tuple[str, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        if device == "cpu":
            return device, torch.float32
        stored = config.get("dtype") or config.get("torch_dtype") or "float32"
        return device, getattr(torch, stored, torch.float32)
    return device, getattr(torch, dtype)


class ModelState:
    """Switches the in-memory model between the base and the fine-tune by streaming tensors from disk."""

    def __init__(self, model, finetune: FineTune, dtype: torch.dtype):
        self.model = model
        self.ft = finetune
        self.dtype = dtype
        self.state = "base"
        self.current: dict[str, str] = {}  # tensors whose state differs from self.state
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        self.targets = {}
        for name in finetune.base.names():
            t = params.get(name, buffers.get(name))
            if t is not None:
                self.targets[name] = t

    def _names(self):
        if self.ft.is_lora:
            return [m + ".weight" for m in self.ft.lora.modules()]
        return sorted(self.targets)

    def names_in(self, layer: int | None) -> list[str]:
        """The switchable tensors of decoder block `layer` (``None``: those outside every block)."""
        return [n for n in self._names() if n in self.targets
                and (layer_index(n) if DECODER_BLOCK_RE.search(n) else None) == layer]

    @torch.no_grad()
    def set(self, state: str, names: list[str] | None = None):
        """Put `names` (default: every switchable tensor) in `state` ("base" or "finetuned")."""
        whole = names is None
        if whole and state == self.state and all(v == "repaired" for v in self.current.values()):
            return  # repaired weights (sequential mode) stay
        names = [n for n in (self._names() if whole else names) if n in self.targets
                 and self.current.get(n, self.state) != state]
        source = self.ft.ckpt if state == "finetuned" and not self.ft.is_lora else self.ft.base
        for name, t in source.iter_tensors(names):
            if state == "finetuned" and self.ft.is_lora:
                t = t.float() + self.ft.delta(name)
            self.targets[name].copy_(t.to(self.targets[name].dtype))
            self.current[name] = state
        if whole:
            self.state = state
            self.current.clear()

    @torch.no_grad()
    def set_weight(self, name: str, w: torch.Tensor):
        dst = self.targets[name]
        dst.copy_(w.to(dst.dtype))
        self.current[name] = "repaired"


class BlockOffload:
    """--offload: ``move(layer, True)`` puts one decoder block on the compute device while it runs,
    ``move(layer, False)`` copies it back into the same CPU tensors (so weights written meanwhile come back,
    and no second host copy appears beside pages the checkpoint was mapped into). On the CPU every move is a
    no-op, so the offloaded code path gives the same bytes there. (Blocks must not share a tensor with
    themselves twice; llama/mistral/qwen blocks do not.)"""

    def __init__(self, device: str, layers: list):
        self.device = torch.device(device)
        self.layers = layers
        self._host: dict[int, list[torch.Tensor]] = {}  # id(block) -> its CPU tensors while it is on the device

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def __call__(self, layer, on: bool):
        if self.device.type == "cpu":
            return
        if on:
            host = self._host.setdefault(id(layer), [])
            layer._apply(lambda t: host.append(t.detach()) or self._to_device(t))  # detach: keeps the CPU storage
        else:
            back = iter(self._host.pop(id(layer)))  # _apply visits the tensors in the same order
            layer._apply(lambda t: next(back).copy_(t))


def _offload_error(base_dir: Path, model_type) -> UserError:
    return UserError(f"--offload needs a llama/mistral/qwen2/qwen3-style model (decoder blocks run one at a time); "
                     f"--base {base_dir} is {model_type!r}: run without --offload.")


def _place_outside_blocks(model, layers: list, device: str):
    """Every parameter and buffer outside the decoder blocks (embeddings, rotary tables, final norm, LM head)
    onto `device`; the blocks stay where they are."""
    inside = {id(layer) for layer in layers}

    def walk(module):
        if id(module) in inside:
            return
        module._apply(lambda t: t.to(device), recurse=False)
        for child in module.children():
            walk(child)

    walk(model)


def _return_freed_memory():
    """glibc: serve allocations over 128 KiB by mmap, so freed tensors go back to the OS at once. (glibc
    otherwise raises that threshold after the first large free and keeps each batch's freed activations
    in the heap: ~350 MB more peak RSS on a 135M model; at 1 MiB the heap still kept ~160 MB of freed
    sub-MiB tensors, e.g. the k/v projections' deltas, fragmented.)"""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass


def _progress(console, enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("samples"), TimeElapsedColumn(), console=console, disable=not enabled,
                    transient=False)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"hcnr_deploy": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def _peak_memory(device: str) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {"peak_memory_bytes": int(rss)}
    if device.startswith("cuda"):
        out["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def _eligible(model, finetune: FineTune) -> list[Matrix]:
    """Decoder-block Linear weights with D != 0, with per-column squared norms of D and W0 (Eq. 6 inputs)."""
    base = finetune.base
    names = [n for n in base.names() if is_decoder_linear_weight(n, base.shape(n))]
    if finetune.is_lora:
        names = [n for n in names if n[: -len(".weight")] in finetune.lora.keys]
    out = []
    for name in names:
        mod = name[: -len(".weight")]
        try:
            linear = model.get_submodule(mod)
        except AttributeError:
            continue
        if not isinstance(linear, torch.nn.Linear):
            continue
        w0 = base.get(name)
        d = finetune.delta(name, w0)
        if d is None:
            continue
        out.append(Matrix(name, tuple(w0.shape), d.double().square().sum(0), w0.double().square().sum(0)))
    return out


def _fisher(model, mats, encoded, o, device, progress, label, move=None):
    modules = {m.name: model.get_submodule(m.module) for m in mats}
    task = progress.add_task(f"Fisher ({label})", total=len(encoded))
    return fisher_importance(model, modules, batches(encoded, o["batch_size"]), len(encoded), o["granularity"],
                             device, advance=lambda n: progress.advance(task, n),
                             lowest_block=min(layer_index(m.name) for m in mats), move=move)


def _hessians(model, mats, encoded, o, device, progress, label, stop_after=None):
    modules = {m.name: model.get_submodule(m.module) for m in mats}
    task = progress.add_task(f"Hessian ({label})", total=len(encoded))
    hooks, tokens = accumulate_hessians(model, modules, batches(encoded, o["batch_size"]), device,
                                        stop_after=stop_after, advance=lambda n: progress.advance(task, n))
    return {m.name: hooks.hessian(m.name) for m in mats}, tokens


def _select(mats: list[Matrix], s_hon, s_task, finetune: FineTune, o: dict):
    """Eqs. 5-7: candidates per matrix (or the ablations), displacement, top R_CW matrices."""
    gen = torch.Generator().manual_seed(o["seed"])
    for m in mats:
        if o["granularity"] == "column":
            if o["selection"] == "random":
                m.restore = sel.random_columns(m.shape[1], o["r_iw"], gen)
            else:
                scores = sel.column_scores(o["selection"], s_hon[m.name], None if s_task is None else s_task[m.name])
                m.restore = sel.candidate_columns(scores, o["r_iw"])
            m.displacement = sel.displacement(m.d_col_sq, m.w0_col_sq, m.restore)
        else:
            if o["selection"] == "random":
                m.restore = sel.random_elements(m.shape, o["r_iw"], gen)
            else:
                scores = sel.column_scores(o["selection"], s_hon[m.name].cpu(),
                                           None if s_task is None else s_task[m.name].cpu())
                m.restore = sel.candidate_elements(scores, o["r_iw"])
            w0 = finetune.base.get(m.name)
            m.displacement = sel.displacement_elements(finetune.delta(m.name, w0), w0, m.restore)
    kept = set(sel.select_matrices({m.name: m.displacement for m in mats}, o["r_cw"]))
    for m in mats:
        m.selected = m.name in kept


def _compensate(m: Matrix, finetune: FineTune, h_hon, n_hon, h_task, n_task, o: dict, want_dense: bool,
                want_lora: bool, device: str, cache: dict | None = None):
    """One selected matrix: E on its restored entries. Returns (patch for the checkpoint, new LoRA A or None)."""
    method, mu, damp = o["compensation"], o["task_weight"], o["damp"]
    kw = dict(damp=damp, n_hon=n_hon, h_task=h_task, n_task=n_task, mu=mu)
    ckw = dict(kw, cache=cache)
    if o["granularity"] == "element":
        d = finetune.delta(m.name).to(device)
        e, m.retries = compensate_elements(method, d, m.restore.to(device), h_hon, **kw)
        m.compensation_norm = float(e.norm())
        return ("elements", m.restore, e.float().cpu()), None
    t_mask = torch.ones(m.shape[1], dtype=torch.bool)
    t_mask[m.restore] = False
    t = torch.nonzero(t_mask).flatten()
    f = m.restore
    if finetune.is_lora:
        a, b = finetune.lora.factors(m.module)
        s = finetune.lora.scaling(m.module)
        e_a, m.retries = compensate_columns(method, a.double().to(device), t.to(device), f.to(device), h_hon, **ckw)
        e_a = e_a.cpu()
        e_f = s * (b.double() @ e_a)
        m.compensation_norm = float(e_f.norm())
        new_a = None
        if want_lora:
            new_a = a.double().clone()
            new_a[:, f] = e_a
        return (("columns", f, e_f.float()) if want_dense else None), new_a
    d = finetune.delta(m.name).to(device)
    e_f, m.retries = compensate_columns(method, d, t.to(device), f.to(device), h_hon, **ckw)
    m.compensation_norm = float(e_f.norm())
    return ("columns", f, e_f.float().cpu()), None  # float32 until written: W0 + E is formed in float64


def _layer_groups(chosen: list[Matrix], budget_bytes: float, compensation: str, sequential: bool):
    """Consecutive decoder blocks whose Hessians (float64, in x in each) fit the memory budget together.

    Each group is one calibration pass that stops after the group's last block; a sequential run
    takes one block per group. Yields (matrices, label suffix).
    """
    layers = sorted({layer_index(m.name) for m in chosen})
    if compensation == "none":
        yield chosen, ""
        return
    per = 2 if compensation == "task-aware" else 1
    cost = {l: sum(per * 8 * m.shape[1] ** 2 for m in chosen if layer_index(m.name) == l) for l in layers}
    groups, current, used = [], [], 0.0
    for l in layers:
        if current and (sequential or used + cost[l] > budget_bytes):
            groups.append(current)
            current, used = [], 0.0
        current.append(l)
        used += cost[l]
    groups.append(current)
    for g in groups:
        span = "" if len(groups) == 1 else (f", layer {g[0]}" if len(g) == 1 else f", layers {g[0]}-{g[-1]}")
        yield [m for m in chosen if layer_index(m.name) in g], span


def _decoder_layer(model, mats: list[Matrix]):
    """The decoder block module holding the deepest of `mats` (a forward pass may stop after it)."""
    last = max(mats, key=lambda m: layer_index(m.name))
    prefix = last.name[: last.name.index(f"layers.{layer_index(last.name)}.")]
    return model.get_submodule(f"{prefix}layers.{layer_index(last.name)}")


def _compensate_group(group, finetune, h_hon, n_hon, h_task, n_task, o, dev, want_lora, patches, new_a, state,
                      sequential):
    cache: dict = {}  # one damped Hessian / Cholesky per shared input (q/k/v, gate/up)
    for m in group:
        patch, a_new = _compensate(m, finetune, h_hon.pop(m.name, None), n_hon, h_task.pop(m.name, None),
                                   n_task, o, not want_lora, want_lora, dev, cache)
        if patch is not None:
            patches[m.name] = patch
        if a_new is not None:
            new_a[m.module] = a_new
        if sequential:  # later blocks see this block repaired
            state.set_weight(m.name, _repaired_weight(m, finetune, patches, new_a))


def _streamed_restore_and_compensate(model, blocks, state: ModelState, finetune: FineTune, chosen: list[Matrix],
                                     enc_hon, enc_task, o: dict, dev: str, bar, want_lora: bool, lap, move=None):
    """Stage 2 streamed block by block: the calibration batches' hidden states go through one decoder block
    at a time (each block runs once per stream), the Hessians of that block's selected matrices are
    accumulated, its matrices compensated and the Hessians dropped before the next block. `move(layer, on)`
    (--offload) holds the block on the device from its first pass to its last."""
    decoder, layers = blocks
    compensation, hessian_inputs = o["compensation"], o["hessian_inputs"]
    sequential = hessian_inputs == "sequential"
    streams = []  # (label, model state, batches)
    if compensation == "task-aware":  # G_t: task inputs of the fine-tuned model
        streams.append(("task", "finetuned", enc_task))
    streams.append(("honesty", "finetuned" if sequential else hessian_inputs, enc_hon))
    by_layer: dict[int, list[Matrix]] = {}
    for m in chosen:
        by_layer.setdefault(layer_index(m.name), []).append(m)
    last = max(by_layer)
    data, tasks = {}, {}
    for label, st, enc in streams:
        state.set(st, state.names_in(None))
        items = []
        for b in batches(enc, o["batch_size"]):
            ids, att = b.input_ids.to(dev), b.attention_mask.to(dev)
            h, kwargs = layer_inputs(decoder, layers, ids, att)
            items.append({"h": h, "kwargs": kwargs, "mask": att})
        data[label] = items
        tasks[label] = bar.add_task(f"Hessian ({label}, {hessian_inputs if label == 'honesty' else st}, "
                                    f"{last + 1} blocks)", total=len(enc) * (last + 1))
    lap("hessian")
    patches: dict = {}
    new_a: dict = {}
    for i in range(last + 1):
        group = by_layer.get(i, [])
        modules = {m.name: model.get_submodule(m.module) for m in group}
        sums, counts = {}, {}
        if move:
            move(layers[i], True)
        for label, st, _ in streams:
            state.set(st, state.names_in(i))
            hooks, counts[label] = block_hessians(layers[i], modules, data[label], i, keep_outputs=not (
                sequential and group), advance=lambda n, t=tasks[label]: bar.advance(t, n))
            sums[label] = {m.name: hooks.hessian(m.name) for m in group}
            del hooks
        lap("hessian")
        if group:
            _compensate_group(group, finetune, sums["honesty"], counts["honesty"], sums.get("task", {}),
                              counts.get("task", 1), o, dev, want_lora, patches, new_a, state, sequential)
            del sums
            lap("compensation")
            if sequential:  # the next block's inputs come from this block repaired
                for label, _, _ in streams:
                    block_hessians(layers[i], {}, data[label], i)
                lap("hessian")
        if move:
            move(layers[i], False)
    return patches, new_a


def _restore_and_compensate(model, state: ModelState, finetune: FineTune, chosen: list[Matrix], enc_hon, enc_task,
                            o: dict, dev: str, bar, want_lora: bool, lap, move=None):
    """Stage 2 for every selected matrix: Hessians (selected matrices only), then the compensation. Streamed
    block by block where the blocks can be driven one at a time; otherwise whole-model passes over groups of
    blocks whose Hessians fit --hessian-memory. Returns (dense patches by weight name, new LoRA A by module)."""
    compensation, hessian_inputs = o["compensation"], o["hessian_inputs"]
    blocks = decoder_blocks(model)
    if blocks is not None and compensation != "none" and chosen:
        return _streamed_restore_and_compensate(model, blocks, state, finetune, chosen, enc_hon, enc_task, o, dev,
                                                bar, want_lora, lap, move)
    patches: dict = {}
    new_a: dict = {}
    sequential = hessian_inputs == "sequential"
    for group, span in _layer_groups(chosen, o["hessian_memory_gb"] * 2**30, compensation, sequential):
        h_hon, n_hon, h_task, n_task = {}, 1, {}, 1
        stop = _decoder_layer(model, group)
        if compensation == "task-aware":  # G_t: task inputs of the fine-tuned model
            state.set("finetuned")
            h_task, n_task = _hessians(model, group, enc_task, o, dev, bar, f"task, finetuned{span}", stop)
        if compensation != "none":
            state.set("finetuned" if sequential else hessian_inputs)
            h_hon, n_hon = _hessians(model, group, enc_hon, o, dev, bar, f"honesty, {hessian_inputs}{span}", stop)
        lap("hessian")
        _compensate_group(group, finetune, h_hon, n_hon, h_task, n_task, o, dev, want_lora, patches, new_a, state,
                          sequential)
        del h_hon, h_task
        lap("compensation")
    return patches, new_a


def run_repair(base, finetuned, honesty_data, task_data, out, *, num_samples=128, max_length=512, r_iw=0.5,
               r_cw=0.4, granularity="column", selection="hcnr", compensation="obs", task_weight=1.0,
               fisher_model="paired", hessian_inputs="base", damp=0.01, seed=0, device="auto", dtype="auto",
               overwrite=False, format="auto", max_rank=64, batch_size=8, hessian_memory_gb=8.0, offload=False,
               progress=False, console=None, command=None) -> dict:
    """Repair `finetuned` (full folder or PEFT LoRA on `base`) and write the result to `out`; return the report.

    Keyword arguments mirror ``hcnr-deploy repair``'s options (``--r-iw`` -> ``r_iw``, ...).
    Raises ``UserError`` on bad input, leaving nothing at `out`.
    """
    o = dict(num_samples=num_samples, max_length=max_length, r_iw=r_iw, r_cw=r_cw, granularity=granularity,
             selection=selection, compensation=compensation, task_weight=task_weight, fisher_model=fisher_model,
             hessian_inputs=hessian_inputs, damp=damp, seed=seed, device=device, dtype=dtype, overwrite=overwrite,
             format=format, max_rank=max_rank, batch_size=batch_size, hessian_memory_gb=hessian_memory_gb,
             offload=bool(offload))
    _validate(o)
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; choose a new folder or pass --overwrite.")
    if console is None:
        from rich.console import Console

        console = Console(stderr=True, quiet=not progress)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    clock = [time.perf_counter()]

    def lap(stage):
        now = time.perf_counter()
        timings[stage] = round(timings.get(stage, 0.0) + now - clock[0], 4)
        clock[0] = now

    torch.manual_seed(seed)
    _return_freed_memory()
    base_dir = resolve_model_dir(base, "--base")
    ft_dir = resolve_model_dir(finetuned, "--finetuned")
    for option, folder in (("--base", base_dir), ("--finetuned", ft_dir)):
        if out == folder or out in folder.parents or folder in out.parents:
            raise UserError(f"--out {out} overlaps {option} {folder}; write the repair to a separate folder.")
    base_ck = Checkpoint(base_dir, "--base")
    finetune = FineTune(ft_dir, base_ck)
    lora_exact = finetune.is_lora and granularity == "column"
    fmt = ("adapter" if lora_exact else "checkpoint") if format == "auto" else format
    hon = load_jsonl(honesty_data, num_samples)
    task_examples = load_jsonl(task_data, num_samples)
    tokenizer = load_tokenizer(ft_dir, base_dir)  # the fine-tune's own tokenizer when it ships one
    notes = []
    for label, examples, path in (("honesty", hon, honesty_data), ("task", task_examples, task_data)):
        if len(examples) < num_samples:
            notes.append(f"{path} has {len(examples)} {label} examples, fewer than --num-samples {num_samples}; "
                         f"all of them were used.")
            console.print(f"[yellow]note[/]: {notes[-1]}")
    enc_hon = encode(tokenizer, hon, max_length)
    enc_task = encode(tokenizer, task_examples, max_length)
    dev, dt = _resolve_device_dtype(device, dtype, base_ck.config)
    if offload and base_ck.config.get("model_type") not in PLAIN_HEAD_MODELS:
        raise _offload_error(base_dir, base_ck.config.get("model_type"))
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = load_model(base_dir, dt, "cpu" if offload else dev)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"tensor {name} of --base {base_dir} contains NaN or Inf values; the checkpoint is "
                            f"corrupt, re-export it before repairing.")
    move = None
    if offload:
        blocks = decoder_blocks(model)
        if blocks is None:
            raise _offload_error(base_dir, base_ck.config.get("model_type"))
        _place_outside_blocks(model, blocks[1], dev)
        move = BlockOffload(dev, blocks[1])
    state = ModelState(model, finetune, dt)
    mats = _eligible(model, finetune)
    if not mats:
        raise UserError(f"--finetuned {ft_dir} does not differ from --base {base_dir} in any decoder Linear; "
                        f"there is nothing to repair.")
    lap("load")

    with _progress(console, progress) as bar:
        # Eq. 4: Fisher importance (s_hon on the base, s_task on the fine-tune by default).
        s_hon = s_task = None
        hon_state = {"paired": "base", "base": "base", "finetuned": "finetuned"}[fisher_model]
        task_state = {"paired": "finetuned", "base": "base", "finetuned": "finetuned"}[fisher_model]
        if selection != "random":
            state.set(hon_state)
            s_hon = _fisher(model, mats, enc_hon, o, dev, bar, f"honesty, {hon_state}", move)
            lap("fisher_honesty")
        if selection == "hcnr":
            state.set(task_state)
            s_task = _fisher(model, mats, enc_task, o, dev, bar, f"task, {task_state}", move)
            lap("fisher_task")

        # Eqs. 5-7: candidates, displacement, kept matrices.
        _select(mats, s_hon, s_task, finetune, o)
        chosen = [m for m in mats if m.selected]
        lap("selection")

        want_lora = lora_exact and fmt == "adapter"
        patches, new_a = _restore_and_compensate(model, state, finetune, chosen, enc_hon, enc_task, o, dev, bar,
                                                 want_lora, lap, move)
    del model, state, move
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()

    restored = sum(_restored_count(m, granularity) for m in chosen)
    eligible_weights = sum(m.shape[0] * m.shape[1] for m in mats)
    base_ref = str(base_dir) if Path(base).expanduser().exists() else str(base)
    report = {
        "hcnr_deploy_version": __version__,
        "base": str(base_dir),
        "finetuned": str(ft_dir),
        "finetune_kind": "lora" if finetune.is_lora else "full",
        "output": str(out),
        "format": fmt,
        "edited_fraction": restored / eligible_weights,
        "restored_weights": restored,
        "eligible_weights": eligible_weights,
        "eligible_matrices": len(mats),
        "selected_matrices": len(chosen),
        "num_samples": {"honesty": len(enc_hon), "task": len(enc_task)},
        "tokens": {"honesty": sum(len(i) for i, _ in enc_hon), "task": sum(len(i) for i, _ in enc_task)},
        "settings": {**o, "base": str(base), "finetuned": str(finetuned), "honesty_data": str(honesty_data),
                     "task_data": str(task_data), "out": str(out), "resolved_device": dev,
                     "resolved_dtype": str(dt).replace("torch.", ""),
                     "command": command or equivalent_command(base, finetuned, honesty_data, task_data, out, o)},
        "versions": _versions(),
        "notes": notes,
        "simplifications": SIMPLIFICATIONS,
    }
    with AtomicDir(out, overwrite) as tmp:
        if fmt == "checkpoint":
            write_checkpoint(tmp, finetune, patches)
        elif want_lora:
            write_exact_adapter(tmp, finetune, new_a, base_ref)
        else:
            eligible = [m.name for m in mats]
            report["svd"] = write_svd_adapter(tmp, finetune, patches, max_rank, base_ref, eligible, seed)
            report["svd_relative_error"] = report["svd"]["relative_error"]
        lap("export")
        timings["total"] = round(time.perf_counter() - t_start, 4)
        report["timings_s"] = timings
        report.update(_peak_memory(dev))
        report["matrices"] = [_matrix_entry(m, granularity) for m in mats]
        write_json(tmp / "report.json", report)
    return report


def equivalent_command(base, finetuned, honesty_data, task_data, out, options: dict) -> str:
    """The `hcnr-deploy repair` command line, every option spelled out, that reproduces this run."""
    import shlex

    args = ["hcnr-deploy", "repair", "--base", str(base), "--finetuned", str(finetuned), "--honesty-data",
            str(honesty_data), "--task-data", str(task_data), "--out", str(out)]
    for key, value in options.items():
        flag = "--" + key.replace("_gb", "").replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        else:
            args += [flag, str(value)]
    return shlex.join(args)


def _repaired_weight(m: Matrix, finetune: FineTune, patches: dict, new_a: dict) -> torch.Tensor:
    """The repaired dense weight of one matrix (for the sequential Hessian mode)."""
    from hcnr_deploy.export import patched_weight

    w0 = finetune.base.get(m.name)
    ws = finetune.weight(m.name)
    if m.name in patches:
        return patched_weight(ws, w0, patches[m.name])
    a, b = finetune.lora.factors(m.module)
    return w0.float() + finetune.lora.scaling(m.module) * (b.float() @ new_a[m.module].float())


def _restored_count(m: Matrix, granularity: str) -> int:
    if granularity == "column":
        return m.shape[0] * len(m.restore)
    return int(m.restore.sum())


def _matrix_entry(m: Matrix, granularity: str) -> dict:
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

