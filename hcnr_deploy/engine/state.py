"""The one in-memory model: switched between base and fine-tune from disk, optionally offloaded block by block.

One copy of the model lives in memory (the base, in the working dtype). It is switched between the
base and fine-tuned states by streaming tensors from disk (for a LoRA: ``W0 + s B A`` on the adapted
modules only), whole or one decoder block at a time, so base and fine-tune are never both held in full.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from eval_harness.errors import UserError
from hcnr_deploy.io.checkpoint import DECODER_LINEAR_RE as DECODER_BLOCK_RE, layer_index
from hcnr_deploy.io.finetune import FineTune


ONE_DEVICE = ("auto", "cpu", "cuda")  # where a whole-model forward on one device runs (probe, guard fit)


def check_one_device(device: str):
    """A command whose forward holds the whole model on one device (probe, guard) takes --device from ONE_DEVICE."""
    if device not in ONE_DEVICE:
        raise UserError(f"--device {device}: this command runs the whole model on one device; pass one of "
                        f"{', '.join(ONE_DEVICE)} (cuda is GPU 0; set CUDA_VISIBLE_DEVICES to use another)")


def first_device(device: str) -> str:
    """The one device of a repair's --device for a whole-model forward: cuda:N[,M...] gives cuda:N; auto, cpu and
    cuda stay (auto: cuda when available)."""
    return device if device in ONE_DEVICE else device.split(",")[0]


def resolve_device_dtype(device: str, dtype: str, config: dict) -> tuple[str, torch.dtype]:
    """``auto`` device: cuda when available; ``auto`` dtype: float32 on CPU, the checkpoint's dtype on GPU."""
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

    def reset(self):
        """Every switchable tensor back to the base, repaired ones included (after a sequential stage 2)."""
        repaired = [n for n, v in self.current.items() if v == "repaired"]
        for n in repaired:
            self.current[n] = "unknown"
        self.set("base")


class BlockOffload:
    """--offload: ``move(layer, True)`` puts one decoder block on its device while it runs, ``move(layer, False)``
    takes it off again. The blocks' host tensors are pinned (CUDA) and copied in asynchronously; while block i
    runs, the next block in the direction of travel (i+1 going up, i-1 coming down) is copied in on a side
    stream. Taking a block off copies back only the tensors written while it was on the device (a state switch
    or a repaired weight; seen by their version counters): the weights the passes only read are dropped, never
    written back. A prefetched copy whose host tensors changed meanwhile is copied again. On the CPU every move is
    a no-op (``active`` False), so the offloaded code path gives the same bytes there; a test sets ``active`` to
    run the copies on the CPU. `device_of(i)` (a placement) names block i's device. (Blocks must not share a
    tensor with themselves twice; llama/mistral/qwen blocks do not.)"""

    def __init__(self, device: str, layers: list, device_of=None):
        self.device = torch.device(device)
        self.layers = layers
        self.device_of = device_of or (lambda i: self.device)
        self.active = self.device.type != "cpu"
        self.copied_in = self.written_back = self.prefetch_hits = 0  # tensors / blocks, for the tests
        self._on: dict[int, tuple[list, list]] = {}  # block -> (its host tensors, device versions after copy-in)
        self._ahead: tuple[int, list, list, object] | None = None  # (block, device copies, host versions, event)
        self._last = -1
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self.device.type == "cuda":
            for layer in layers:
                layer._apply(lambda t: t if t.is_pinned() else t.pin_memory())

    def _tensors(self, layer) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        layer._apply(lambda t: out.append(t) or t)  # the order _apply visits them in
        return out

    def _to_device(self, t: torch.Tensor, device) -> torch.Tensor:
        return t.detach().to(device, non_blocking=True, copy=True)

    def _copy(self, i: int) -> list[torch.Tensor]:
        self.copied_in += len(self._tensors(self.layers[i]))
        return [self._to_device(t, self.device_of(i)) for t in self._tensors(self.layers[i])]

    def _prefetch(self, i: int):
        if not 0 <= i < len(self.layers) or i in self._on:
            self._ahead = None
            return
        host = self._tensors(self.layers[i])
        versions = [t._version for t in host]
        if self._stream is None:
            self._ahead = (i, self._copy(i), versions, None)
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            copies = self._copy(i)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._ahead = (i, copies, versions, event)

    def __call__(self, layer, on: bool):
        if not self.active:
            return
        i = self.layers.index(layer)
        if on:
            params = self._tensors(layer)
            host = [t.detach() for t in params]  # keeps the host storage once the parameters point at the copies
            ahead, self._ahead = self._ahead, None
            if ahead and ahead[0] == i and ahead[2] == [t._version for t in params]:
                copies = ahead[1]
                self.prefetch_hits += 1
                if ahead[3] is not None:
                    torch.cuda.current_stream(self.device).wait_event(ahead[3])
                    for c in copies:
                        c.record_stream(torch.cuda.current_stream(self.device))
            else:
                copies = self._copy(i)
            it = iter(copies)
            layer._apply(lambda t: next(it))
            self._on[i] = (host, [t._version for t in self._tensors(layer)])
            self._prefetch(i + (1 if i >= self._last else -1))
            self._last = i
        else:
            host, versions = self._on.pop(i)
            back = iter(zip(host, versions))

            def restore(t):
                h, v = next(back)
                if t._version != v:  # written while on the device
                    h.copy_(t)
                    self.written_back += 1
                return h

            layer._apply(restore)


def offload_error(base_dir: Path, model_type) -> UserError:
    return UserError(f"--offload needs a llama/mistral/qwen2/qwen3-style model (decoder blocks run one at a time); "
                     f"--base {base_dir} is {model_type!r}: run without --offload.")


def place_outside_blocks(model, layers: list, device):
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


def return_freed_memory():
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
