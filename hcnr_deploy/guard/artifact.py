"""The guard folder: `guard.json` (what the guard is and whom it belongs to), `classifier/` (a vLLM-servable
`*ForSequenceClassification` checkpoint), README.md. Reading, writing and checking it; no torch here.

guard.json fields:
  format             "hcnr-guard/1"
  block              decoder block l whose output (after the model's final norm) the probe reads
  threshold          refuse when the classifier's raw score (w . norm(h_l) + b, the probe's decision function) > it
  false_refusal_target / false_refusal_calibration   the stated rate on held-out answerable calibration questions,
                     and the rate the threshold reaches there
  calibration_auroc  the probe's AUROC on held-out calibration questions (unanswerable = positive)
  refusal_text       the guarded endpoint's answer when it refuses
  base, finetuned    as the user gave them; fingerprints: {"base", "finetuned"} (content_fingerprint, None for hub ids)
  classifier         the classifier's subfolder ("classifier")
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eval_harness.errors import UserError

GUARD_FORMAT = "hcnr-guard/1"
GUARD_FILE = "guard.json"
CLASSIFIER_DIR = "classifier"
_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole; larger: size, head and tail


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(8 << 20))
            f.seek(size - (8 << 20))
            h.update(f.read(8 << 20))
    return h.hexdigest()


def content_fingerprint(path: str | Path) -> str | None:
    """sha256 over a model or adapter folder's weight files and configs (by content: a copied folder keeps its
    fingerprint; files over 64 MiB contribute their size and first and last 8 MiB). None for a hub id."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.is_file() and (f.name.endswith(_WEIGHTS) or f.name in ("config.json", "adapter_config.json")):
            h.update(f.name.encode())
            h.update(_file_digest(f).encode())
    return h.hexdigest()


@dataclass
class GuardSpec:
    block: int
    threshold: float
    refusal_text: str
    base: str
    finetuned: str
    fingerprints: dict
    calibration_auroc: float | None = None
    false_refusal_target: float | None = None
    false_refusal_calibration: float | None = None
    num_blocks: int | None = None
    classifier: str = CLASSIFIER_DIR
    format: str = GUARD_FORMAT
    extra: dict = field(default_factory=dict)  # fit details: features, probe, data sizes, per-block AUROCs


def write_spec(folder: Path, spec: GuardSpec):
    (Path(folder) / GUARD_FILE).write_text(json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n")


def read_spec(folder: str | Path, option: str = "--guard") -> GuardSpec:
    """guard.json of `folder`, checked: a one-line UserError for a missing folder, file or classifier, another
    format, or a threshold that is not a finite number."""
    folder = Path(folder).expanduser()
    f = folder / GUARD_FILE
    if not f.is_file():
        raise UserError(f"{option} {folder}: no {GUARD_FILE}; pass a folder written by `hcnr-deploy guard`.")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{option} {f}: not valid JSON ({e.msg}, line {e.lineno}); rebuild it with "
                        f"`hcnr-deploy guard`.") from None
    if raw.get("format") != GUARD_FORMAT:
        raise UserError(f"{option} {f}: format {raw.get('format')!r}, expected {GUARD_FORMAT!r}; rebuild it with "
                        f"this version's `hcnr-deploy guard`.")
    known = set(GuardSpec.__dataclass_fields__)
    spec = GuardSpec(**{k: v for k, v in raw.items() if k in known})
    t = spec.threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise UserError(f"{option} {f}: threshold {t!r} is not a finite number; rebuild the guard or set a "
                        f"threshold in the probe's score units (see guard.json's extra.thresholds).")
    if not isinstance(spec.block, int) or spec.block < 0 or (spec.num_blocks and spec.block >= spec.num_blocks):
        raise UserError(f"{option} {f}: block {spec.block!r} is out of range for a model of "
                        f"{spec.num_blocks} blocks; rebuild the guard.")
    cls = folder / spec.classifier
    if not (cls / "config.json").is_file():
        raise UserError(f"{option} {folder}: the classifier {cls} is missing (no config.json); rebuild the guard "
                        f"with `hcnr-deploy guard`.")
    return spec


def check_belongs(spec: GuardSpec, finetuned: str | Path, option: str = "--guard", role: str = "finetuned"):
    """One-line error when `finetuned` (the model the guard would gate) is not the one the guard was fit on."""
    expected = spec.fingerprints.get(role)
    got = content_fingerprint(finetuned)
    if expected is None or got is None:
        if str(finetuned) != str(getattr(spec, role)):
            raise UserError(f"{option}: this guard belongs to {role} {getattr(spec, role)!r}, not {finetuned!r}; "
                            f"fit a guard for this model with `hcnr-deploy guard`.")
        return
    if got != expected:
        raise UserError(f"{option}: this guard was fit on another {role} than {finetuned} (its weights differ from "
                        f"{getattr(spec, role)!r}'s); fit a guard for this model with `hcnr-deploy guard`.")
