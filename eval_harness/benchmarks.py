"""Benchmark loaders: SelfAware, KUQ, UnknownBench (FalseQA / NEC / RefuNQ) and the user's domain JSONL.

Every loader returns a list of `Item`s in file order. `unanswerable` is the honesty label (None for domain items),
`answers` the gold answers where the benchmark has them, `choices`/`answer_index` for multiple-choice domain items.
Files are looked up under `--data-dir` by their original names, in sub-folders too.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from eval_harness.errors import UserError
from eval_harness.jsonl import read_jsonl

HONESTY_BENCHMARKS = ("selfaware", "kuq", "falseqa", "nec", "refunq")

SOURCES = {
    "selfaware": "https://github.com/yinzhangyue/SelfAware (data/SelfAware.json)",
    "kuq": "https://huggingface.co/datasets/amayuelas/KUQ (knowns_unknowns.jsonl)",
    "falseqa": "https://github.com/genglinliu/UnknownBench (data/FalseQA/)",
    "nec": "https://github.com/genglinliu/UnknownBench (data/NEC/)",
    "refunq": "https://github.com/genglinliu/UnknownBench (data/RefuNQ/)",
}
UNKNOWNBENCH_STEMS = {"falseqa": "FalseQA", "nec": "NEC", "refunq": "RefuNQ"}


@dataclass
class Item:
    benchmark: str
    id: str
    question: str
    unanswerable: bool | None = None
    answers: list[str] | None = None
    choices: list[str] | None = None
    answer_index: int | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Benchmark:
    name: str
    items: list[Item]
    files: list[Path]
    kind: str = "honesty"  # "honesty" | "domain"

    @property
    def n_unanswerable(self) -> int:
        return sum(1 for it in self.items if it.unanswerable)

    @property
    def n_answerable(self) -> int:
        return sum(1 for it in self.items if it.unanswerable is False)


def _require(row: dict, keys: tuple[str, ...], path: Path, where: str):
    missing = [k for k in keys if k not in row]
    if missing:
        raise UserError(f"{path}: {where} lacks field(s) {', '.join(missing)}; is this the right file?")


def _as_answers(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        answers = [str(a) for a in value if a is not None and str(a).strip()]
        return answers or None
    return [str(value)]


def load_selfaware(path: Path) -> list[Item]:
    """SelfAware.json: `{"example": [{question_id, question, answer, answerable, source}]}`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}); expected SelfAware's {{\"example\": [...]}}") from None
    if not isinstance(data, dict) or not isinstance(data.get("example"), list):
        raise UserError(f"{path}: expected a JSON object with an \"example\" list (SelfAware's format)")
    items = []
    for i, ex in enumerate(data["example"]):
        _require(ex, ("question", "answerable"), path, f"example {i}")
        items.append(Item("selfaware", str(ex.get("question_id", i)), ex["question"],
                          unanswerable=not bool(ex["answerable"]), answers=_as_answers(ex.get("answer")),
                          meta={"source": ex.get("source")}))
    return items


def load_kuq(path: Path) -> list[Item]:
    """knowns_unknowns.jsonl: `{"question", "answer": [...], "unknown": bool, "source", "category"}` per line."""
    items = []
    for i, row in enumerate(read_jsonl(path)):
        _require(row, ("question", "unknown"), path, f"line {i + 1}")
        unknown = bool(row["unknown"])
        items.append(Item("kuq", str(i), row["question"], unanswerable=unknown,
                          answers=None if unknown else _as_answers(row.get("answer")),
                          meta={k: row[k] for k in ("source", "category") if k in row}))
    return items


def load_unknownbench(name: str, answerable: Path, unanswerable: Path) -> list[Item]:
    """UnknownBench `{FalseQA,NEC,RefuNQ}_{answerable,unanswerable}.json[l]`: `{"prompt", "label"}` per line.

    RefuNQ's answerable labels are the gold answers; every other label is only the class.
    """
    items = []
    for mode, path in (("a", answerable), ("u", unanswerable)):
        for i, row in enumerate(read_jsonl(path)):
            _require(row, ("prompt",), path, f"line {i + 1}")
            gold = row.get("label") if (mode == "a" and isinstance(row.get("label"), (list, str))) else None
            items.append(Item(name, f"{mode}{i}", row["prompt"], unanswerable=mode == "u",
                              answers=_as_answers(gold),
                              meta={"category": row["category"]} if "category" in row else {}))
    return items


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def load_domain(path: Path, name: str | None = None) -> list[Item]:
    """The user's domain task, JSONL: `{"question", "answers": [...]}` (QA) or
    `{"question", "choices": [...], "answer"}` (multiple choice; answer = index, letter or the choice's text)."""
    name = name or Path(path).stem
    items = []
    for i, row in enumerate(read_jsonl(path)):
        where = f"line {i + 1}"
        _require(row, ("question",), path, where)
        if "choices" in row:
            _require(row, ("answer",), path, where)
            choices = [str(c) for c in row["choices"]]
            if not 2 <= len(choices) <= len(LETTERS):
                raise UserError(f"{path}: {where}: \"choices\" must list 2 to 26 options")
            items.append(Item(name, str(i), row["question"], choices=choices,
                              answer_index=_choice_index(row["answer"], choices, path, where)))
        elif "answers" in row or "answer" in row:
            answers = _as_answers(row.get("answers", row.get("answer")))
            if not answers:
                raise UserError(f"{path}: {where}: empty \"answers\"")
            items.append(Item(name, str(i), row["question"], answers=answers))
        else:
            raise UserError(f"{path}: {where}: needs \"answers\" (QA) or \"choices\" + \"answer\" (multiple choice)")
    if not items:
        raise UserError(f"{path}: no questions found")
    return items


def _choice_index(answer, choices: list[str], path, where) -> int:
    if isinstance(answer, bool):
        pass
    elif isinstance(answer, int) and 0 <= answer < len(choices):
        return answer
    elif isinstance(answer, str):
        a = answer.strip()
        if len(a) == 1 and a.upper() in LETTERS[: len(choices)]:
            return LETTERS.index(a.upper())
        if a in choices:
            return choices.index(a)
    raise UserError(f"{path}: {where}: \"answer\" {answer!r} is neither a choice index, a letter nor a choice's text")


# ---- finding files -----------------------------------------------------------------------------------------------


def find_file(data_dir: Path, names: tuple[str, ...], benchmark: str) -> Path:
    """The shallowest file under data_dir named one of `names`; a clear error when none or several tie."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder; point it at the folder holding the benchmark files")
    hits = sorted({p for n in names for p in data_dir.rglob(n) if p.is_file()},
                  key=lambda p: (len(p.relative_to(data_dir).parts), str(p)))
    if not hits:
        raise UserError(f"{benchmark}: no {' or '.join(names)} under {data_dir} (sub-folders searched); "
                        f"get it from {SOURCES[benchmark]} or drop {benchmark} from --benchmarks")
    depth = len(hits[0].relative_to(data_dir).parts)
    tied = [p for p in hits if len(p.relative_to(data_dir).parts) == depth]
    if len(tied) > 1:
        raise UserError(f"{benchmark}: several candidate files under {data_dir}: "
                        f"{', '.join(str(p) for p in tied)}; keep one or point --data-dir at a narrower folder")
    return hits[0]


def benchmark_files(name: str, data_dir: Path) -> list[Path]:
    if name == "selfaware":
        return [find_file(data_dir, ("SelfAware.json",), name)]
    if name == "kuq":
        return [find_file(data_dir, ("knowns_unknowns.jsonl", "knowns_unknowns.json"), name)]
    stem = UNKNOWNBENCH_STEMS[name]
    return [find_file(data_dir, (f"{stem}_{mode}.jsonl", f"{stem}_{mode}.json"), name)
            for mode in ("answerable", "unanswerable")]


def present_benchmarks(data_dir: Path, names=HONESTY_BENCHMARKS) -> dict[str, list[Path]]:
    """name -> its files under data_dir (searched in sub-folders), for each of `names` whose files are all there, in
    `names` order: the one rule for which benchmarks a folder holds."""
    out = {}
    for name in names:
        try:
            out[name] = benchmark_files(name, Path(data_dir))
        except UserError:
            continue
    return out


def load_benchmark(name: str, data_dir: Path) -> Benchmark:
    if name not in HONESTY_BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; choose from {', '.join(HONESTY_BENCHMARKS)} "
                        "(a domain task goes in --domain PATH)")
    files = benchmark_files(name, data_dir)
    if name == "selfaware":
        items = load_selfaware(files[0])
    elif name == "kuq":
        items = load_kuq(files[0])
    else:
        items = load_unknownbench(name, *files)
    return Benchmark(name, items, files)


def load_domain_benchmark(path: Path, name: str | None = None) -> Benchmark:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--domain {path}: no such file; give a JSONL of {{\"question\", \"answers\"}} "
                        "or {\"question\", \"choices\", \"answer\"} objects")
    return Benchmark(name or path.stem, load_domain(path, name), [path], kind="domain")


def parse_benchmarks(spec: str) -> list[str]:
    """`"selfaware,kuq"` -> names, in order, validated; `"none"` or `""` -> []."""
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in HONESTY_BENCHMARKS]
    if unknown:
        raise UserError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(HONESTY_BENCHMARKS)} "
                        "or 'none' (a domain task goes in --domain PATH)")
    return list(dict.fromkeys(names))


# ---- sampling ----------------------------------------------------------------------------------------------------


def stratified_sample(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """At most `limit` items, drawn with `seed`, keeping the unanswerable share (each class >= 1 when limit >= 2).

    The sample keeps file order, so the same (file, limit, seed) always gives the same list, and samples are
    nested (raising --limit keeps every item already asked, so the response cache still serves them).
    """
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    groups: dict[object, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.unanswerable, []).append(i)
    keys = sorted(groups, key=str)
    quota = {k: limit * len(groups[k]) / len(items) for k in keys}
    take = {k: int(quota[k]) for k in keys}
    # largest remainders first; then make sure every class appears when there is room for it
    for k in sorted(keys, key=lambda k: (take[k] - quota[k], str(k)))[: limit - sum(take.values())]:
        take[k] += 1
    if limit >= len(keys):
        for k in keys:
            if take[k] == 0:
                donor = max(keys, key=lambda j: take[j])
                take[donor] -= 1
                take[k] = 1
    rng = random.Random(seed)
    chosen = []
    for k in keys:  # a full seeded shuffle per class, then a prefix: a larger limit keeps a smaller one's items
        chosen += rng.sample(groups[k], len(groups[k]))[: take[k]]
    return [items[i] for i in sorted(chosen)]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
