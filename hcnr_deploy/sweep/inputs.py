"""The sweep's evaluation inputs: the held-out honesty and domain questions (a benchmark folder or one KUQ-format
JSONL), the check that none of them is a calibration prompt, and the longest prompt in tokens (for the scoring
server's --max-model-len)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from eval_harness.errors import UserError


def eval_tasks(eval_honesty: Path, eval_domain: Path, benchmarks, limit, seed, work: Path):
    """(tasks, data_dir, benchmark names): `eval_honesty` is a benchmark folder (read as `eval --data-dir` reads
    it) or one KUQ-format JSONL (copied to work/eval-data/knowns_unknowns.jsonl, scored as "kuq")."""
    from eval_harness.benchmarks import parse_benchmarks, present_benchmarks
    from eval_harness.run import load_tasks

    eval_honesty = Path(eval_honesty)
    if eval_honesty.is_file():
        if benchmarks and parse_benchmarks(benchmarks) not in ([], ["kuq"]):
            raise UserError(f"--eval-honesty {eval_honesty} is one JSONL (KUQ format); --benchmarks applies to a "
                            f"folder of benchmark files only")
        data_dir = work / "eval-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        target = data_dir / "knowns_unknowns.jsonl"
        if not target.exists() or target.read_bytes() != eval_honesty.read_bytes():
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(eval_honesty, tmp)
            os.replace(tmp, target)
        names = ["kuq"]
    elif eval_honesty.is_dir():
        data_dir = eval_honesty
        names = parse_benchmarks(benchmarks) if benchmarks else list(present_benchmarks(data_dir))
        if not names:
            raise UserError(f"--eval-honesty {eval_honesty}: no SelfAware, KUQ, FalseQA, NEC or RefuNQ files found; "
                            f"point it at the folder holding them or at one KUQ-format JSONL")
    else:
        raise UserError(f"--eval-honesty {eval_honesty}: no such file or folder; give a benchmark folder or a "
                        f"KUQ-format JSONL ({{\"question\", \"answer\", \"unknown\"}} per line)")
    if not Path(eval_domain).is_file():
        raise UserError(f"--eval-domain {eval_domain}: no such file; give a JSONL of {{\"question\", \"answers\"}} "
                        f"or {{\"question\", \"choices\", \"answer\"}} objects")
    tasks = load_tasks(names, data_dir, [Path(eval_domain)], limit, seed)
    return tasks, data_dir, names


def check_overlap(tasks, calibration: dict[str, Path], num_samples: int):
    """An evaluation question that is also a calibration prompt is an error naming how many overlap."""
    from eval_harness.metrics import normalize_answer
    from hcnr_deploy.data import load_jsonl

    prompts = {}
    for label, path in calibration.items():
        for ex in load_jsonl(path, num_samples):
            user = [m["content"] for m in ex.messages if m["role"] == "user"]
            if user:
                prompts.setdefault(normalize_answer(user[-1]), label)
    hits = [(t.name, it.question, prompts[q]) for t, _ in tasks for it in t.items
            if (q := normalize_answer(it.question)) in prompts]
    if hits:
        where = ", ".join(f"{n} in {t}" for t, n in _count([h[0] for h in hits]).items())
        name, q, label = hits[0]
        raise UserError(f"{len(hits)} evaluation question(s) also appear in the calibration data ({where}; e.g. "
                        f"{q[:60]!r} in the {label} data): scores on them say nothing about held-out questions; "
                        f"remove them from the evaluation or the calibration files")


def _count(xs):
    out: dict = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def longest_prompt_tokens(tasks, model_dir: Path) -> int:
    """Tokens of the longest prompt the scoring sends: each question as the eval harness asks it (one user turn),
    through the model's chat template with the generation prompt, as vLLM renders it (the plain prompt when the
    tokenizer has no template)."""
    from transformers import AutoTokenizer

    from eval_harness.prompts import build_messages, render_plain

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    longest = 0
    for task, _ in tasks:
        for item in task.items:
            messages = build_messages(item)
            text = (tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                    if tok.chat_template else render_plain(messages))
            longest = max(longest, len(tok(text, add_special_tokens=not tok.chat_template)["input_ids"]))
    return longest


def context_limit(model_dir: Path) -> int | None:
    """The model's own context length (config.json's max_position_embeddings, also under text_config)."""
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
