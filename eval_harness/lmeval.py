"""The results in lm-evaluation-harness's layout, for the tools that read it (dashboards, leaderboards, diffing).

One folder per model, as `lm_eval --output_path DIR` writes (DIR/<model name sanitised>/):
- `results_hcnr-deploy.json`: `results` (task -> {"alias", "<metric>,none", "<metric>_stderr,none"}),
  `group_subtasks`, `configs` (task -> its config: data files, generation kwargs, metrics, detector), `versions`,
  `n-shot`, `higher_is_better`, `n-samples` (task -> {"original", "effective"}), `config` (model, model_args,
  limit, bootstrap_iters, gen_kwargs, random_seed), `git_hash`, `chat_template` / `chat_template_sha` (the served
  model's template, when its folder is readable here), `system_instruction` / `_sha`, `model_name`,
  `model_name_sanitized`;
- with samples: `samples_<task>_hcnr-deploy.jsonl`, one line per question: `doc_id`, `doc`, `target`,
  `arguments`, `resps`, `filtered_resps`, `filter`, `metrics`, `doc_hash`, `prompt_hash`, `target_hash` and each
  metric's per-question value.
File names end in `_hcnr-deploy` rather than lm-eval's timestamp, so they match its globs (`results_*.json`,
`samples_<task>_*.jsonl`) and a rerun writes the same bytes. `<metric>_stderr` is derived from the 95% bootstrap
percentile interval as (high - low) / 3.92; the interval itself is `<metric>_ci95,none`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

SUFFIX = "hcnr-deploy"
VERSION = 1.0  # of our task definitions (bump when a task's prompt or scoring changes)
HIGHER_IS_BETTER = {"f1": True, "rf_delta": True, "refusal_unanswerable": True, "refusal_answerable": False,
                    "answer_accuracy": True, "accuracy": True}


def sanitize(name: str) -> str:
    """lm-eval's model_name_sanitized: path separators and other unsafe characters as `__`."""
    return re.sub(r"[\"<>:/|\\?*\[\]]+", "__", name)


def _sha(obj) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def chat_template(identity: dict | None) -> str | None:
    """The chat template vLLM applies for a served model whose folder is readable here: an adapter's own, else its
    base's (tokenizer_config.json's `chat_template`, or chat_template.jinja); None when unknown."""
    for root in (identity or {}).get("root"), (identity or {}).get("parent_root"):
        if not root or not os.path.isabs(str(root)) or not Path(root).is_dir():
            continue
        jinja = Path(root) / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        cfg = Path(root) / "tokenizer_config.json"
        if cfg.is_file():
            template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
            if template:
                return template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return None


def git_hash() -> str | None:
    """The short commit of the hcnr-deploy checkout running, when it is one (lm-eval records its own the same way)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _metrics(entry: dict) -> dict:
    out = {}
    for k, v in entry.items():
        if k in HIGHER_IS_BETTER:
            out[f"{k},none"] = v
            ci = entry.get(f"{k}_ci95")
            out[f"{k}_stderr,none"] = round((ci[1] - ci[0]) / 3.92, 6) if ci else "N/A"
            out[f"{k}_ci95,none"] = ci
    return out


def model_results(results: dict, model: str, template: str | None, git: str | None) -> dict:
    """One model's results in lm-eval's schema (see the module docstring)."""
    cfg, tasks = results["config"], results["tasks"]
    names = [t for t in tasks if t in results["results"][model]]
    gen_kwargs = dict(cfg["sampling"], do_sample=cfg["sampling"].get("temperature", 0) > 0)
    per_task = {t: _metrics(results["results"][model][t]) for t in names}
    return {
        "results": {t: {"alias": t, **per_task[t]} for t in names},
        "group_subtasks": {t: [] for t in names},
        "configs": {t: {"task": t, "dataset_path": [f["path"] for f in tasks[t]["files"]],
                        "dataset_sha256": [f["sha256"] for f in tasks[t]["files"]], "output_type": "generate_until",
                        "generation_kwargs": gen_kwargs, "num_fewshot": cfg["icl"], "repeats": 1,
                        "metric_list": [{"metric": m.split(",")[0], "aggregation": "mean",
                                         "higher_is_better": HIGHER_IS_BETTER[m.split(",")[0]]}
                                        for m in per_task[t] if "_stderr" not in m and "_ci95" not in m],
                        "metadata": {"version": VERSION, "kind": tasks[t]["kind"],
                                     "detector": tasks[t].get("detector"), "api": cfg["api"]}}
                    for t in names},
        "versions": {t: VERSION for t in names},
        "n-shot": {t: cfg["icl"] for t in names},
        "higher_is_better": {t: {m.split(",")[0]: HIGHER_IS_BETTER[m.split(",")[0]] for m in per_task[t]
                                 if "_stderr" not in m and "_ci95" not in m} for t in names},
        "n-samples": {t: {"original": tasks[t]["n_available"], "effective": tasks[t]["n"]} for t in names},
        "config": {"model": f"openai-{cfg['api']}",
                   "model_args": f"model={model},base_url={cfg['endpoints'].get(model)}",
                   "batch_size": cfg["concurrency"], "limit": cfg["limit"], "bootstrap_iters": cfg["bootstrap"],
                   "gen_kwargs": gen_kwargs, "random_seed": cfg["seed"], "evaluator": "hcnr-deploy eval"},
        "git_hash": git,
        "chat_template": template,
        "chat_template_sha": None if template is None else _sha(template),
        "system_instruction": cfg.get("system_prompt"),
        "system_instruction_sha": None if cfg.get("system_prompt") is None else _sha(cfg["system_prompt"]),
        "model_name": model,
        "model_name_sanitized": sanitize(model),
        "hcnr_deploy_versions": results.get("versions"),
    }


def sample_lines(samples: list[dict], sampling: dict) -> list[dict]:
    """lm-eval's per-question sample records from the harness's samples of one model and task."""
    out = []
    for i, s in enumerate(samples):
        doc = {k: s[k] for k in ("id", "question", "unanswerable", "answers", "choices", "answer_index") if k in s}
        target = "" if s.get("unanswerable") else (s.get("answers") or [""])[0] if s.get("answers") else \
            s["choices"][s["answer_index"]] if s.get("choices") else ""
        prompt = s.get("messages", s.get("prompt"))
        line = {"doc_id": i, "doc": doc, "target": target,
                "arguments": {"gen_args_0": {"arg_0": prompt, "arg_1": sampling}},
                "resps": [[s["response"]]], "filtered_resps": [s["response"]], "filter": "none",
                "metrics": [], "doc_hash": _sha(doc), "prompt_hash": _sha(prompt), "target_hash": _sha(target)}
        if "verdict" in s:
            line["refused"] = bool(s["verdict"].get("refused"))
            line["metrics"].append("refused")
        if s.get("correct") is not None:
            line["correct"] = bool(s["correct"])
            line["metrics"].append("correct")
        out.append(line)
    return out


def _write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def folder_beside(out: Path) -> Path:
    """Where `eval --out results.json` puts the lm-eval layout: results-lm-eval/ beside it."""
    out = Path(out)
    return out.parent / f"{out.stem}-lm-eval"


def write_lmeval(results: dict, folder: Path, identities: dict | None = None) -> list[Path]:
    """folder/<model>/results_hcnr-deploy.json for every model, and its samples JSONL per task when `results` holds
    samples. `identities`: served name -> identity (eval_harness.identity), for the chat template."""
    folder = Path(folder)
    git = git_hash()
    written = []
    for model in results["results"]:
        d = folder / sanitize(model)
        d.mkdir(parents=True, exist_ok=True)
        res = model_results(results, model, chat_template((identities or {}).get(model)), git)
        _write(d / f"results_{SUFFIX}.json", json.dumps(res, indent=2, ensure_ascii=False) + "\n")
        written.append(d / f"results_{SUFFIX}.json")
        for task, samples in (results.get("samples") or {}).get(model, {}).items():
            lines = sample_lines(samples, results["config"]["sampling"])
            _write(d / f"samples_{task}_{SUFFIX}.jsonl",
                   "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
            written.append(d / f"samples_{task}_{SUFFIX}.jsonl")
    return written
