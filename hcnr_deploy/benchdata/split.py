"""`hcnr-deploy data split`: a benchmark folder cut by a hash of each question's text into a calibration half and
an evaluation half, each a data folder in the source's own layout (same relative paths, same formats, every field
of every row kept), so every command reads either half as it reads the source.

The part of a question is a function of its normalised text alone (and the seed): a question asked in two files
or two benchmarks lands in the same part, so the halves are disjoint by question text (SQuAD's normalisation, the
sweep's overlap check's), and the split is the same on every machine and in every file order. The smollm2-rc
scenario (hcnr_deploy/scenario/realdata.py) uses the same hash with a finer key (case and spaces only), kept so its
recorded results stay reproducible.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from eval_harness.atomic import refuse_overlap
from eval_harness.errors import UserError
from eval_harness.jsonl import read_jsonl
from hcnr_deploy.io.atomic import AtomicDir

PARTS = ("calibration", "evaluation")
SPLIT_FILE = "split.json"
QUESTION_FIELD = {"selfaware": "question", "kuq": "question", "falseqa": "prompt", "nec": "prompt",
                  "refunq": "prompt"}


def normalise(question: str) -> str:
    """Lower case, whitespace runs as one space: the text a question is compared and hashed by."""
    return " ".join(question.lower().split())


def question_key(question: str) -> str:
    """What makes two questions the same: SQuAD's normalisation (case, punctuation, articles, spaces), the one the
    sweep's overlap check compares (sweep.check_overlap), so no question of one half is a question of the other."""
    from eval_harness.metrics import normalize_answer

    return normalize_answer(question)


def hash_unit(question: str, seed: int = 0, key=question_key) -> float:
    """u in [0, 1): the first 8 bytes of sha256(key(question)) (seed 0), or of "SEED:key(question)", as a fraction
    of 2^64."""
    text = key(question) if seed == 0 else f"{seed}:{key(question)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2 ** 64


def part_of(question: str, eval_share: float, seed: int = 0, key=question_key) -> str:
    """`calibration` when hash_unit < 1 - eval_share, else `evaluation`."""
    return PARTS[0] if hash_unit(question, seed, key) < 1 - eval_share else PARTS[1]


def found_benchmarks(data_dir: Path, benchmarks=None) -> dict[str, list[Path]]:
    """benchmark -> its files under data_dir: those named (every file must be there), else every benchmark found."""
    from eval_harness.benchmarks import benchmark_files, parse_benchmarks, present_benchmarks

    if not Path(data_dir).is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder; point it at the folder holding the benchmark files "
                        f"(`hcnr-deploy data fetch` downloads them)")
    if benchmarks:
        return {b: benchmark_files(b, data_dir) for b in parse_benchmarks(benchmarks)}
    out = present_benchmarks(data_dir)
    if not out:
        raise UserError(f"--data-dir {data_dir}: no SelfAware, KUQ, FalseQA, NEC or RefuNQ files found; "
                        f"`hcnr-deploy data fetch` downloads them")
    return out


def _read_rows(path: Path):
    """(rows, writer): the file's rows and a function writing rows back in the file's format."""
    if path.name == "SelfAware.json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["example"], lambda rows: json.dumps({**data, "example": rows}, indent=1, ensure_ascii=False) + "\n"
    rows = read_jsonl(path)
    return rows, lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def split_folder(data_dir: Path, out: Path, *, seed: int = 0, eval_share: float = 0.5, benchmarks=None) -> dict:
    """Write out/calibration and out/evaluation (the source's layout) and out/split.json; return split.json's dict.
    Atomic: `out` appears complete or not at all."""
    if not 0 < eval_share < 1:
        raise UserError(f"--eval-share must be between 0 and 1 (exclusive), got {eval_share}")
    data_dir, out = Path(data_dir), Path(out)
    if out.exists():
        raise UserError(f"--out {out} exists; choose a new folder")
    files = found_benchmarks(data_dir, benchmarks)
    refuse_overlap(out.resolve(), [("--data-dir", data_dir.resolve())], "the split")
    counts: dict = {}
    with AtomicDir(out) as tmp:
        for b, paths in files.items():
            key = QUESTION_FIELD[b]
            for path in paths:
                rows, render = _read_rows(path)
                parts = {p: [] for p in PARTS}
                for r in rows:
                    parts[part_of(str(r[key]), eval_share, seed)].append(r)
                rel = path.relative_to(data_dir)
                for p, part_rows in parts.items():
                    target = tmp / p / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(render(part_rows), encoding="utf-8")
                    counts.setdefault(b, {}).setdefault(p, 0)
                    counts[b][p] += len(part_rows)
        meta = {"source": str(data_dir.resolve()), "seed": seed, "eval_share": eval_share,
                "hash": "sha256 of the SQuAD-normalised question" + ("" if seed == 0 else f", prefixed '{seed}:'"),
                "questions": counts}
        (tmp / SPLIT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def evaluation_half(data_dir: Path) -> bool:
    """Whether data_dir is the evaluation half of a `data split` (its parent holds split.json)."""
    data_dir = Path(data_dir).resolve()
    return data_dir.name == PARTS[1] and (data_dir.parent / SPLIT_FILE).is_file()
