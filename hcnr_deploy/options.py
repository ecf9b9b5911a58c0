"""Every repair option, declared once: name, type, default, help, check and CLI group.

``RepairOptions`` is the single source. From it come the click options (``click_options(*groups)``:
``hcnr-deploy repair`` takes every group, ``hcnr-deploy sweep`` "data" and "compute"), the validation
(in ``__post_init__``: an invalid instance cannot exist; the error is one line naming the flag),
report.json's ``settings`` (``settings()``) and the equivalent command line (``command_args()``).
Groups: "data" (what the statistics are computed on), "method" (the candidate edit), "compute"
(where and how the passes run).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from eval_harness.errors import UserError

GROUPS = ("data", "method", "compute")
METHODS = ("hcnr", "regmean", "scale", "lines", "sft")


def _opt(default, group: str, help: str, *, choices: tuple | None = None, check=None, flag: str | None = None,
         methods: tuple | None = None):
    """One option's declaration. `check(value)` returns an error text (what the value must be) or None;
    `methods`: the --method values it applies to (None: every method)."""
    return field(default=default, metadata=dict(group=group, help=help, choices=choices, check=check, flag=flag,
                                                methods=methods))


def _in_unit(v):
    return None if _number(v) and 0 < v <= 1 else "must be in (0, 1]"


def _at_least(n):
    def check(v):
        if not isinstance(v, int) or isinstance(v, bool):
            return f"must be an integer, at least {n}"
        return None if v >= n else f"must be at least {n}"
    return check


def _device(v):
    import re

    ok = isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda|cuda:\d+(,\d+)*", v)
    return None if ok else "must be auto, cpu, cuda or cuda:N[,M...] (e.g. cuda:0,1,2,3)"


def _non_negative(v):
    return None if _number(v) and v >= 0 else "must be >= 0"


def _positive(v):
    return None if _number(v) and v > 0 else "must be > 0"


def _finite(v):
    return None if _number(v) else "must be a finite number"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class RepairOptions:
    """The options of one repair (``hcnr-deploy repair --help`` shows the same text)."""

    # data: what the statistics are computed on
    num_samples: int = _opt(128, "data", "Examples used from each JSONL (the first N).", check=_at_least(1))
    max_length: int = _opt(512, "data", "Tokens per example (prompt cut from the left, response kept).",
                           check=_at_least(1))
    # method: the candidate edit
    method: str = _opt("hcnr", "method", "hcnr: the paper (Fisher selection + compensation); regmean: every matrix "
                       "and column, RegMean between the base on honesty inputs and the fine-tune on task inputs "
                       "(--task-weight); scale: W0 + alpha D (--alpha); lines: W0 + (alpha + beta l / (L - 1)) D for a "
                       "matrix of block l of L (LiNeS; --alpha, --beta); sft: the fine-tune trained further on the "
                       "calibration data (--steps, --lr).", choices=METHODS)
    r_iw: float = _opt(0.5, "method", "R_IW: fraction of each matrix's columns that are restoration candidates "
                       "(Eq. 5).", check=_in_unit, methods=("hcnr",))
    r_cw: float = _opt(0.4, "method", "R_CW: fraction of eligible matrices kept by displacement (Eqs. 6-7).",
                       check=_in_unit, methods=("hcnr",))
    granularity: str = _opt("column", "method", "Neuron = input column (exact LoRA possible) or single weight "
                            "(per-row masks).", choices=("column", "element"), methods=("hcnr",))
    selection: str = _opt("hcnr", "method", "hcnr (Eq. 5), no-task (r = s_hon, the paper's 'w/o Task') or random "
                          "(seeded).", choices=("hcnr", "no-task", "random"), methods=("hcnr",))
    compensation: str = _opt("obs", "method", "obs (the paper's Eqs. 9-10), exact (block least squares), none "
                             "(plain restoration), task-aware (also keeps task behaviour, see --task-weight).",
                             choices=("obs", "exact", "none", "task-aware"), methods=("hcnr",))
    task_weight: float = _opt(1.0, "method", "MU of --compensation task-aware and --method regmean: weight of the "
                              "task inputs' term; 0 = exact (regmean: the base), large = back to the fine-tune.",
                              check=_non_negative, methods=("hcnr", "regmean"))
    alpha: float = _opt(0.5, "method", "A of --method scale: W = W0 + A D (0 = the base, 1 = the fine-tune; a LoRA's "
                        "B is scaled by A); of --method lines: the factor of the first block.", check=_non_negative,
                        methods=("scale", "lines"))
    beta: float = _opt(0.5, "method", "B of --method lines: W = W0 + (A + B l / (L - 1)) D in block l of L (the "
                       "last block gets A + B, which must be >= 0; B < 0: deeper blocks nearer the base).",
                       check=_finite, methods=("lines",))
    steps: int = _opt(32, "method", "--method sft: optimizer steps on the honesty + task calibration examples.",
                      check=_at_least(1), methods=("sft",))
    lr: float = _opt(5e-4, "method", "--method sft: learning rate.", check=_positive, methods=("sft",))
    fisher_model: str = _opt("paired", "method", "paired: s_hon on the base, s_task on the fine-tune; or both on "
                             "base / finetuned.", choices=("paired", "base", "finetuned"), methods=("hcnr",))
    hessian_inputs: str = _opt("base", "method", "Model whose module inputs X give H = X X^T: base, finetuned, or "
                               "sequential (blocks before each one already repaired).",
                               choices=("base", "finetuned", "sequential"), methods=("hcnr", "regmean"))
    damp: float = _opt(0.01, "method", "Hessian damping: lambda = damp * mean(diag(X X^T)).", check=_non_negative,
                       methods=("hcnr", "regmean"))
    format: str = _opt("auto", "method", "auto: exact LoRA adapter for a LoRA fine-tune with column granularity, "
                       "else a patched checkpoint; adapter for a full fine-tune extracts a LoRA by truncated SVD.",
                       choices=("auto", "adapter", "checkpoint"))
    max_rank: int = _opt(64, "method", "Rank of an SVD-extracted adapter.", check=_at_least(1))
    # compute: where and how the passes run
    seed: int = _opt(0, "compute", "Seed (random selection, SVD extraction, sft).", check=_at_least(0))
    device: str = _opt("auto", "compute", "Where the calibration passes and solves run: auto (every visible GPU, "
                       "else the CPU), cpu, cuda (GPU 0) or cuda:0,1,2,3 (the blocks placed over those GPUs).",
                       check=_device)
    dtype: str = _opt("auto", "compute", "Working dtype of the calibration passes (auto: float32 on CPU, the "
                      "checkpoint's on GPU); outputs keep the fine-tune's dtype, solves run in float64.",
                      choices=("auto", "float32", "bfloat16", "float16"))
    batch_size: int = _opt(8, "compute", "Samples per forward/backward pass (per-sample gradients are kept apart).",
                           check=_at_least(1))
    hessian_memory_gb: float = _opt(8.0, "compute", "GiB for Hessians at once, only for architectures not streamed "
                                    "block by block (llama, mistral, qwen2, qwen3 are streamed); more selected blocks "
                                    "than fit are done in several passes.", check=_positive, flag="--hessian-memory")
    offload: bool = _opt(False, "compute", "Keep the decoder blocks in CPU memory and move one at a time to the "
                         "device while it runs (a model larger than the GPU; llama, mistral, qwen2, qwen3). Same "
                         "output as without it.")

    def __post_init__(self):
        check_fields(self)
        if self.method == "lines" and self.alpha + self.beta < 0:
            raise UserError(f"--alpha {self.alpha} --beta {self.beta}: the last block's factor alpha + beta must be "
                            f">= 0; raise --beta to at least {-self.alpha:g}.")
        if self.device.startswith("cuda"):
            import torch

            from hcnr_deploy.engine.placement import parse_devices

            parse_devices(self.device, torch.cuda.device_count() if torch.cuda.is_available() else 0)

    def replace(self, **changes) -> "RepairOptions":
        """A validated copy with `changes` (option names as keyword arguments)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise UserError(f"unknown repair option {unknown[0]!r}; the options are "
                            f"{', '.join(f.name for f in dataclasses.fields(self))}.")
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict:
        """report.json's ``settings`` (every option, by name)."""
        return dataclasses.asdict(self)

    def group(self, name: str) -> dict:
        """The options of one group, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["group"] == name}

    def command_args(self) -> list[str]:
        """Every option of the method spelled out as ``hcnr-deploy repair`` flags (switches only when on)."""
        args = []
        ignored = {f.name for f in ignored_by(self.method)}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ignored:
                continue
            if isinstance(v, bool):
                args += [flag_of(f)] if v else []
            else:
                args += [flag_of(f), str(v)]
        return args


def check_fields(options):
    """Every field's `value_problem`; the first is a one-line UserError naming the flag."""
    for f in dataclasses.fields(options):
        if (problem := value_problem(f, getattr(options, f.name))) is not None:
            raise UserError(f"{flag_of(f)} {problem}.")


def value_problem(f: dataclasses.Field, v) -> str | None:
    """What is wrong with `v` as option `f` ("must be > 0, got 0"), or None: the one check of every value."""
    meta = f.metadata
    if meta["choices"] is not None and v not in meta["choices"]:
        return f"must be one of {', '.join(meta['choices'])}, got {v!r}"
    if meta["check"] is not None and (problem := meta["check"](v)) is not None:
        return f"{problem}, got {v}"
    if f.type in (bool, "bool") and not isinstance(v, bool):
        return f"is a switch (True or False), got {v!r}"
    return None


def check_value(name: str, value) -> str | None:
    """`value_problem` of the option called `name`."""
    return value_problem(next(f for f in dataclasses.fields(RepairOptions) if f.name == name), value)


def ignored_by(method: str) -> list[dataclasses.Field]:
    """The options --method `method` does not use."""
    return [f for f in dataclasses.fields(RepairOptions)
            if f.metadata["methods"] is not None and method not in f.metadata["methods"]]


def check_applicable(method: str, given) -> None:
    """An option given explicitly (`given`: option names) that --method `method` does not use is a one-line error:
    a silently ignored setting would let a run differ from what its command line says."""
    for f in ignored_by(method):
        if f.name in given:
            raise UserError(f"{flag_of(f)} does not apply to --method {method} (only to "
                            f"{', '.join('--method ' + m for m in f.metadata['methods'])}); drop it or choose that "
                            f"method.")


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def option_fields(*groups: str, cls=None) -> list[dataclasses.Field]:
    cls = cls or RepairOptions
    known = {f.metadata["group"] for f in dataclasses.fields(cls)}
    bad = sorted(set(groups) - known)
    if bad:
        raise ValueError(f"unknown option group {bad[0]!r}")
    return [f for f in dataclasses.fields(cls) if f.metadata["group"] in groups]


def click_options(*groups: str, cls=None, only: tuple[str, ...] | None = None):
    """Decorator adding the click options of `groups` of `cls` (default RepairOptions; all its groups when none
    given; with `only`, just those fields), in declaration order; the command receives them as keyword arguments
    named like the fields (``RepairOptions(**those)``)."""
    import click

    cls = cls or RepairOptions
    fields = option_fields(*(groups or {f.metadata["group"] for f in dataclasses.fields(cls)}), cls=cls)
    fields = [f for f in fields if only is None or f.name in only]

    def decorate(fn):
        for f in reversed(fields):
            meta = f.metadata
            if isinstance(f.default, bool):
                fn = click.option(flag_of(f), f.name, is_flag=True, default=f.default, help=meta["help"])(fn)
                continue
            kind = (click.Choice(meta["choices"], case_sensitive=False) if meta["choices"]
                    else str if f.default is None else type(f.default))
            fn = click.option(flag_of(f), f.name, type=kind, default=f.default, show_default=True,
                              help=meta["help"])(fn)
        return fn

    return decorate


def one_device_option(f):
    """`--device` of a command whose forward holds the whole model on one device (probe, guard); checked by
    engine/state.check_one_device (a one-line error), unlike repair's, which also takes a list of GPUs."""
    import click

    return click.option("--device", default="auto", show_default=True,
                        help="Where the forward passes run, the whole model on one device: auto (cuda when "
                             "available), cpu or cuda (GPU 0; CUDA_VISIBLE_DEVICES picks another).")(f)
