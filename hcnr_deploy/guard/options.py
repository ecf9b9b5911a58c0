"""The guard's options, declared once (as RepairOptions declares the repair's): `hcnr-deploy guard` takes them all,
the sweep's guard family takes the calibration ones; guard.json records them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hcnr_deploy.options import _opt, check_fields


def _rate(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v < 1
    return None if ok else "must be in [0, 1)"


def _share(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1
    return None if ok else "must be in (0, 1)"


def _block(v):
    return None if v == "auto" or (isinstance(v, str) and v.isdigit()) else "must be 'auto' or a block index"


def _per_class(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 2 else "must be an integer, at least 2"


@dataclass(frozen=True)
class GuardOptions:
    """The options of one guard fit (``hcnr-deploy guard --help`` shows the same text)."""

    calibration_dir: str | None = _opt(None, "calibration", "A benchmark folder (the layout `eval --data-dir` "
                                       "reads) whose questions label the probe's calibration, answerable and "
                                       "unanswerable of the same kind; disjoint from what you evaluate on. Without "
                                       "it the honesty data's refusal targets mark the unanswerable questions.")
    calibration_benchmarks: str | None = _opt(None, "calibration", "Benchmarks of --calibration-dir to use "
                                              "(default: every one present).")
    calibration_per_class: int = _opt(128, "calibration", "Questions per class and benchmark drawn from "
                                      "--calibration-dir (seeded).", check=_per_class)
    held_out: float = _opt(0.4, "calibration", "Share of the calibration questions held out (stratified) to "
                           "score each block's probe (AUROC) and set the threshold.", check=_share)
    refusal_text: str | None = _opt(None, "calibration", "The guarded endpoint's answer when it refuses (default: "
                                    "the honesty data's most common refusal response).")
    false_refusal: float = _opt(0.05, "guard", "Refusal rate allowed on held-out answerable calibration questions "
                                "(each kind: the honesty data's and the task prompts); sets the threshold.",
                                check=_rate)
    block: str = _opt("auto", "guard", "Decoder block whose state the probe reads (auto: the highest held-out "
                      "AUROC; the classifier then holds blocks 0..block).", check=_block)

    def __post_init__(self):
        check_fields(self)

    def settings(self) -> dict:
        return dataclasses.asdict(self)
