"""The SmolLM2 scenario on the real benchmarks: a split by question text, R-Tuning rows, a reading domain.

Split (`part_of`): every question of SelfAware, FalseQA, NEC and RefuNQ (read with the eval harness's
loaders) goes to `train`, `validation` or `evaluation` by a SHA-256 of its normalised text, so the parts
are disjoint by question text (a question asked twice lands twice in the same part) and stable across
machines and file orders. `write_part` writes a part back in the benchmarks' own formats, so the harness
scores it with `--data-dir PART_DIR` and its own detectors.

Base data (`rtuning_rows`, the paper's D_hon built the R-Tuning way): from the training part,
unanswerable questions answered with a refusal (`benchdata.honesty.REFUSALS`: each holds "The answer is unknown.", a
SelfAware phrase, and "not", an UnknownBench word, so every benchmark's detector recognises it) and
answerable ones with an answer: the gold answer where the file has one (SelfAware, RefuNQ), else the
model's own greedy answer (FalseQA, NEC; `greedy_answers`, first sentence, kept only if no detector
reads it as a refusal). More answers than refusals: a first probe here over-refused with equal shares.

Domain (`town_passage`, `rc_rows`): reading comprehension. Each prompt is a short generated passage
about a fictional town followed by a question answered by one phrase of that passage (its river, its
founding year, what it is known for, its festival month, its neighbour town, its population). The
fine-tune teaches a skill -- extract the asked span from the text in the prompt -- not facts to recall.
It does not collide with "questions about people who do not exist" (or with false premises or
unknowable questions) by construction: a domain question carries its own evidence, every asked fact is
in the prompt, no person is named, and none of the benchmarks' questions comes with a passage. So an
honest model can be both: answer from the passage, refuse what no passage supports. The fine-tune still
costs honesty (it is trained to answer every question, as real domain SFT is), which is the scenario's
point; held-out passages (new towns) measure the skill, not memorised strings.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from eval_harness.errors import UserError
from hcnr_deploy.benchdata.honesty import (REFUSAL_OF, _shuffled, first_sentence, is_refusal,  # noqa: F401
                                           rtuning_rows)
from hcnr_deploy.benchdata.split import hash_unit, normalise
from hcnr_deploy.scenario.data import qa

BENCHMARKS = ("selfaware", "falseqa", "nec", "refunq")
PARTS = ("train", "validation", "evaluation")
SPLIT = (0.50, 0.15, 0.35)  # shares of train / validation / evaluation (by hash, so approximate)
GOLD = ("selfaware", "refunq")  # files with gold answers; the others get the model's own greedy answer


def part_of(question: str) -> str:
    """`train` / `validation` / `evaluation` from `hcnr-deploy data split`'s hash_unit of the question, keyed by
    `normalise` (case and spaces; the command's key also drops punctuation and articles: this key is kept so the
    recorded smollm2-rc results stay reproducible)."""
    u = hash_unit(question, key=normalise)
    return PARTS[0] if u < SPLIT[0] else PARTS[1] if u < SPLIT[0] + SPLIT[1] else PARTS[2]


def load(src_dir: Path, benchmarks=BENCHMARKS) -> dict:
    """benchmark -> the eval harness's Items (file order)."""
    from eval_harness.benchmarks import load_benchmark

    return {b: load_benchmark(b, Path(src_dir)).items for b in benchmarks}


def split(items_by_benchmark: dict) -> dict:
    """part -> benchmark -> Items of that part, file order kept."""
    out = {p: {b: [] for b in items_by_benchmark} for p in PARTS}
    for b, items in items_by_benchmark.items():
        for it in items:
            out[part_of(it.question)][b].append(it)
    return out


def source_files(src_dir: Path, benchmarks=BENCHMARKS) -> list[Path]:
    from eval_harness.benchmarks import benchmark_files

    return [f for b in benchmarks for f in benchmark_files(b, Path(src_dir))]


def write_part(items_by_benchmark: dict, out_dir: Path):
    """One part in the benchmarks' own formats (SelfAware.json; {FalseQA,NEC,RefuNQ}_{answerable,unanswerable}.jsonl)."""
    out_dir = Path(out_dir)
    for b, items in items_by_benchmark.items():
        if b == "selfaware":
            rows = [{"question_id": it.id, "question": it.question, "answer": it.answers,
                     "answerable": not it.unanswerable, "source": it.meta.get("source")} for it in items]
            (out_dir / "selfaware").mkdir(parents=True, exist_ok=True)
            (out_dir / "selfaware" / "SelfAware.json").write_text(json.dumps({"example": rows}, indent=1))
            continue
        stem = {"falseqa": "FalseQA", "nec": "NEC", "refunq": "RefuNQ"}[b]
        for mode, unans in (("answerable", False), ("unanswerable", True)):
            rows = []
            for it in items:
                if it.unanswerable is unans:
                    label = 1 if unans else (it.answers if it.answers else 0)
                    rows.append({"prompt": it.question, "label": label, **it.meta})
            _write_jsonl(out_dir / "unknownbench" / stem / f"{stem}_{mode}.jsonl", rows)


def _write_jsonl(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def answer_candidates(train: dict, n_per_benchmark: int, seed: int) -> dict:
    """benchmark -> answerable training Items that need the model's own answer (FalseQA, NEC), a seeded draw."""
    return {b: _shuffled([it for it in items if not it.unanswerable], f"cand/{seed}/{b}")[:n_per_benchmark]
            for b, items in train.items() if b not in GOLD}


# ---------------------------------------------------------------------------------------------- the domain

RIVERS = ["Alder", "Brenn", "Corvel", "Dunmere", "Eskel", "Farrow", "Gilde", "Hollin", "Isk", "Jorra", "Kessel",
          "Lunn", "Morrow", "Nesh", "Orvel", "Pellan", "Quill", "Rusk", "Sorrel", "Tamsin", "Ulver", "Wend"]
PRODUCTS = ["cheese", "wool", "pottery", "glass", "cider", "rope", "honey", "salt", "paper", "lace", "copper",
            "barley", "clocks", "boats", "bells", "soap"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
RC_QUESTIONS = {  # attribute -> phrasings
    "river": ["Which river does {town} lie on?", "On what river is {town}?"],
    "year": ["In which year was {town} founded?", "When was {town} founded?"],
    "product": ["What is {town} known for?", "What is {town} famous for making?"],
    "month": ["In which month is the festival of {town} held?", "When does {town} hold its festival?"],
    "neighbour": ["What is the nearest town to {town}?", "Which town lies closest to {town}?"],
    "population": ["How many people live in {town}?", "What is the population of {town}?"],
}
RC_INSTRUCTION = "Answer the question from the passage."
_SYL = ["ba", "ke", "lo", "mi", "nu", "ra", "se", "ti", "vo", "wy", "dra", "fen", "gor", "hal", "mer", "ost",
        "pel", "quin", "sta", "tor"]


def town_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(_SYL) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in taken and len(name) > 3:
            taken.add(name)
            return name


def town_passage(rng: random.Random, taken: set[str]) -> tuple[str, dict[str, str]]:
    """A four-to-six sentence passage about a new fictional town, and its facts (attribute -> answer)."""
    town = town_name(rng, taken)
    facts = {"river": rng.choice(RIVERS), "year": str(rng.randint(1100, 1899)), "product": rng.choice(PRODUCTS),
             "month": rng.choice(MONTHS), "neighbour": town_name(rng, taken),
             "population": f"{rng.randint(2, 98) * 100:,}"}
    sentences = [f"{town} lies on the river {facts['river']}.", f"It was founded in {facts['year']}.",
                 f"The town is known for its {facts['product']}.", f"About {facts['population']} people live there.",
                 f"Its festival is held every {facts['month']}.", f"The nearest town is {facts['neighbour']}."]
    first, rest = sentences[0], sentences[1:]
    rng.shuffle(rest)
    return " ".join([first, *rest]), {"town": town, **facts}


def rc_rows(n_passages: int, questions_per_passage: int, seed: int, taken: set[str]) -> list[dict]:
    """`questions_per_passage` questions on each of `n_passages` new passages: prompt = instruction + passage +
    question, response = the answer phrase and a full stop."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_passages):
        passage, facts = town_passage(rng, taken)
        for attr in rng.sample(sorted(RC_QUESTIONS), questions_per_passage):
            q = rng.choice(RC_QUESTIONS[attr]).format(town=facts["town"])
            rows.append(qa(f"{RC_INSTRUCTION}\n\nPassage: {passage}\n\nQuestion: {q}", f"{facts[attr]}.",
                           kind="rc", answer=facts[attr], town=facts["town"]))
    return rows


# ---------------------------------------------------------------------------------------------- generation (I/O)


def greedy_answers(model_dir: Path, questions: list[str], max_new_tokens: int = 40, batch_size: int = 16,
                   progress=None) -> dict[str, str]:
    """question -> the model's greedy chat answer (transformers, left-padded batches, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    task = progress.add_task("base data: the model's own answers", total=len(questions)) if progress else None
    for i in range(0, len(questions), batch_size):
        batch = questions[i: i + batch_size]
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
                 for q in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for q, ids in zip(batch, gen[:, enc["input_ids"].shape[1]:]):
            out[q] = tok.decode(ids, skip_special_tokens=True).strip()
        if task is not None:
            progress.advance(task, len(batch))
    return out


# ---------------------------------------------------------------------------------------------- the data folder


def build_sets(parts: dict, self_answers: dict[str, str], *, rt_answers: int, rt_refusals: int, rc_train: int,
               rc_eval: int, eval_per_class: int, calib: int, seed: int) -> dict[str, list[dict]]:
    """The scenario's sets (the generated scenario's file names) from the split: base_train (R-Tuning rows),
    task_train / task_calib / domain_eval (reading comprehension), honesty_calib and rait_train (more training-part
    rows, none of base_train's questions), eval (held-out items, `eval_per_class` per class and benchmark)."""
    train = parts["train"]
    base = rtuning_rows(train, self_answers, rt_answers, rt_refusals, seed)
    used = {normalise(r["prompt"]) for r in base}
    n_ref = (3 * calib) // 4
    honesty_calib = rtuning_rows(train, self_answers, calib - n_ref, n_ref, seed + 1, exclude=used)
    used |= {normalise(r["prompt"]) for r in honesty_calib}
    rait = rtuning_rows(train, self_answers, calib, 4 * calib, seed + 2, exclude=used)
    taken: set[str] = set()
    task_train = rc_rows(rc_train // 3, 3, seed + 3, taken)
    domain_eval = rc_rows(rc_eval, 1, seed + 4, taken)  # new towns: held-out passages
    task_calib = _shuffled(task_train, f"task_calib/{seed}")[:calib]
    ev = []
    for b, items in sorted(parts["evaluation"].items()):
        for unans in (True, False):
            ev += [{"question": it.question, "answer": [] if unans else (it.answers or []), "unknown": unans,
                    "source": b, "category": b}
                   for it in _shuffled([i for i in items if i.unanswerable is unans], f"eval/{seed}/{b}")
                   [:eval_per_class]]
    sets = {"base_train": _shuffled(base, f"base/{seed}"), "task_train": task_train, "honesty_calib": honesty_calib,
            "task_calib": task_calib, "rait_train": rait, "domain_eval": domain_eval, "eval": ev}
    check_disjoint(sets, parts)
    return sets


def check_disjoint(sets: dict, parts: dict):
    """No training or calibration question is a validation or evaluation question (by normalised text)."""
    held = {normalise(it.question) for p in ("validation", "evaluation") for items in parts[p].values()
            for it in items}
    for name in ("base_train", "honesty_calib", "rait_train"):
        clash = [r["prompt"] for r in sets[name] if normalise(r["prompt"]) in held]
        if clash:
            raise AssertionError(f"{name}: {len(clash)} questions also held out, e.g. {clash[0]!r}")
    towns = {r["town"] for r in sets["task_train"]}
    if any(r["town"] in towns for r in sets["domain_eval"]):
        raise AssertionError("domain_eval shares a town with task_train")


def write(out_dir: Path, sets: dict, parts: dict, meta: dict) -> None:
    """The generated scenario's files (so every later step reads them unchanged) plus `validation/` and
    `heldout/`: those parts in the benchmarks' formats, for the harness's `--data-dir`."""
    from hcnr_deploy.scenario.data import write_jsonl

    out_dir = Path(out_dir)
    for name in ("base_train", "task_train", "honesty_calib", "task_calib", "rait_train"):
        write_jsonl(out_dir / f"{name}.jsonl", [{"prompt": r["prompt"], "response": r["response"]} for r in sets[name]])
    write_jsonl(out_dir / "domain.jsonl", [{"question": r["prompt"], "answers": [r["answer"]]}
                                           for r in sets["domain_eval"]])
    write_jsonl(out_dir / "kuq" / "knowns_unknowns.jsonl", sets["eval"])
    write_part(parts["validation"], out_dir / "validation")
    write_part(parts["evaluation"], out_dir / "heldout")
    counts = {k: len(v) for k, v in sets.items()}
    counts["parts"] = {p: {b: [sum(1 for i in items if i.unanswerable), sum(1 for i in items if not i.unanswerable)]
                           for b, items in bs.items()} for p, bs in parts.items()}
    (out_dir / "scenario.json").write_text(json.dumps({**meta, "counts": counts}, indent=2, sort_keys=True))


def default_source() -> Path:
    """$HCNR_DEPLOY_BENCHMARKS, else ../shared/data beside the project's checkout."""
    import os

    env = os.environ.get("HCNR_DEPLOY_BENCHMARKS")
    path = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not path.is_dir():
        raise UserError(f"the SmolLM2 scenario reads SelfAware, FalseQA, NEC and RefuNQ from {path}, which is not a "
                        "folder; set HCNR_DEPLOY_BENCHMARKS to the folder holding them")
    return path


@dataclass(frozen=True)
class RealSize:
    """How much of the real benchmarks the SmolLM2 scenario uses (Recipe.size for the real-data recipes)."""

    rt_answers: int = 300      # base: answerable training questions with an answer (shared over the 4 benchmarks)
    rt_refusals: int = 150     # base: unanswerable training questions with a refusal
    candidates: int = 200      # per FalseQA / NEC: answerable training questions the model answers itself
    rc_train: int = 660        # reading-comprehension training rows (3 questions per passage)
    rc_eval: int = 200         # held-out passages, one question each
    eval_per_class: int = 75   # kuq/knowns_unknowns.jsonl: held-out items per class and benchmark (the demo's set)
    calib: int = 128           # repair examples per set
