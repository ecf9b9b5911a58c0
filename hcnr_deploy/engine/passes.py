"""One forward pass per (model state, data set): the Fisher pass (Eq. 4) with the Gram sums riding on its forward.

``fisher_with_grams`` runs the calibration samples through the decoder one block at a time for every batch
(block-major): block i's Gram sums ``H = sum over tokens x x^T`` of its eligible matrices' inputs are complete
once every batch has passed it, and go to a ``GramStore`` before block i+1 runs; the backward then
recomputes one block at a time from the top down, for every batch, with the Fisher hooks on. Stage 2
(stage2.py) reads each block's Grams back instead of running that forward again.

What it holds: the block-boundary hidden states of every batch (``N T h`` per block from the lowest eligible
block up, on `park`) instead of one batch's, and each block's Grams until they are written. The Grams
(``4 (3 h^2 + I^2)`` bytes per llama block, every eligible matrix: the selection is not known yet) go to disk,
so host memory stays one block's; the products and sums are the separate pass's, in the same order, so
the Grams and the Fisher scores are bit-identical to the separate passes'.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hcnr_deploy.engine.families import stream_plan
from hcnr_deploy.engine.hooks import FisherHooks, HessianHooks
from hcnr_deploy.engine.streaming import head_gradient, layer_inputs


def fuse_pays(device) -> bool:
    """Whether the Grams should ride on the Fisher pass on `device`: on the CPU, where one block's forward over the
    calibration tokens costs more than writing and reading back its Grams (``8 (3 h^2 + I^2)`` bytes of disk
    traffic per block and stream). On a GPU the forward is cheaper than that disk traffic (Llama-3.1-8B, 65k
    tokens: a ~3 s forward against ~31 GB written and read per stream), so stage 2 runs its own forward there."""
    return torch.device(device).type == "cpu"


class GramStore:
    """One stream's Gram sums, one safetensors file per block (distinct inputs once; q/k/v and gate/up share):
    ``put(i, hooks)`` writes block i's, ``get(i, names)`` reads them back bit-identical, shared tensors shared
    again. ``tokens``: the stream's token count. ``nbytes``: what is on disk. ``close()`` removes the folder
    (a temporary folder under TMPDIR)."""

    def __init__(self, label: str):
        self.folder = Path(tempfile.mkdtemp(prefix=f"hcnr-grams-{label.replace('/', '-')}-"))
        self.tokens = 0
        self.nbytes = 0
        self._alias: dict[int, dict[str, str]] = {}

    def _path(self, i: int) -> Path:
        return self.folder / f"block{i}.safetensors"

    def put(self, i: int, hooks: HessianHooks):
        """Block i's Grams from the hooks that accumulated them."""
        save_file({k: v.contiguous() for k, v in hooks.sums.items()}, str(self._path(i)))
        self._alias[i] = dict(hooks.alias)
        self.nbytes += sum(v.numel() * v.element_size() for v in hooks.sums.values())

    def get(self, i: int, names: list[str]) -> dict[str, torch.Tensor]:
        """``{name: Gram}`` of `names` (weight names of block i's matrices)."""
        if not names:
            return {}
        sums = load_file(str(self._path(i)))
        alias = self._alias[i]
        return {n: sums[alias.get(n, n)] for n in names}

    def close(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def _out(out):
    return out[0] if isinstance(out, tuple) else out


def fisher_with_grams(model, blocks, modules: dict[str, torch.nn.Module], gram_modules: dict[int, dict], batches,
                      num_samples: int, granularity: str, device: str, store: GramStore | None, lowest: int = 0,
                      move=None, park=None, advance=None, device_of=None) -> dict[str, torch.Tensor]:
    """Eq. 4, ``s[k] = mean_n sum_o (dL_n/dW[o,k])^2`` for `modules` (weight name -> Linear), and the Gram sums
    ``H = sum over tokens x x^T`` of `gram_modules` (block index -> {weight name: Linear}) into `store`, from one
    forward (module doc); without a `store`, the Fisher pass alone, block-major (with --offload: each block
    copied in twice per pass instead of twice per batch). `park`: where the boundary states wait (default: the
    compute device; ``cpu`` with --offload). `move(layer, on)` holds block i on the device for its forward and
    again for its backward; `device_of(i)`: block i's device under a placement (parked states go back there)."""
    decoder, layers = blocks
    items = []
    for b in batches:
        ids, att = b.input_ids.to(device), b.attention_mask.to(device)
        h, kwargs = layer_inputs(decoder, layers, ids, att)
        items.append({"ids": ids, "mask": att, "loss": b.loss_mask.to(device), "kw": kwargs, "h": h,
                      "saved": [None] * len(layers)})
    def keep(t):  # a boundary state parked in pinned host memory, copied asynchronously
        if not park:
            return t
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda).copy_(t, non_blocking=t.is_cuda)

    with torch.no_grad():
        for i, layer in enumerate(layers):
            if move:
                move(layer, True)
            with HessianHooks(gram_modules.get(i, {}) if store else {}) as hooks:
                for it in items:
                    hooks.token_mask = it["mask"]
                    hooks._seen.clear()
                    if i >= lowest:
                        it["saved"][i] = keep(it["h"])
                    it["h"] = _out(layer(it["h"], **it["kw"][i]))
                hooks._seen.clear()
            if store and i in gram_modules:
                store.put(i, hooks)
            del hooks
            if move:
                move(layer, False)
    if store:
        store.tokens = sum(int(it["mask"].sum()) for it in items)
    epilogue = stream_plan(model).epilogue
    for it in items:
        it["g"] = head_gradient(model, decoder, it.pop("h"), it["ids"], it["loss"], epilogue)
    with FisherHooks(model, modules, granularity, embeddings=False) as fh:
        for i in range(len(layers) - 1, lowest - 1, -1):
            if move:
                move(layers[i], True)
            for it in items:
                x = it["saved"][i]
                x = (x.to(device_of(i) if device_of else device) if park else x).detach().requires_grad_(True)
                it["saved"][i] = None
                with torch.enable_grad():
                    torch.autograd.backward(_out(layers[i](x, **it["kw"][i])), it["g"])
                it["g"] = x.grad
            if move:
                move(layers[i], False)
    if advance is not None:
        advance(num_samples)
    return {name: (s / num_samples).float().cpu() for name, s in fh.sums.items()}
