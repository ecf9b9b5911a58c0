"""Where each decoder block runs: a placement over every visible GPU from config.json and the free memory.

``parse_devices`` reads ``--device`` (``auto``: every visible GPU, else the CPU; ``cpu``; ``cuda``: GPU 0;
``cuda:0,1,2,3`` or ``cuda:2``: those). ``place_blocks`` is a pure function of the block count, the bytes of
one block, the bytes every device needs besides its blocks and the free bytes per device: contiguous runs of
blocks (a hidden state crosses to the next device once per run), sized in proportion to what each device
has free after its fixed share, the embeddings on the first device and the final norm and head on the last.
With ``--offload`` the blocks live in host memory and visit their device one at a time, so a device needs room
for two blocks (the one running and the next being copied in). ``Placement.describe`` is what a run prints.
"""

from __future__ import annotations

from dataclasses import dataclass

from eval_harness.errors import UserError

GIB = 2**30


@dataclass(frozen=True)
class Placement:
    """``devices[blocks[i]]`` runs decoder block i (its statistics and edits are made there)."""

    devices: tuple[str, ...]
    blocks: tuple[int, ...]
    offload: bool = False

    def device_of(self, block: int) -> str:
        return self.devices[self.blocks[block]]

    @property
    def first(self) -> str:
        """The embeddings' device (block 0's)."""
        return self.devices[self.blocks[0]] if self.blocks else self.devices[0]

    @property
    def last(self) -> str:
        """The final norm's and the LM head's device (the last block's)."""
        return self.devices[self.blocks[-1]] if self.blocks else self.devices[0]

    def runs(self) -> list[tuple[str, int, int]]:
        """``(device, first block, last block)`` per contiguous run."""
        out: list[tuple[str, int, int]] = []
        for i, d in enumerate(self.blocks):
            if i and self.blocks[i - 1] == d:
                out[-1] = (out[-1][0], out[-1][1], i)
            else:
                out.append((self.devices[d], i, i))
        return out

    def describe(self) -> str:
        """One line: which blocks run where (printed by a run and by --plan)."""
        where = ", ".join(f"{d}: blocks {a}-{b}" if a != b else f"{d}: block {a}" for d, a, b in self.runs())
        return f"placement ({'offload: blocks in pinned host memory, ' if self.offload else ''}{where})"


def parse_devices(spec: str, visible: int) -> list[str]:
    """``--device`` as a list of devices, `visible` the number of CUDA devices (``UserError`` when it names one
    that is not there or does not parse)."""
    spec = spec.strip()
    if spec == "auto":
        return [f"cuda:{i}" for i in range(visible)] or ["cpu"]
    if spec == "cpu":
        return ["cpu"]
    if not spec.startswith("cuda"):
        raise UserError(f"--device {spec}: expected auto, cpu, cuda or cuda:N[,M...] (e.g. cuda:0,1,2,3).")
    try:
        ids = [0] if spec == "cuda" else [int(x) for x in spec[len("cuda:"):].split(",")]
    except ValueError:
        raise UserError(f"--device {spec}: expected GPU numbers after cuda:, e.g. cuda:0,1,2,3.") from None
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise UserError(f"--device {spec}: each GPU once, numbers from 0.")
    if max(ids) >= visible:
        raise UserError(f"--device {spec}: this machine has {visible} visible GPU(s) (cuda:0 to cuda:{visible - 1})"
                        if visible else f"--device {spec}: no CUDA device is available; use --device cpu.")
    return [f"cuda:{i}" for i in ids]


def split_counts(n_blocks: int, room: list[float]) -> list[int]:
    """Blocks per device in proportion to `room` (largest remainders; ties to the earlier device)."""
    total = sum(room)
    if total <= 0:
        return [n_blocks] + [0] * (len(room) - 1)
    exact = [n_blocks * r / total for r in room]
    counts = [int(x) for x in exact]
    order = sorted(range(len(room)), key=lambda d: (-(exact[d] - counts[d]), d))
    for d in order[: n_blocks - sum(counts)]:
        counts[d] += 1
    return counts


def place_blocks(n_blocks: int, block_bytes: int, devices: list[str], free: list[int] | None, fixed: list[int],
                 offload: bool = False) -> Placement:
    """The placement of `n_blocks` blocks of `block_bytes` over `devices` (module doc). `free`: free bytes per
    device (None: unknown, an even split); `fixed`: bytes each device needs besides its blocks (the plan's
    activations and statistics, the embeddings on the first, the head on the last). ``UserError`` when the
    blocks do not fit, naming what would make them fit."""
    k = len(devices)
    if k == 1 or devices == ["cpu"]:
        return Placement(tuple(devices[:1]), (0,) * n_blocks, offload)
    if offload:  # one block at a time per device: an even split keeps every device busy
        counts = split_counts(n_blocks, [1.0] * k)
    else:
        room = [1.0] * k if free is None else [max(0.0, f - x) for f, x in zip(free, fixed)]
        counts = split_counts(n_blocks, room)
        if free is not None:
            for d, (c, r) in enumerate(zip(counts, room)):
                if c * block_bytes > r:
                    need = (n_blocks * block_bytes + sum(fixed) - sum(free)) / GIB
                    raise UserError(f"{n_blocks} blocks of {block_bytes / GIB:.2f} GiB do not fit {', '.join(devices)} "
                                    f"({devices[d]} would need {(c * block_bytes - r) / GIB:.1f} GiB more, "
                                    f"{max(need, 0.0):.1f} GiB short in all); use --offload or more GPUs.")
    blocks: list[int] = []
    for d, c in enumerate(counts):
        blocks += [d] * c
    return Placement(tuple(devices), tuple(blocks), offload)


def _to(x, device):
    if hasattr(x, "to") and hasattr(x, "device"):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def align_inputs(module, device):
    """A forward pre-hook moving every tensor argument of `module` (hidden state, rotary tables, masks) to
    `device`, differentiably (gradients flow back to where the input came from). Returns the handle."""
    return module.register_forward_pre_hook(
        lambda m, args, kwargs: (_to(args, device), {k: _to(v, device) for k, v in kwargs.items()}), with_kwargs=True)


def spread(model, layers: list, placement: Placement, norm) -> list:
    """Puts the model on `placement` (no --offload): block i on its device, everything else (embeddings, rotary
    tables, final norm, head) on the first; each block and the final `norm` take their inputs onto their own
    device. Returns the hooks' handles."""
    import torch

    from hcnr_deploy.engine.state import place_outside_blocks  # repair imports this module

    with torch.no_grad():
        place_outside_blocks(model, layers, placement.first)
        if not placement.offload:
            for i, layer in enumerate(layers):
                layer.to(placement.device_of(i))
    return [align_inputs(layer, placement.device_of(i)) for i, layer in enumerate(layers)] + [
        align_inputs(norm, placement.first)]


def place_model(model, blocks, devices: list[str], offload: bool, say=print) -> Placement:
    """The run's placement over `devices` (several GPUs): blocks placed by their bytes and each GPU's free
    memory (the embeddings and head counted on the first, a tenth of each GPU kept for the passes), the model
    spread onto it (``spread``), the placement printed (`say`). ``UserError`` for a family whose blocks cannot
    be driven one at a time."""
    import torch

    if blocks is None:
        raise UserError(f"--device {','.join(devices)}: several GPUs need a family whose decoder blocks run one at a "
                        f"time (llama, mistral, qwen2, qwen3); use one GPU.")
    decoder, layers = blocks
    size = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])  # noqa: E731
    block = size(layers[0])
    cuda = all(torch.device(d).type == "cuda" for d in devices)
    free = [torch.cuda.mem_get_info(torch.device(d))[0] for d in devices] if cuda else None  # else an even split
    fixed = [(free[k] // 10 if free else 0) + (size(model) - len(layers) * block if k == 0 else 0)
             for k in range(len(devices))]
    placement = place_blocks(len(layers), block, devices, free, fixed, offload)
    spread(model, layers, placement, decoder.norm)
    say(placement.describe())
    return placement
