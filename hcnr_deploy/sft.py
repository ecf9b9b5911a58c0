"""The `sft` repair method: the fine-tune trained further on the repair's own calibration examples.

DESIGN.md section 2, "Other methods": supervised fine-tuning on the same honesty + task examples the
training-free edits use, the cheap training competitor the paper leaves out. Loss on response tokens
only (hcnr_deploy/data.py's masks), AdamW at a constant learning rate, so a snapshot after 16 steps of
a 64-step run is the 16-step run.

- LoRA fine-tune ``D = s B A``: A and B train further, same rank, same scaling, so the result is again
  an adapter on the base (the fine-tune's adapter with both factors replaced).
- Full fine-tune: a fresh LoRA (rank `rank`, ``lora_alpha = r`` so ``s = 1``, PEFT's initialisation:
  A uniform in +-1/sqrt(in), B = 0) on every decoder Linear, trained on top of ``Ws``;
  `checkpoint_patches` turns it into ``Ws + s B A`` for export.write_checkpoint (or write_svd_adapter).

The LoRA is hand-written as forward hooks on the adapted nn.Linear modules, ``y = W x + s B (A x)``
(PEFT's order of operations), so the caller's model is never rewrapped. While training, its weights
are the state the adapter trains on (W0 for a LoRA fine-tune, Ws for a full one; every tensor of that
checkpoint); afterwards every tensor, requires_grad flag and train/eval mode is as it was found, so a
repair session can reuse the model for other candidates.

`train_loop` is the one SFT loop of the project: the scenario's trainings (scenario/train.py) use it too.
Deterministic for a given seed, device and thread count.
"""

from __future__ import annotations

import random
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from eval_harness.errors import UserError
from hcnr_deploy.equations.lora import lora_delta, lora_output
from hcnr_deploy.io.checkpoint import is_decoder_linear_weight
from hcnr_deploy.io.finetune import FineTune

DEFAULT_FULL_RANK = 16  # rank of the fresh LoRA trained on a full fine-tune (a rank vLLM serves)
SFT_BATCH = 16  # examples per optimizer step (--batch-size sets the micro-batch: gradient accumulation)

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [r, in], B [out, r])


# ---------------------------------------------------------------------------------------------- the loop


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (ids, labels, attention mask); labels -100 on padding and wherever the example has -100."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


def mask_to_labels(encoded: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """data.encode's (ids, response mask) -> (ids, labels): the token where the mask is 1, else -100."""
    return [(ids, [t if m else -100 for t, m in zip(ids, mask)]) for ids, mask in encoded]


def accumulated_loss(model, batch, pad_id: int, micro_batch: int, ctx) -> float:
    """Backward of one batch's loss in micro-batches of `micro_batch` examples (gradient accumulation):
    ``L = sum_m n_m L_m / sum_m n_m`` with ``L_m`` the model's mean cross-entropy over the ``n_m`` labelled
    (shifted) tokens of micro-batch m, so the gradients are those of the whole batch's mean. Returns L."""
    parts = [collate(batch[i:i + micro_batch], pad_id) for i in range(0, len(batch), micro_batch)]
    total = sum(int((labels[:, 1:] != -100).sum()) for _, labels, _ in parts)
    device = next(model.parameters()).device
    out = 0.0
    for ids, labels, mask in parts:
        weight = int((labels[:, 1:] != -100).sum()) / max(total, 1)
        with ctx():
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        if weight:
            (loss * weight).backward()
            out += float(loss.detach()) * weight
    return out


def train_loop(model, params: list[torch.Tensor], data: list[tuple[list[int], list[int]]], *, steps: int,
               batch_size: int, lr: float, seed: int = 0, pad_id: int = 0, lr_lambda=None,
               weight_decay: float = 0.0, betas=(0.9, 0.98), clip: float = 1.0, bf16: bool = False,
               progress=None, description: str = "training", on_step=None,
               micro_batch: int | None = None) -> list[float]:
    """Train `params` of `model` for `steps` AdamW steps on `data` ((ids, labels) pairs); returns the losses.

    The loss is the model's own mean cross-entropy over labelled tokens of the batch. Batches are drawn
    epoch by epoch from a `random.Random(seed)` shuffle (leftovers of an epoch open the next batch);
    `lr_lambda(step)` scales the learning rate (None: constant); gradients are clipped to norm `clip`.
    `on_step(step)` is called after each step (1-based). `progress` is a rich Progress (optional).
    `micro_batch` below `batch_size`: each batch's gradient is accumulated over micro-batches of that many
    examples (``accumulated_loss``; the same update within rounding, less activation memory).
    The model is in train mode while training and in its previous mode afterwards.
    """
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda is not None else None
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[float] = []
    device = next(model.parameters()).device
    task = progress.add_task(description, total=steps) if progress else None
    was_training = model.training
    model.train()
    try:
        for step in range(steps):
            if len(order) < batch_size:
                perm = list(range(len(data)))
                rng.shuffle(perm)
                order += perm
            batch = [data[i] for i in order[:batch_size]]
            del order[:batch_size]
            ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
            if micro_batch is not None and micro_batch < len(batch):
                loss = torch.tensor(accumulated_loss(model, batch, pad_id, micro_batch, ctx))
            else:
                ids, labels, mask = (t.to(device) for t in collate(batch, pad_id))
                with ctx():
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if progress:
                progress.update(task, advance=1, description=f"{description} (loss {losses[-1]:.3f})")
            if on_step is not None:
                on_step(step + 1)
    finally:
        model.train(was_training)
    return losses


# ---------------------------------------------------------------------------------------------- the LoRA


@contextmanager
def lora_hooks(model, factors: Factors, scales: dict[str, float]):
    """Forward hooks adding ``s B (A x)`` to each named Linear's output; removed on exit."""
    modules = dict(model.named_modules())
    handles = []

    def hook_for(a, b, s):
        def hook(module, inputs, output):
            return output + lora_output(inputs[0], a, b, s).to(output.dtype)
        return hook

    try:
        for name, (a, b) in factors.items():
            handles.append(modules[name].register_forward_hook(hook_for(a, b, scales[name])))
        yield
    finally:
        for h in handles:
            h.remove()


def scaling(finetune: FineTune, module: str) -> float:
    """s of the trained LoRA: the fine-tune adapter's own, or 1 (lora_alpha = r) for a full fine-tune."""
    return finetune.lora.scaling(module) if finetune.is_lora else 1.0


def initial_factors(model, finetune: FineTune, rank: int | None = None, seed: int = 0) -> Factors:
    """Float32 starting factors: the fine-tune's adapter, or a fresh LoRA on every decoder Linear
    (PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)) from a `seed`ed generator, B = 0)."""
    if finetune.is_lora:
        factors = {m: tuple(t.float().clone() for t in finetune.lora.factors(m)) for m in finetune.lora.modules()}
        ranks = sorted({a.shape[0] for a, _ in factors.values()})
        if rank is not None and ranks != [rank]:
            raise UserError(f"--rank {rank}: the LoRA fine-tune has rank {', '.join(map(str, ranks))} and the sft "
                            f"method keeps it; leave --rank out (it is for full fine-tunes).")
        return factors
    rank = DEFAULT_FULL_RANK if rank is None else rank
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}.")
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and is_decoder_linear_weight(name + ".weight", module.weight.shape):
            out_f, in_f = module.weight.shape
            bound = 1.0 / in_f ** 0.5
            a = (torch.rand(rank, in_f, generator=gen, dtype=torch.float32) * 2 - 1) * bound
            factors[name] = (a, torch.zeros(out_f, rank, dtype=torch.float32))
    if not factors:
        raise UserError("the model has no Linear modules inside its decoder blocks (layers.N); the sft method "
                        "needs them.")
    return factors


@contextmanager
def checkpointed(model, on: bool = True):
    """Gradient checkpointing (transformers', non-reentrant) while inside: each decoder block's activations are
    recomputed in the backward instead of kept; the model's own setting is back on exit."""
    if not on or not getattr(model, "supports_gradient_checkpointing", False) or model.is_gradient_checkpointing:
        yield
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.gradient_checkpointing_disable()


@contextmanager
def trained_state(model, finetune: FineTune):
    """Every tensor of the checkpoint the adapter trains on (base for a LoRA fine-tune, Ws for a full one)
    is put into `model` and no parameter requires a gradient; on exit both are restored exactly (a tensor
    that was the base's is read back from the base checkpoint, any other is kept as a CPU copy meanwhile)."""
    source = finetune.base if finetune.is_lora else finetune.ckpt
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    saved: dict[str, torch.Tensor | None] = {}  # None: restore from the base checkpoint
    try:
        with torch.no_grad():
            for name, t in source.iter_tensors([n for n in source.names() if n in tensors]):
                dst = tensors[name]
                t = t.to(dst.dtype)
                if torch.equal(dst.cpu(), t):
                    continue
                if source is not finetune.base and torch.equal(dst.cpu(), finetune.base.get(name).to(dst.dtype)):
                    saved[name] = None
                else:
                    saved[name] = dst.detach().cpu().clone()
                dst.copy_(t)
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        with torch.no_grad():
            from_base = [n for n, v in saved.items() if v is None]
            for name, t in finetune.base.iter_tensors(from_base):
                tensors[name].copy_(t.to(tensors[name].dtype))
            for name, t in saved.items():
                if t is not None:
                    tensors[name].copy_(t)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


# ---------------------------------------------------------------------------------------------- the method


def sft_snapshots(model, finetune: FineTune, enc_hon, enc_task, steps: list[int], *, lr: float = 5e-4,
                  batch_size: int = SFT_BATCH, seed: int = 0, rank: int | None = None, device: str = "cpu",
                  progress=None, losses: list | None = None, micro_batch: int | None = None,
                  checkpointing: bool = True) -> dict[int, Factors]:
    """SFT of the fine-tune on honesty + task calibration examples; LoRA factors after each of `steps`.

    `model`: the base model in memory (io.load.load_model), all of it on `device` (or its blocks over several
    GPUs, engine/placement.py: each factor then lives beside its module), left as found (its
    weights may be in any state: the ones training needs are read from the checkpoints). `enc_hon`, `enc_task`:
    data.encode's (ids, response mask) lists, pooled and drawn in batches of `batch_size` from a
    `seed`ed shuffle. One run of max(steps) AdamW steps (constant `lr`, no weight decay, gradients
    clipped to norm 1); returns {n: {module: (A, B)}} (float32, CPU) for every n in `steps`, in the
    fine-tune adapter's convention (same rank and scaling: `scaling(finetune, module)`), or for a full
    fine-tune a fresh LoRA of rank `rank` (default 16, s = 1) on top of Ws (see `checkpoint_patches`).
    `losses`, when given, receives each step's training loss. `micro_batch` (``--batch-size``): examples per
    forward / backward, the gradient accumulated over a batch (``train_loop``); `checkpointing`: gradient
    checkpointing of the decoder blocks (``checkpointed``). Neither changes the update beyond rounding.
    """
    wanted = sorted(set(int(s) for s in steps))
    if not wanted or wanted[0] < 1:
        raise UserError(f"--steps must be positive integers, got {list(steps)}.")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    if not lr > 0:
        raise UserError(f"--lr must be positive, got {lr}.")
    want = torch.device(device)
    devices = {t.device for t in model.parameters()}
    if any(d.type != want.type for d in devices):
        raise UserError(f"--method sft trains the whole model on the {want.type} device(s) but its weights are on "
                        f"{', '.join(sorted(map(str, devices)))}; leave out --offload.")
    data = mask_to_labels(list(enc_hon) + list(enc_task))
    if not data:
        raise UserError("the sft method needs calibration examples; the honesty and task data are empty.")
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    factors = initial_factors(model, finetune, rank, seed)
    where = {m: mod.weight.device for m, mod in model.named_modules() if m in factors}  # blocks over several GPUs
    params = {m: (a.to(where[m]).requires_grad_(True), b.to(where[m]).requires_grad_(True))
              for m, (a, b) in factors.items()}
    scales = {m: scaling(finetune, m) for m in params}
    flat = [t for ab in params.values() for t in ab]
    snapshots: dict[int, Factors] = {}

    def snapshot(step):
        if step in wanted:
            snapshots[step] = {m: (a.detach().cpu().clone(), b.detach().cpu().clone()) for m, (a, b) in params.items()}

    rng_devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), trained_state(model, finetune), \
            lora_hooks(model, params, scales), checkpointed(model, checkpointing):  # caller's RNG state is left too
        run = train_loop(model, flat, data, steps=wanted[-1], batch_size=batch_size, lr=lr, seed=seed, pad_id=pad_id,
                         progress=progress, description="sft: calibration examples", on_step=snapshot,
                         micro_batch=micro_batch)
    if losses is not None:
        losses.extend(run)
    return snapshots


@torch.no_grad()
def mean_response_loss(model, finetune: FineTune, factors: Factors, encoded, *, batch_size: int = 16,
                       device: str = "cpu") -> float:
    """Token-mean response loss of the model with the LoRA `factors` (in trained_state) on `encoded`."""
    from hcnr_deploy.data import batches

    total = count = 0.0
    params = {m: (a.to(device), b.to(device)) for m, (a, b) in factors.items()}
    scales = {m: scaling(finetune, m) for m in params}
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    with trained_state(model, finetune), lora_hooks(model, params, scales):
        for batch in batches(list(encoded), batch_size, pad_id):
            logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                           use_cache=False).logits[:, :-1].float()
            mask = batch.loss_mask[:, 1:].to(device).bool()
            ce = F.cross_entropy(logits[mask], batch.input_ids[:, 1:].to(device)[mask], reduction="sum")
            total += float(ce)
            count += float(mask.sum())
    return total / max(count, 1.0)


def merged_weight(finetune: FineTune, module: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The dense weight of `module` with the trained LoRA (float64): ``W0 + s B A`` for a LoRA fine-tune
    (the new factors replace the old), ``Ws + s B A`` for a full one."""
    name = module + ".weight"
    start = finetune.base.get(name) if finetune.is_lora else finetune.ckpt.get(name)
    return start.double() + lora_delta(a, b, scaling(finetune, module), torch.float64)


def checkpoint_patches(finetune: FineTune, factors: Factors) -> dict:
    """export.write_checkpoint's patches for the trained LoRA: every column of each adapted matrix set to
    ``W0 + E`` with ``E = merged_weight - W0`` (float64), i.e. the merged weight in the checkpoint's dtype."""
    patches = {}
    for module, (a, b) in factors.items():
        name = module + ".weight"
        w0 = finetune.base.get(name).double()
        e = merged_weight(finetune, module, a, b) - w0
        patches[name] = ("columns", torch.arange(w0.shape[1]), e)
    return patches
