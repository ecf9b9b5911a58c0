"""Calibration statistics: Fisher scores (Eq. 4) and Gram / Hessian matrices of module inputs.

The passes themselves live in streaming.py (block-by-block Fisher backward, per-block Hessian
accumulation, with the hooks of hooks.py); this module decides what is computed on
which model state. ``Statistics`` computes the Fisher scores ``s[name]`` of every eligible matrix lazily,
per (data set, model state, granularity), and keeps them for every later candidate (``4 in`` bytes per
matrix, or ``4 out in`` for element granularity).

Gram sums ``H = sum over tokens x x^T`` (float32, in x in) are never held in memory for the whole model:
``stream_block_grams`` runs the calibration hidden states through one decoder block at a time and hands
each block's Grams to the caller (stage2.py: every candidate's edit of that block) before the next block
runs, or reads them back from a ``GramStore`` on disk where they rode on a Fisher pass of the same data and
model state (engine/passes.py; on the CPU). Matrices fed the same input (q/k/v, gate/up) share one tensor: a
llama block's Grams take ``4 (3 h^2 + I^2)`` bytes per stream (1 GB at Llama-3.1-8B's width).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from hcnr_deploy.data import batches
from hcnr_deploy.io.atomic import save_tensors_atomic
from hcnr_deploy.io.checkpoint import is_decoder_linear_weight, layer_index
from hcnr_deploy.io.finetune import FineTune
from hcnr_deploy.engine.streaming import (accumulate_hessians, block_hessians, decoder_blocks, fisher_importance,
                                          layer_inputs)

# the model state each data set's statistics come from by default (DESIGN.md section 2)
DEFAULT_STATE = {"honesty": "base", "task": "finetuned"}


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


def eligible(model, finetune: FineTune) -> list[Matrix]:
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


def stage_name(kind: str, dataset: str, state: str, granularity: str = "column") -> str:
    """Timing key of one statistics pass: ``fisher_honesty``, ``gram_task``, ``fisher_task_base_element``..."""
    name = f"{kind}_{dataset}"
    if state != DEFAULT_STATE[dataset]:
        name += f"_{state}"
    return name + ("_element" if granularity == "element" else "")


def fisher_pass(model, mats, encoded, granularity, batch_size, device, progress, label, move=None):
    """Eq. 4 for every matrix in `mats` on the model's current state."""
    modules = {m.name: model.get_submodule(m.module) for m in mats}
    task = progress.add_task(f"Fisher ({label})", total=len(encoded))
    return fisher_importance(model, modules, batches(encoded, batch_size), len(encoded), granularity,
                             device, advance=lambda n: progress.advance(task, n),
                             lowest_block=min(layer_index(m.name) for m in mats), move=move)


def whole_model_grams(model, mats, encoded, batch_size, device, progress, label, stop_after=None):
    """Grams of `mats`' inputs from whole-model forward passes (architectures not driven block by block)."""
    modules = {m.name: model.get_submodule(m.module) for m in mats}
    task = progress.add_task(f"Hessian ({label})", total=len(encoded))
    hooks, tokens = accumulate_hessians(model, modules, batches(encoded, batch_size), device,
                                        stop_after=stop_after, advance=lambda n: progress.advance(task, n))
    return {m.name: hooks.hessian(m.name) for m in mats}, tokens


def deepest_block(model, mats: list[Matrix]):
    """The decoder block module holding the deepest of `mats` (a forward pass may stop after it)."""
    last = max(mats, key=lambda m: layer_index(m.name))
    prefix = last.name[: last.name.index(f"layers.{layer_index(last.name)}.")]
    return model.get_submodule(f"{prefix}layers.{layer_index(last.name)}")


def stream_block_grams(model, blocks, state, mats: list[Matrix], streams: list[tuple[str, str, list]],
                       batch_size: int, device: str, bar, lap, move=None, sequential: bool = False,
                       label_of=None, stored=None):
    """Generator over decoder blocks 0..deepest of `mats`: yields ``(i, group, sums, counts)`` with `group`
    the matrices of block i, ``sums[label][name]`` their Gram sums and ``counts[label]`` the token count per
    stream. `streams` are ``(label, model state, encoded samples)``; each block runs once per stream.
    `sequential`: after the caller has written block i's repaired weights (between two ``next``), the
    block re-runs so the next block's inputs come from it repaired. `move(layer, on)` (--offload) holds
    the block on the device from its first pass to its last. `stored` (label -> engine.passes.GramStore):
    streams whose Grams the Fisher pass already computed; they are read back, not run again."""
    decoder, layers = blocks
    stored = stored or {}
    by_layer: dict[int, list[Matrix]] = {}
    for m in mats:
        by_layer.setdefault(layer_index(m.name), []).append(m)
    last = max(by_layer)
    data, tasks = {}, {}
    live = [s for s in streams if s[0] not in stored]
    for label, st, enc in live:
        state.set(st, state.names_in(None))
        items = []
        for b in batches(enc, batch_size):
            ids, att = b.input_ids.to(device), b.attention_mask.to(device)
            h, kwargs = layer_inputs(decoder, layers, ids, att)
            items.append({"h": h, "kwargs": kwargs, "mask": att})
        data[label] = items
        text = label_of(label, st) if label_of else f"{label}, {st}"
        tasks[label] = bar.add_task(f"Hessian ({text}, {last + 1} blocks)", total=len(enc) * (last + 1))
    lap("hessian")
    for i in range(last + 1):
        group = by_layer.get(i, [])
        modules = {m.name: model.get_submodule(m.module) for m in group}
        sums, counts = {}, {}
        if move and live:
            move(layers[i], True)
        for label, st, _ in streams:
            if label in stored:
                sums[label], counts[label] = stored[label].get(i, [m.name for m in group]), stored[label].tokens
                continue
            state.set(st, state.names_in(i))
            hooks, counts[label] = block_hessians(layers[i], modules, data[label], i, keep_outputs=not (
                sequential and group), advance=lambda n, t=tasks[label]: bar.advance(t, n))
            sums[label] = {m.name: hooks.hessian(m.name) for m in group}
            del hooks
        lap("hessian")
        yield i, group, sums, counts
        if sequential and group:  # the next block's inputs come from this block repaired
            for label, _, _ in live:
                block_hessians(layers[i], {}, data[label], i)
            lap("hessian")
        if move and live:
            move(layers[i], False)


class Statistics:
    """Fisher scores of every eligible matrix, each computed at most once (see the module doc).

    ``want_grams(streams)``: the (data set, model state) pairs whose Grams stage 2 will need; on the CPU
    (``fuse_pays``) a Fisher pass on one of them computes every eligible matrix's Grams on its forward
    (engine/passes.py; with --offload that pass is block-major too, without Grams) into ``grams[(data
    set, state)]`` (a GramStore on disk, ``gram_bytes`` in all), which stage 2 reads instead of a second
    forward. ``timings`` gets one entry per pass (``stage_name``); ``counts`` how often each ran (1 at most).

    ``store`` (a folder, e.g. a sweep's OUT/statistics): Fisher scores are read from it when there and written to
    it when computed (``fisher-DATASET-STATE-GRANULARITY.safetensors``), so later sessions on the same model, data
    and options (a sweep building its candidates one at a time, a resumed sweep with a larger grid) skip the
    Fisher passes; their Grams then come from stage 2's own forward, equal to the fused ones bit for bit."""

    def __init__(self, model, state, mats: list[Matrix], encoded: dict[str, list], batch_size: int, device: str,
                 bar, move=None, device_of=None, store=None):
        self.model, self.state, self.mats = model, state, mats
        self.encoded = encoded  # {"honesty": [...], "task": [...]}
        self.batch_size, self.device, self.bar, self.move = batch_size, device, bar, move
        self._fisher: dict[tuple, dict] = {}
        self._want: set[tuple[str, str]] = set()
        self.device_of = device_of  # block index -> device, under a placement over several GPUs
        self.grams: dict[tuple[str, str], "GramStore"] = {}  # noqa: F821 (engine.passes)
        self.timings: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.store = store

    def _timed(self, stage: str, compute):
        t0 = time.perf_counter()
        out = compute()
        self.record(stage, time.perf_counter() - t0)
        return out

    def fisher(self, dataset: str, state: str, granularity: str = "column") -> dict[str, torch.Tensor]:
        """Eq. 4 scores on `dataset` with the model in `state` (computed on first call)."""
        key = (dataset, state, granularity)
        stored = self.store and Path(self.store) / f"fisher-{dataset}-{state}-{granularity}.safetensors"
        if key not in self._fisher and stored and stored.is_file():
            t0 = time.perf_counter()
            self._fisher[key] = load_file(str(stored))
            self.timings[stage_name("fisher", dataset, state, granularity) + "_read"] = round(
                time.perf_counter() - t0, 4)
        if key not in self._fisher:
            def compute():
                from hcnr_deploy.engine.passes import fuse_pays  # engine.passes imports repair

                self.state.set(state)
                blocks = decoder_blocks(self.model)
                fuse = (dataset, state) in self._want and (dataset, state) not in self.grams and fuse_pays(
                    self.device)
                if blocks is not None and (fuse or self.move is not None):
                    return self._block_major(blocks, dataset, state, granularity, fuse)
                return fisher_pass(self.model, self.mats, self.encoded[dataset], granularity, self.batch_size,
                                   self.device, self.bar, f"{dataset}, {state}", self.move)
            self._fisher[key] = self._timed(stage_name("fisher", dataset, state, granularity), compute)
            if stored:
                save_tensors_atomic(self._fisher[key], stored)
        return self._fisher[key]

    def want_grams(self, streams):
        """Stage 2 will need the Grams of these (data set, model state) pairs (fused into their Fisher pass)."""
        self._want |= set(streams)

    def _block_major(self, blocks, dataset: str, state: str, granularity: str, fuse: bool):
        """The Fisher pass block-major (engine/passes.py), with the Grams on its forward when `fuse`."""
        from hcnr_deploy.engine.passes import GramStore, fisher_with_grams  # engine.passes imports repair

        enc = self.encoded[dataset]
        store = GramStore(f"{dataset}/{state}") if fuse else None
        modules = {m.name: self.model.get_submodule(m.module) for m in self.mats}
        by_block: dict[int, dict] = {}
        for m in self.mats:
            by_block.setdefault(layer_index(m.name), {})[m.name] = modules[m.name]
        task = self.bar.add_task(f"Fisher{' + Hessian' if fuse else ''} ({dataset}, {state})", total=len(enc))
        try:
            s = fisher_with_grams(self.model, blocks, modules, by_block, batches(enc, self.batch_size), len(enc),
                                  granularity, self.device, store, min(by_block), self.move,
                                  park="cpu" if self.move else None, advance=lambda n: self.bar.advance(task, n),
                                  device_of=self.device_of)
        except BaseException:
            if store:
                store.close()
            raise
        if store:
            self.grams[(dataset, state)] = store
        return s

    @property
    def gram_bytes(self) -> int:
        """Bytes of Grams kept on disk for stage 2 (and any later candidate of the session)."""
        return sum(g.nbytes for g in self.grams.values())

    def close(self):
        """Remove the Grams kept on disk."""
        for g in self.grams.values():
            g.close()
        self.grams.clear()

    def record(self, stage: str, seconds: float):
        """One more pass of `stage` (e.g. ``hessian``, the shared block-streamed stage 2) that took `seconds`."""
        self.timings[stage] = round(seconds, 4)
        self.counts[stage] = self.counts.get(stage, 0) + 1
