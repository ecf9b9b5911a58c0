"""Stage 2 of any number of candidates in one block-streamed pass (DESIGN.md sections 5b and 6).

Per decoder block, the Gram sums every pending candidate needs (one per (data set, model state) stream,
float32, ``4 in^2`` bytes per distinct input) are computed once, every candidate's edit of that block is
derived from them (``candidates.compensate_group``, per matrix, so any per-matrix method slots in), and the
block's Grams are freed before the next block runs. What stays is each candidate's edits so far: new LoRA
factors (``r x in`` per matrix) for an exact adapter, or, for a checkpoint, the restored entries' values,
spilled to disk as they are made (``PatchStore``) and read back one matrix at a time when the checkpoint
is written. Peak memory: the model, one block's Grams and their float64 solve, whatever the depth and the
number of candidates.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from hcnr_deploy.io.checkpoint import layer_index
from hcnr_deploy.options import RepairOptions
from hcnr_deploy.repair.candidates import compensate_group
from hcnr_deploy.engine.statistics import Matrix, stream_block_grams


class PatchStore(MutableMapping):
    """``patches`` (weight name -> ``("columns", F, E_F)`` / ``("elements", mask, E)`` / ``("scale", a)``) kept
    in a folder instead of memory: one safetensors file per matrix, written when set, read when asked for. The
    tensors come back bit-identical. The folder is a hidden ``.NAME.tmp-patches-*`` beside the output (a sweep
    removes such leftovers of a killed run); ``close()`` removes it."""

    def __init__(self, beside: Path):
        beside.parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{beside.name}.tmp-patches-", dir=beside.parent))
        self._files: dict[str, Path] = {}
        self._small: dict[str, tuple] = {}  # ("scale", alpha): nothing to spill

    def __setitem__(self, name, patch):
        if patch[0] == "scale":
            self._small[name] = patch
            return
        kind, where, e = patch
        path = self.folder / f"{len(self._files)}.safetensors"
        save_file({"where": where.contiguous(), "e": e.contiguous()}, str(path), metadata={"kind": kind,
                                                                                         "name": json.dumps(name)})
        self._files[name] = path

    def __getitem__(self, name):
        if name in self._small:
            return self._small[name]
        path = self._files[name]
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            kind = f.metadata()["kind"]
        t = load_file(str(path))
        return kind, t["where"], t["e"]

    def __delitem__(self, name):
        self._small.pop(name, None)
        path = self._files.pop(name, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def __iter__(self):
        return iter([*self._files, *self._small])

    def __len__(self):
        return len(self._files) + len(self._small)

    def close(self):
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Pending:
    """One candidate waiting for its stage 2: its selected matrices, the edit to derive (a ``--compensation``
    or ``regmean``), its options, and where its edits go."""

    chosen: list[Matrix]
    method: str
    opts: RepairOptions
    want_lora: bool
    patches: MutableMapping
    new_a: dict
    compensation_s: float = 0.0
    by_layer: dict = field(default_factory=dict)

    def streams(self) -> list[tuple[str, str]]:
        return gram_streams(self.method, self.opts.hessian_inputs)


def gram_streams(method: str, hessian_inputs: str) -> list[tuple[str, str]]:
    """(data set, model state) of the Grams a candidate's stage 2 needs (`method`: a ``--compensation`` or
    ``regmean``): the honesty inputs in ``--hessian-inputs`` state, and for task-aware / regmean the task
    inputs of the fine-tune."""
    out = [("task", "finetuned")] if method in ("task-aware", "regmean") else []
    return out + ([("honesty", hessian_inputs)] if method != "none" else [])


def shared_streams(o: RepairOptions) -> list[tuple[str, str]]:
    """The Gram streams candidate `o` takes from the shared pass (none for the methods without Grams and for
    ``--hessian-inputs sequential``, whose Grams depend on the candidate)."""
    if o.method not in ("hcnr", "regmean") or o.hessian_inputs == "sequential":
        return []
    return gram_streams(o.compensation if o.method == "hcnr" else "regmean", o.hessian_inputs)


def stream_label(dataset: str, state: str) -> str:
    return f"{dataset}/{state}"


def shared_stage2(model, blocks, state, finetune, pending: list[Pending], encoded: dict[str, list], batch_size: int,
                  device: str, bar, move=None, stored=None, device_of=None) -> float:
    """Every pending candidate's stage 2 from one block-streamed pass (module doc): the Grams of the union of
    the candidates' selected matrices, per stream they need, one block at a time. Fills each candidate's
    ``patches`` / ``new_a`` and ``compensation_s``; returns the seconds of the statistics themselves.
    `stored`: ``{(data set, state): GramStore}`` from the Fisher passes (read back, not recomputed).
    `device_of(i)`: block i's device under a placement (its edits are solved there)."""
    streams: list[tuple[str, str]] = []
    union: dict[str, Matrix] = {}
    for p in pending:
        streams += [s for s in p.streams() if s not in streams]
        for m in p.chosen:
            union.setdefault(m.name, m)
            p.by_layer.setdefault(layer_index(m.name), []).append(m)
    if not union:
        return 0.0
    t0 = time.perf_counter()
    spec = [(stream_label(ds, st), st, encoded[ds]) for ds, st in streams]
    kept = {stream_label(ds, st): g for (ds, st), g in (stored or {}).items()}
    for i, _, sums, counts in stream_block_grams(model, blocks, state, list(union.values()), spec, batch_size, device,
                                                 bar, lambda stage: None, move,
                                                 label_of=lambda label, st: label.replace("/", ", "), stored=kept):
        for p in pending:
            group = p.by_layer.get(i)
            if not group:
                continue
            t1 = time.perf_counter()
            hon, task = stream_label("honesty", p.opts.hessian_inputs), stream_label("task", "finetuned")
            compensate_group(group, finetune, sums.get(hon, {}), counts.get(hon, 1), sums.get(task, {}),
                             counts.get(task, 1), p.opts, p.method, device_of(i) if device_of else device,
                             p.want_lora, p.patches, p.new_a)
            p.compensation_s += time.perf_counter() - t1
        sums.clear()
    return time.perf_counter() - t0 - sum(p.compensation_s for p in pending)
