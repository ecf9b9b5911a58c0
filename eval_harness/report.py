"""results.json (built like lm-evaluation-harness's results files) and the terminal tables.

results.json holds no timestamps and no cache statistics: the same inputs, seed and responses give the same bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from eval_harness.atomic import write_text_atomic
from eval_harness.benchmarks import file_sha256
from eval_harness.metrics import (accuracy_arrays, bootstrap_replicates, honesty_arrays,
                                  percentile_ci, stable_seed, undefined_reasons)

SCHEMA = "hcnr-deploy.eval/1"


def _num(x):
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


def _ci(pair):
    return None if any(math.isnan(float(v)) for v in pair) else [round(float(v), 6) for v in pair]


def task_metrics(task, models, records, n_boot, seed):
    """Point values (M,), bootstrap replicates (M, B) per metric, and notes, for one task over all models.

    Items the server rejected (HTTP 400/422) for any model are left out of every model's metrics, so the
    comparison stays paired."""
    keep = [all(records[m][task.name][j]["completion"].error is None for m in models) for j in range(len(task.items))]
    recs = [[r for r, k in zip(records[m][task.name], keep) if k] for m in models]
    notes = []
    if not all(keep):
        notes.append(f"{keep.count(False)} item(s) rejected by the server (e.g. longer than the context) are left "
                     "out of every model's metrics; see --log-samples for the errors")
    if task.kind == "honesty":
        refused = np.array([[r["verdict"]["refused"] for r in rs] for rs in recs], dtype=bool)
        unans = np.array([bool(r["item"].unanswerable) for r in recs[0]], dtype=bool)
        correct = np.array([[np.nan if r["correct"] is None else float(r["correct"]) for r in rs] for rs in recs],
                           dtype=np.float32)
        point = honesty_arrays(refused, unans, correct)
        reps = bootstrap_replicates(honesty_arrays, {"refused": refused, "unanswerable": unans, "correct": correct},
                                    unans, n_boot, stable_seed(seed, task.name))
        if np.isnan(correct).all():
            point.pop("answer_accuracy")
            reps.pop("answer_accuracy")
        return point, reps, notes + undefined_reasons(unans), keep
    correct = np.array([[float(r["correct"]) for r in rs] for rs in recs], dtype=np.float32)
    point = accuracy_arrays(correct)
    reps = bootstrap_replicates(accuracy_arrays, {"correct": correct}, np.zeros(correct.shape[1]), n_boot,
                                stable_seed(seed, task.name))
    return point, reps, notes, keep


def build_results(targets, tasks, records, config, versions, n_boot, seed, log_samples) -> dict:
    models = [t.model for t in targets]
    results = {m: {} for m in models}
    diffs = {m: {} for m in models[1:]}
    task_info = {}
    averaged = {"f1": [], "rf_delta": []}  # per metric: [(point (M,), replicates (M, B)) per benchmark]
    for task, n_available in tasks:
        point, reps, notes, keep = task_metrics(task, models, records, n_boot, seed)
        info = {"kind": task.kind, "files": [{"path": str(p), "sha256": file_sha256(p)} for p in task.files],
                "n_available": n_available, "n": len(task.items)}
        if sum(keep) < len(task.items):
            info["n_scored"] = sum(keep)
        if task.kind == "honesty":
            info.update(n_unanswerable=task.n_unanswerable, n_answerable=task.n_answerable,
                        detector=records[models[0]][task.name][0]["verdict"]["detector"] if task.items else None)
            for k in averaged:
                if not np.isnan(point[k]).any():
                    averaged[k].append((point[k], reps[k]))
        if notes:
            info["notes"] = notes
        task_info[task.name] = info
        for i, m in enumerate(models):
            recs = records[m][task.name]
            entry = {"n": sum(keep)}
            errors = sum(r["completion"].error is not None for r in recs)
            if errors:
                entry["n_errors"] = errors
            for k in point:
                entry[k] = _num(point[k][i])
                entry[f"{k}_ci95"] = _ci(percentile_ci(reps[k][i]))
            if task.kind == "honesty":
                entry["n_refused"] = int(sum(r["verdict"]["refused"] for r, k in zip(recs, keep) if k))
            results[m][task.name] = entry
            if i:
                diffs[m][task.name] = {k: {"diff": _num(point[k][i] - point[k][0]),
                                           "ci95": _ci(percentile_ci(reps[k][i] - reps[k][0]))} for k in point}
    # the average over honesty benchmarks; its replicates average the benchmarks' (independent) replicates
    for k, per_bench in averaged.items():
        if len(per_bench) < 2:
            continue
        p = np.mean([pt for pt, _ in per_bench], axis=0)
        r = np.mean([rp for _, rp in per_bench], axis=0)
        for i, m in enumerate(models):
            results[m].setdefault("average", {"n_benchmarks": len(per_bench)})
            results[m]["average"][k] = _num(p[i])
            results[m]["average"][f"{k}_ci95"] = _ci(percentile_ci(r[i]))
            if i:
                diffs[m].setdefault("average", {})[k] = {"diff": _num(p[i] - p[0]),
                                                         "ci95": _ci(percentile_ci(r[i] - r[0]))}
    out = {
        "schema": SCHEMA,
        "results": results,
        "differences": {"reference": models[0], "models": diffs} if len(models) > 1 else None,
        "tasks": task_info,
        "config": config,
        "versions": versions,
    }
    if log_samples:
        out["samples"] = {m: {task.name: [_sample(r) for r in records[m][task.name]] for task, _ in tasks}
                          for m in models}
    return out


def _sample(r) -> dict:
    item, c = r["item"], r["completion"]
    s = {"id": item.id, "question": item.question}
    if item.unanswerable is not None:
        s["unanswerable"] = item.unanswerable
    if item.answers:
        s["answers"] = item.answers
    if item.choices is not None:
        s["choices"], s["answer_index"] = item.choices, item.answer_index
    s["prompt" if isinstance(r["messages"], str) else "messages"] = r["messages"]  # --api completions: a string
    s["response"] = c.text
    s["finish_reason"] = c.finish_reason
    if c.error:
        s["error"] = c.error
    if "verdict" in r:
        s["verdict"] = r["verdict"]
    s["correct"] = r["correct"]
    return s


def results_json(results: dict) -> str:
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    return json.dumps(public, indent=2, ensure_ascii=False) + "\n"


def write_results(results: dict, path: Path):
    """Write atomically: a temporary file beside the target, then rename."""
    write_text_atomic(path, results_json(results))


# ---- terminal ----------------------------------------------------------------------------------------------------


def _fmt(v, signed=False):
    if v is None:
        return "–"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _fmt_ci(d):
    if d is None or d.get("diff") is None:
        return "–"
    ci = d.get("ci95")
    text = f"{d['diff']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
    significant = ci is not None and (ci[0] > 0 or ci[1] < 0)
    return f"[bold]{text}[/bold]" if significant else text


RESULTS_TITLE = "Honesty: F1 (unanswerable = positive, refusal = prediction) and RF Δ"
RESULTS_CAPTION = "95% bootstrap intervals and answer accuracy in results.json"
DIFF_LABELS = {"f1": "F1", "rf_delta": "RF Δ", "answer_accuracy": "Acc", "accuracy": "Acc"}


def _honesty_rows(results: dict) -> tuple[list[str], list[str]]:
    tasks = results["tasks"]
    honesty = [t for t, i in tasks.items() if i["kind"] == "honesty"]
    domain = [t for t, i in tasks.items() if i["kind"] == "domain"]
    return honesty + (["average"] if len(honesty) > 1 else []), domain


def _n(results: dict, t: str) -> str:
    info = results["tasks"].get(t)
    return "" if info is None else str(info.get("n_scored", info["n"]))


def _cells(results: dict, m: str, t: str, domain: bool) -> list[str]:
    e = results["results"][m].get(t, {})
    return [_fmt(e.get("accuracy")), ""] if domain else [_fmt(e.get("f1")), _fmt(e.get("rf_delta"), signed=True)]


def results_table(results: dict, layout: str = "wide"):
    """The paper's Table 1. wide: rows = honesty benchmarks (+ average), columns = F1 and RF Delta per model;
    domain tasks follow as rows whose accuracy sits under the model's first column. long (for a terminal too
    narrow for a column pair per model): one row per benchmark x model, the same numbers."""
    from rich.table import Table

    models = results["config"]["models"]
    rows, domain = _honesty_rows(results)
    table = Table(title=RESULTS_TITLE, caption=RESULTS_CAPTION)
    table.add_column("benchmark", overflow="fold")
    table.add_column("n", justify="right", no_wrap=True)
    if layout == "long":
        table.add_column("model", overflow="fold")
        table.add_column("F1", justify="right", no_wrap=True)
        table.add_column("RF Δ", justify="right", no_wrap=True)
        for t in rows + domain:
            label = f"{t} (domain accuracy)" if t in domain else t
            for i, m in enumerate(models):
                table.add_row(label if i == 0 else "", "" if i or t == "average" else _n(results, t), m,
                              *_cells(results, m, t, t in domain), end_section=i == len(models) - 1)
        return table
    for m in models:
        table.add_column(f"{m}\nF1", justify="right", no_wrap=True)
        table.add_column(f"{m}\nRF Δ", justify="right", no_wrap=True)
    for t in rows:
        table.add_row(t, "" if t == "average" else _n(results, t),
                      *(c for m in models for c in _cells(results, m, t, False)), end_section=t == rows[-1])
    for t in domain:
        table.add_row(f"{t} (domain accuracy)", _n(results, t),
                      *(c for m in models for c in _cells(results, m, t, True)))
    return table


def differences_table(results: dict, layout: str = "wide"):
    """Differences to the reference model with paired 95% intervals. wide: one row per (benchmark, metric), one
    column per compared model; long: one row per (benchmark, metric, model)."""
    from rich.table import Table

    diffs = results.get("differences")
    if not diffs:
        return None
    ref, others = diffs["reference"], list(diffs["models"])
    table = Table(title=f"Difference to {ref} (paired bootstrap 95% interval; bold: excludes 0)")
    table.add_column("benchmark", overflow="fold")
    table.add_column("metric", no_wrap=True)
    if layout == "long":
        table.add_column("model", overflow="fold")
        table.add_column(f"model − {ref} [95% CI]", justify="right", no_wrap=True)
    else:
        for m in others:
            table.add_column(f"{m} − {ref}", justify="right", no_wrap=True)
    names = list(results["tasks"])
    if any("average" in diffs["models"][m] for m in others):
        names.insert(sum(1 for i in results["tasks"].values() if i["kind"] == "honesty"), "average")
    for t in names:
        metrics = [k for k in DIFF_LABELS if any(k in diffs["models"][m].get(t, {}) for m in others)]
        for j, k in enumerate(metrics):
            last = j == len(metrics) - 1
            if layout == "long":
                for i, m in enumerate(others):
                    table.add_row(t if j == 0 and i == 0 else "", DIFF_LABELS[k] if i == 0 else "", m,
                                  _fmt_ci(diffs["models"][m].get(t, {}).get(k)),
                                  end_section=last and i == len(others) - 1)
            else:
                table.add_row(t if j == 0 else "", DIFF_LABELS[k],
                              *(_fmt_ci(diffs["models"][m].get(t, {}).get(k)) for m in others), end_section=last)
    return table


def fits(table, console) -> bool:
    """The table's widest rendering (no cell wrapped or cut) fits the console's width."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update_width(1 << 20), table).maximum <= console.width


def fitted(build, results: dict, console):
    """`build(results, "wide")` when it fits the console, else the long layout (every number still whole)."""
    table = build(results, "wide")
    return table if table is None or fits(table, console) else build(results, "long")


def print_report(results: dict, console=None):
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # a file or pipe: no terminal width to fit, keep every column whole
            console = Console(width=200)
    console.print(fitted(results_table, results, console))
    diff = fitted(differences_table, results, console)
    if diff is not None:
        console.print(diff)
    for t, info in results["tasks"].items():
        for note in info.get("notes", []):
            console.print(f"[yellow]note[/yellow] {t}: {note}")
    for m, per_task in results["results"].items():
        for t, e in per_task.items():
            if e.get("n_errors"):
                console.print(f"[yellow]warning[/yellow] {m} / {t}: {e['n_errors']} request(s) rejected by the "
                              "server (left out of the metrics; see --log-samples)")
