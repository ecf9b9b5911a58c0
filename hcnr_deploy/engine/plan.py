"""The plan before a run (DESIGN.md section 6): peak memory per GPU, host RAM, disk and FLOPs per stage of a
repair or a sweep, from config.json and the options alone, and the refusal of a run that cannot fit.

The model of memory follows what the code holds (repair/stage2.py, statistics.py, streaming.py), for a
decoder of L blocks of width h, MLP width I, nh query heads and nkv key/value heads of size hd, vocabulary V,
working dtype of b bytes; a batch is B samples of at most T tokens (``--max-length``), N samples per set:

- the model, one copy in the working dtype, its blocks spread over the GPUs by ``placement.place_blocks``
  (``--offload``: in pinned host memory, the embeddings, head and two blocks per device: the one running
  and the next one copied in asynchronously; unchanged blocks are never copied back);
- the Fisher pass: the hidden state at every block boundary of one batch (``L B T h b``), or of every sample
  (``L N T h b``, on the host with ``--offload``) when it runs block-major (engine/passes.py: with ``--offload``,
  and on the CPU, where the Grams ride on it, one block's Grams beside), one block's activations and their
  gradients, the per-sample reductions (``B T^2`` floats) and one 16 MB logits chunk (a family
  that is not streamed block by block, engine/families.py: the whole autograd graph, and the full-vocabulary
  logits of every position where its head cannot run alone);
- the stage-2 pass: every sample's hidden state at the current block, per stream not fused into a Fisher
  pass (``N T h b``), one block's Grams per stream (float32, ``4 in^2`` per distinct input: I, h, h, nh hd),
  and the float64 solves of one block by one candidate at a time (``SOLVE_BYTES``: e.g. obs ``32 I^2`` at
  the MLP's down projection); every GPU holding blocks runs their statistics, so each gets these peaks;
- pending edits: new LoRA factors (float64, ``8 r in`` per matrix and candidate); a checkpoint's on disk;
  the fused streams' Grams of every eligible matrix on disk (``L 4 (3 h^2 + I^2)`` bytes per stream).

The figures are upper bounds on activations (every sample taken at ``--max-length`` tokens).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from eval_harness.errors import UserError
from hcnr_deploy.engine.families import STREAMED, WHOLE_MODEL_FULL_LOGITS
from hcnr_deploy.engine.placement import parse_devices, place_blocks

GIB = 2**30
INTERPRETER_BYTES = int(0.56 * GIB)  # python + torch + transformers + hcnr_deploy imported (VmHWM, 2-core VM)
LOGITS_CHUNK = 16 << 20  # streaming.head_gradient's chunk of float32 logits
SHARD_BYTES = 5 * GIB  # a checkpoint is written one source shard at a time (the hub's usual shard size)
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}


@dataclass(frozen=True)
class Shape:
    """What the plan needs of config.json."""

    model_type: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    tied: bool
    dtype: str
    passes: str = "block-streamed"  # engine/families.py's path for this family
    passes_reason: str = ""  # why it is not block-streamed

    @classmethod
    def from_config(cls, cfg: dict) -> "Shape":
        from hcnr_deploy.engine.families import config_stream_plan

        text = cfg.get("text_config") or cfg
        passes = config_stream_plan(cfg)
        try:
            h, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
            return cls(model_type=str(text.get("model_type") or cfg.get("model_type")), hidden=h,
                       intermediate=int(text["intermediate_size"]), heads=heads,
                       kv_heads=int(text.get("num_key_value_heads") or heads),
                       head_dim=int(text.get("head_dim") or h // heads), layers=int(text["num_hidden_layers"]),
                       vocab=int(text["vocab_size"]), tied=bool(cfg.get("tie_word_embeddings", False)),
                       dtype=str(text.get("dtype") or text.get("torch_dtype") or cfg.get("torch_dtype")
                                 or "float32"), passes=passes.path, passes_reason=passes.reason)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"config.json lacks a decoder shape field ({e}); --plan needs hidden_size, "
                            f"intermediate_size, num_attention_heads, num_hidden_layers and vocab_size.") from None

    def matrices(self) -> list[tuple[str, int, int]]:
        """(name, out, in) of one block's Linears (q, k, v, o, gate, up, down)."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q), ("gate_proj", i, h),
                ("up_proj", i, h), ("down_proj", h, i)]

    def inputs(self) -> list[int]:
        """Widths of a block's distinct Linear inputs in the order stage 2 solves them (weight names sorted:
        down, gate/up, k/q/v, o)."""
        return [self.intermediate, self.hidden, self.hidden, self.heads * self.head_dim]

    @property
    def block_linear(self) -> int:
        return sum(o * i for _, o, i in self.matrices())

    @property
    def block_params(self) -> int:
        return self.block_linear + 2 * self.hidden

    @property
    def outside_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.outside_params


def read_config(model: str) -> dict:
    """config.json of a local folder, or of a hub id from the local Hugging Face cache (nothing downloaded)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
        if not path.is_file():
            raise UserError(f"--base {model} has no config.json; --plan reads the model's shape from it.")
        return json.loads(path.read_text())
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(str(model), "config.json", local_files_only=True)
    except Exception:  # noqa: BLE001 (not cached, no such repo, an invalid id: one message for all)
        raise UserError(f"--base {model}: no local folder and no config.json of that hub id in the local Hugging "
                        f"Face cache; download it first (huggingface-cli download {model} config.json) or pass "
                        f"a folder.") from None
    return json.loads(Path(path).read_text())


def finetune_kind(finetuned: str | None) -> tuple[str, int]:
    """("lora", rank) when `finetuned` is a local PEFT adapter folder, else ("full", 0)."""
    if finetuned:
        cfg = Path(finetuned).expanduser() / "adapter_config.json"
        if cfg.is_file():
            return "lora", int(json.loads(cfg.read_text()).get("r", 16))
    return "full", 0


def working_dtype_bytes(shape: Shape, dtype: str, on_gpu: bool) -> int:
    """``--dtype auto``: float32 on the CPU, the checkpoint's dtype on a GPU (state.resolve_device_dtype)."""
    if dtype == "auto":
        return DTYPE_BYTES.get(shape.dtype, 4) if on_gpu else 4
    return DTYPE_BYTES.get(dtype, 4)


# float64 bytes per in^2 of one distinct input, for each edit: (kept while the rest of the block is solved, at
# the peak of its own solve); compensation.py: obs keeps H + lambda I and L^-1 and peaks at those with the
# Cholesky factor and the identity it inverts; regmean keeps its factor and peaks at the three float64 Gram
# copies it sums; exact keeps H + lambda I; task-aware keeps nothing and peaks at four copies.
SOLVE_BYTES = {"obs": (16, 32), "regmean": (8, 24), "exact": (8, 16), "task-aware": (0, 32), "none": (0, 0)}


def solve_peak(method: str, inputs: list[int]) -> int:
    """Peak bytes of one candidate's float64 solves of one block (every matrix selected: the bound)."""
    keep, peak = SOLVE_BYTES.get(method, (0, 0))
    kept, worst = 0, 0
    for n in inputs:
        worst = max(worst, kept + peak * n * n)
        kept += keep * n * n
    return worst


def candidate_cost(shape: Shape, method: str, opts) -> tuple[float, bool, str]:
    """(fraction of the blocks' matrices edited through a solve, needs the task stream, compensation kind)."""
    if method == "regmean":
        return 1.0, True, "regmean"
    if method == "hcnr":
        comp = opts.get("compensation", "obs")
        if comp == "none":
            return 0.0, False, comp
        return float(opts.get("r_cw", 0.4)), comp == "task-aware", comp
    return 0.0, False, method  # scale, sft: no Grams


def fused_streams(candidates: list[tuple[str, dict]], hessian_inputs: str, with_task: bool) -> int:
    """How many of stage 2's Gram streams ride on a Fisher pass (same data set and model state): the honesty
    inputs of the base under a Fisher pass of s_hon on the base, the task inputs of the fine-tune under one of
    s_task on the fine-tune (Statistics.want_grams)."""
    hcnr = [o for m, o in candidates if m == "hcnr" and o.get("selection", "hcnr") != "random"]
    hon = hessian_inputs == "base" and any(o.get("fisher_model", "paired") != "finetuned" for o in hcnr)
    task = with_task and any(o.get("selection", "hcnr") == "hcnr" and o.get("fisher_model", "paired") != "base"
                             for o in hcnr)
    return int(hon) + int(task)


def plan(shape: Shape, candidates: list[tuple[str, dict]], *, num_samples: int, max_length: int, batch_size: int,
         finetune: tuple[str, int] = ("full", 0), dtype: str = "auto", gpus: int = 0, offload: bool = False,
         hessian_inputs: str = "base", free_gpus: list[int] | None = None) -> dict:
    """Predicted peaks and FLOPs of a repair (one candidate) or a sweep (several) on `gpus` GPUs (0: the CPU),
    the blocks placed over them in proportion to `free_gpus` (free bytes per GPU; None: an even split).
    `candidates`: ``(method, repair options)``. Returns the JSON of ``--plan --json`` plus a ``stages`` table
    and the ``placement`` line."""
    on_gpu = gpus > 0
    b = working_dtype_bytes(shape, dtype, on_gpu)
    h, i_w, L, V = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    B, T, N = min(batch_size, num_samples), max_length, num_samples
    model = shape.params * b
    block = shape.block_params * b
    outside = shape.outside_params * b
    kind, rank = finetune
    streamed = shape.passes == STREAMED

    fractions = [candidate_cost(shape, m, o) for m, o in candidates]
    with_grams = [f for f in fractions if f[0] > 0]
    with_task = any(t for _, t, _ in with_grams)
    streams = (1 if with_grams else 0) + (1 if with_task else 0) + (
        1 if hessian_inputs not in ("base",) and with_grams else 0)
    # the Grams ride on the Fisher pass on the CPU only (engine/passes.fuse_pays); with --offload or fused the
    # Fisher pass is block-major and holds every sample's boundary states
    fused = fused_streams(candidates, hessian_inputs, with_task) if streamed and with_grams and not on_gpu else 0
    block_major = streamed and (fused or offload)
    ins = shape.inputs()
    gram_block = sum(4 * n * n for n in ins)  # one stream's Grams of one block, float32
    # Fisher pass (per batch): block boundaries, one block's activations + grads, per-sample reductions, logits
    act = B * T * (6 * h + 2 * q + 2 * kv + 4 * i_w) * b
    boundary = (N if block_major else B) * T * h * b  # per block: one batch's, or every sample's
    fisher = 3 * act + 2 * B * T * T * 4 + 2 * B * T * i_w * 4 + LOGITS_CHUNK + (gram_block if fused else 0)
    if not streamed:  # whole-model autograd graph; full-vocabulary logits where the head cannot run alone
        fisher = L * 3 * act + (2 * B * T * V * 4 if shape.passes == WHOLE_MODEL_FULL_LOGITS else LOGITS_CHUNK)
        boundary = 0
    fisher_scores = 2 * L * sum(i for _, _, i in shape.matrices()) * 8
    # stage 2: per-stream hidden states (streams not fused), one block's Grams, its float64 solve
    grams = streams * gram_block
    solve = max((solve_peak(c, ins) for _, _, c in with_grams), default=0)
    hidden_states = (streams - fused) * (N * T * h * b + N * T * T + 2 * N * T * shape.head_dim * b)
    stage2 = hidden_states + grams + solve + B * T * (4 * h + 4 * i_w) * b
    lora_edits = len(with_grams) * L * sum(rank * i for _, _, i in shape.matrices()) * 8 if kind == "lora" else 0

    def passes(n_blocks: int) -> int:  # a device holding n_blocks blocks' boundaries: its peak besides weights
        return max(fisher + n_blocks * boundary + fisher_scores, stage2 + fisher_scores + lora_edits)

    write_buffer = SHARD_BYTES if kind == "full" else 0
    head_bytes = 0 if shape.tied else V * h * b
    placement = None
    if on_gpu:
        devices = [f"cuda:{d}" for d in range(gpus)]
        share = [(outside - head_bytes if d == 0 else 0) + (head_bytes if d == gpus - 1 else 0) for d in range(gpus)]
        fixed = [x + passes(0) for x in share]
        per_block = block if offload else block + boundary  # the split's bound: boundaries live in the Fisher pass
        try:
            placement = place_blocks(L, per_block, devices, free_gpus, fixed, offload)
        except UserError:  # does not fit the free memory: an even split, and the refusal says so
            placement = place_blocks(L, per_block, devices, None, fixed, offload)
        counts = [placement.blocks.count(d) for d in range(gpus)]
        if offload:  # two blocks per device in use (running, next copied in); boundaries in pinned host memory
            gpu = [x + (2 * block + passes(0) if c or d == 0 else 0) for d, (x, c) in enumerate(zip(share, counts))]
        else:
            gpu = [x + (c * block + passes(c) if c or d == 0 else 0) for d, (x, c) in enumerate(zip(share, counts))]
        host = INTERPRETER_BYTES + 2 * block + write_buffer + lora_edits + (model + L * boundary if offload else 0)
        resident = sum(share) + (2 * block * len([c for c in counts if c]) if offload else L * block)
    else:
        resident = model
        host = INTERPRETER_BYTES + model + passes(L) + min(write_buffer, model)
        gpu = []

    # disk: the outputs, and a checkpoint's pending edits spilled until written
    adapter = L * sum(rank * (i + o) for _, o, i in shape.matrices()) * b
    artifact = adapter if kind == "lora" else model
    spill = 0 if kind == "lora" else sum(f * shape.block_linear * L * 4 * (1.0 if c == "regmean" else 0.5)
                                         for f, _, c in with_grams)
    disk = int(len(candidates) * artifact + spill + fused * L * gram_block)

    # FLOPs: forward 2 P per token, activation backward 2 P more, attention, head; Grams; float64 solves
    tokens = N * T
    lin = L * shape.block_linear
    attn = 4 * L * T * q
    head = 2 * V * h
    per_sample = 2 * T * sum(i + o for _, o, i in shape.matrices()) * L
    fisher_passes = {c for m, o in candidates if m == "hcnr" for c in ([] if o.get("selection") == "random" else (
        ["honesty", "task"] if o.get("selection", "hcnr") == "hcnr" else ["honesty"]))}
    flops = {"fisher": len(fisher_passes) * tokens * (3 * (2 * lin + attn) + 2 * head + per_sample),
             "hessian": streams * tokens * 2 * sum(n * n for n in ins) * L + (streams - fused) * tokens * (
                 2 * lin + attn),
             "compensation": sum(f * L * (sum(2 / 3 * n ** 3 for n in ins) + sum(2 * o * i * i for _, o, i in
                                                                                   shape.matrices()))
                                 for f, _, _ in with_grams)}
    return {"gpu_bytes": [int(x) for x in gpu], "host_bytes": int(host), "disk_bytes": disk,
            "flops": {k: float(v) for k, v in flops.items()},
            "model_bytes": int(model), "block_bytes": int(block), "streamed": streamed,
            "passes": {"path": shape.passes, "reason": shape.passes_reason},
            "placement": placement.describe() if placement else "cpu",
            "stages": {"fisher": int(fisher + L * boundary), "stage2": int(stage2), "grams_per_block": int(grams),
                       "solve": int(solve), "lora_edits": int(lora_edits), "resident_model": int(resident),
                       "fused_streams": fused, "grams_on_disk": int(fused * L * gram_block)}}


def seconds(p: dict, *, matmul_flops: float, fp64_flops: float, disk_Bps: float, pcie_Bps: float = 0.0,
            offload_visits: int = 0) -> dict:
    """Time per stage at stated rates: matmuls at `matmul_flops`, solves at `fp64_flops`, the model read and the
    artifacts written at `disk_Bps` (``loads`` times and ``written_bytes`` when the plan has them: a sweep one
    candidate at a time), and with --offload `offload_visits` block copies in at `pcie_Bps` (pinned,
    asynchronous: the next block is copied while one runs, so the copies hide under the passes' compute and
    only what exceeds it adds; unchanged blocks are not copied back)."""
    out = {"load": p.get("loads", 1) * p["model_bytes"] / disk_Bps, "fisher": p["flops"]["fisher"] / matmul_flops,
           "hessian": p["flops"]["hessian"] / matmul_flops, "compensation": p["flops"]["compensation"] / fp64_flops,
           "export": p.get("written_bytes", p["disk_bytes"]) / disk_Bps}
    copies = offload_visits * p["block_bytes"] / pcie_Bps if offload_visits else 0.0
    out["total"] = sum(out.values()) + max(0.0, copies - out["fisher"] - out["hessian"])
    if offload_visits:
        out["offload_copies"] = copies
    return out


def available_memory() -> dict:
    """What this machine has free now: ``host`` (MemAvailable) and ``gpus`` (free bytes per visible GPU)."""
    host = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) * 1024
    except OSError:
        pass
    gpus = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.mem_get_info(d)[0] for d in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        gpus = []
    return {"host": host, "gpus": gpus}


def refusal(p: dict, free: dict, offload: bool, sweep: bool = False) -> str | None:
    """The one-line reason a planned run cannot fit the free memory, naming what would make it fit, or None."""
    gib = lambda x: f"{x / GIB:.1f} GiB"  # noqa: E731
    fixes = ("--offload, more GPUs (--device cuda:0,1,...), " if not offload and p["gpu_bytes"] else "") + (
        "a smaller --max-length or --num-samples") + (", a smaller --grid" if sweep else "")
    for d, (need, has) in enumerate(zip(p["gpu_bytes"], free["gpus"] or [])):
        if need > has:
            name = p["devices"][d] if p.get("devices") else f"GPU {d}"
            return (f"the plan needs {gib(need)} on {name} and it has {gib(has)} free "
                    f"(the model {gib(p['model_bytes'])}); try {fixes} (hcnr-deploy ... --plan shows the figures).")
    if free["host"] is not None and p["host_bytes"] > free["host"]:
        return (f"the plan needs {gib(p['host_bytes'])} of host memory and {gib(free['host'])} is available "
                f"(the model {gib(p['model_bytes'])}); try {fixes}"
                + (" or a GPU" if not p["gpu_bytes"] else "") + " (hcnr-deploy ... --plan shows the figures).")
    return None


def format_plan(p: dict, title: str) -> str:
    """The human-readable plan: memory per device, host, disk, FLOPs per stage."""
    gib = lambda x: f"{x / GIB:,.2f} GiB"  # noqa: E731
    lines = [title, f"  model {gib(p['model_bytes'])} (one block {gib(p['block_bytes'])})"
             + ("" if p["streamed"] else f"; not streamed block by block ({p['passes']['reason']}): "
                                          f"{p['passes']['path']} passes")]
    if p["gpu_bytes"]:
        lines.append(f"  {p['placement']}")
    for d, g in enumerate(p["gpu_bytes"]):
        lines.append(f"  GPU {d}: {gib(g)}" + (" (no blocks placed)" if d and not g else ""))
    lines += [f"  host RAM: {gib(p['host_bytes'])}", f"  disk: {gib(p['disk_bytes'])}",
              "  FLOPs: " + ", ".join(f"{k} {v:.3g}" for k, v in p["flops"].items())]
    return "\n".join(lines)


def plan_for_run(base, finetuned, opts, candidates: list[tuple[str, dict]]) -> dict:
    """The plan of a run with these options on this machine (the visible GPUs when the device is one)."""
    import torch

    shape = Shape.from_config(read_config(str(base)))
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = parse_devices(opts.device, visible or (1 << 10 if opts.device.startswith("cuda") else 0))
    gpus = 0 if devices == ["cpu"] else len(devices)
    free = available_memory()["gpus"] if visible else []
    free_gpus = [free[int(d.split(":")[1])] for d in devices] if gpus and free else None
    p = plan(shape, candidates, num_samples=opts.num_samples, max_length=opts.max_length,
             batch_size=opts.batch_size, finetune=finetune_kind(finetuned), dtype=opts.dtype, gpus=gpus,
             offload=opts.offload, hessian_inputs=opts.hessian_inputs, free_gpus=free_gpus)
    if gpus:
        p["devices"] = devices
        p["placement"] = p["placement"].replace("cuda:", "gpu ")
        for k, d in enumerate(devices):  # the plan numbers its devices 0..k-1; name them as --device did
            p["placement"] = p["placement"].replace(f"gpu {k}:", f"{d}:")
    return p


def plan_check_off() -> bool:
    """Whether HCNR_DEPLOY_NO_PLAN_CHECK switches the refusals before a run off (check_fits, the guard's)."""
    return bool(os.environ.get("HCNR_DEPLOY_NO_PLAN_CHECK"))


def check_fits(base, finetuned, opts, candidates, sweep: bool = False, planner=plan_for_run):
    """Refuse, before anything is loaded, a run the plan (`planner`'s) says cannot fit the free memory
    (``UserError``). A model whose config.json cannot be read is left to the run (it fails there with its own
    message)."""
    try:
        p = planner(base, finetuned, opts, candidates)
    except UserError:
        return
    if plan_check_off():
        return
    free = available_memory()
    if p.get("devices") and free["gpus"]:
        free["gpus"] = [free["gpus"][int(d.split(":")[1])] for d in p["devices"]]
    reason = refusal(p, free, opts.offload, sweep)
    if reason:
        raise UserError(f"this run cannot fit: {reason}")

