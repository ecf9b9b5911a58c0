"""A full fine-tune's sweep bounded on disk (issue 20, item 8): base and ft scored, then each candidate built, served,
scored and deleted, one at a time, so that at most two checkpoints are on disk (the choice so far and the one being
scored) instead of one per grid point (17 x 16 GB at 8B). ``--keep-candidates`` keeps them all (run.py's path).

Each candidate is built by its own repair session (build.py), closed before its checkpoint is served, so vLLM finds
the GPU free. The Fisher scores are kept in OUT/statistics/ (a few MB at 8B with column selection) and read by every
later session; the model load and the Gram pass of stage 2 are repeated per candidate. A scored
candidate leaves OUT/scored/NAME.json (its repair report, results and samples): a rerun neither rebuilds nor serves
it, and sends only the missing requests of the others.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hcnr_deploy.sweep import choice as C
from hcnr_deploy.sweep.build import build_candidates
from hcnr_deploy.sweep.grid import METHODS
from hcnr_deploy.sweep.figures import candidate_figures
from hcnr_deploy.sweep.score import merge_results
from hcnr_deploy.sweep.workdir import write_json


def applies(is_lora: bool, keep_candidates: bool, build_only: bool, endpoint) -> bool:
    """Whether a sweep goes one candidate at a time: a full fine-tune scored here, unless --keep-candidates (or
    --build-only, whose candidates are for scoring elsewhere)."""
    return not (is_lora or keep_candidates or build_only or endpoint)


def is_edit(c) -> bool:
    """A grid point with weights (not base, ft or a guard point)."""
    return c.family in METHODS and c.family != "guard"


def record_path(out: Path, name: str) -> Path:
    return out / "scored" / f"{name}.json"


def write_record(out: Path, name: str, report: dict, res: dict) -> dict:
    """OUT/scored/NAME.json, returned: what the frontier needs of a candidate once its weights may be gone."""
    record = {"report": report, "results": res["results"][name], "samples": res["samples"][name],
              "identity": (res.get("_identities") or {}).get(name), "run": res.get("_run")}
    (out / "scored").mkdir(exist_ok=True)
    write_json(record_path(out, name), record)
    return record


def read_record(out: Path, name: str) -> dict | None:
    p = record_path(out, name)
    return json.loads(p.read_text()) if p.is_file() else None


def as_results(name: str, record: dict) -> dict:
    """A record in the shape of the eval harness's results (one model), for merge_results."""
    return {"results": {name: record["results"]}, "samples": {name: record["samples"]},
            "_identities": {name: record["identity"]} if record.get("identity") else {},
            "config": {"models": [name], "endpoints": {}}}


def running_choice(s, results: dict, names: list[str], domain_task: str, done: list, reports: dict) -> str:
    """The sweep's choice (choice.choose) among base, ft and the candidates scored so far. Its key orders every
    candidate totally (ties: domain, smaller edit, grid order), so the choice over all of them is the last running
    choice: a candidate that is not the running choice can never be the final one."""
    order = ["base", "ft", *[c.name for c in done]]
    figures = candidate_figures(results, order, names, domain_task, s.n_boot, s.options.seed)
    rows = [{"name": n, **figures[n], "edited_fraction": {"base": 1.0, "ft": 0.0}.get(
        n, (reports.get(n) or {}).get("edited_fraction"))} for n in order]
    return C.choose(rows, s.max_domain_drop, s.honesty_metric)[0]


def prune(folder: Path, keep: str | None, names: list[str]):
    """Delete the candidate folders of `names` except `keep` (their records stay in OUT/scored/)."""
    for n in names:
        if n != keep and (folder / n).exists():
            shutil.rmtree(folder / n)


def build_and_score_one_at_a_time(s, score, names: list[str], domain_task: str) -> tuple[dict, dict, list]:
    """Stages 1-3 for a full fine-tune without --keep-candidates. `score(model_names, artifacts)` serves and scores
    (run.py: serve_and_score with the sweep's settings) and returns (results, serve_s, eval_s, runs).

    Returns (built, results, runs): `built` as build_candidates' (artifacts: the kept ones only), the merged
    results of base, ft and every candidate, the harness's request counts per run."""
    folder = s.out / "candidates"
    built = {"artifacts": {"base": s.base_dir, "ft": s.ft_dir}, "reports": {}, "built": [], "reused": [], "notes": [],
             "statistics": {}}
    results, serve_s, eval_s, runs = score(["base", "ft"], built["artifacts"])
    cands = [c for c in s.cands if is_edit(c)]
    done, keep, stats_s = [], None, 0.0
    for k, c in enumerate(cands, 1):
        record = read_record(s.out, c.name)
        if record is None:
            s.console.print(f"[bold]candidate {k}/{len(cands)}[/] {c.name}: build, serve, score")
            b = build_candidates([c], folder, s.base_dir, s.ft_dir, s.honesty_data, s.task_data, s.repair_options,
                                 console=s.console, progress=s.progress, statistics_dir=s.out / "statistics")
            built["notes"] += b["notes"]
            stats_s += sum((b["statistics"] or {}).values())
            if c.name not in b["artifacts"]:  # an sft candidate skipped with a note
                continue
            built["built" if c.name in b["built"] else "reused"].append(c.name)
            res, sv, ev, r = score([c.name], {c.name: b["artifacts"][c.name]})
            serve_s, eval_s, runs = serve_s + sv, eval_s + ev, runs + r
            record = write_record(s.out, c.name, b["reports"][c.name], res)
        else:
            built["reused"].append(c.name)
        merge_results(results, as_results(c.name, record))
        built["reports"][c.name] = record["report"]
        done.append(c)
        keep = running_choice(s, results, names, domain_task, done, built["reports"])
        prune(folder, keep, [d.name for d in done])
    built["artifacts"].update({c.name: folder / c.name for c in done if (folder / c.name).is_dir()})
    s.cands = [c for c in s.cands if not is_edit(c) or c in done]
    s.timings["serve"], s.timings["eval"] = round(serve_s, 3), round(eval_s, 3)
    built["statistics"] = {"all_candidates": round(stats_s, 3)}
    return built, results, runs


def one_at_a_time_plan(base, finetuned, opts, candidates: list[tuple[str, dict]]) -> dict:
    """engine/plan's plan of a sweep built, scored and deleted one candidate at a time (`one_at_a_time`)."""
    from hcnr_deploy.engine.plan import plan_for_run

    return one_at_a_time([plan_for_run(base, finetuned, opts, [c]) for c in candidates] or [
        plan_for_run(base, finetuned, opts, [])], len(candidates))


def one_at_a_time(singles: list[dict], n: int) -> dict:
    """The plan of `n` candidates built one at a time from their single-candidate plans: each its own session (the
    memory peaks of the largest one; the Gram passes' and solves' FLOPs, model loads and bytes written summed over
    the candidates, the Fisher passes counted once: their scores are kept on disk), and on disk one checkpoint more
    than the largest candidate's (the choice so far beside the one being built)."""
    p = dict(max(singles, key=lambda q: (sum(q["gpu_bytes"]), q["host_bytes"])))
    p["gpu_bytes"] = [max(q["gpu_bytes"][d] for q in singles) for d in range(len(p["gpu_bytes"]))]
    p["host_bytes"] = max(q["host_bytes"] for q in singles)
    p["disk_bytes"] = max(q["disk_bytes"] for q in singles) + (p["model_bytes"] if n > 1 else 0)
    p["flops"] = {k: (max if k == "fisher" else sum)(q["flops"][k] for q in singles) for k in p["flops"]}
    p["loads"], p["written_bytes"] = n, sum(q["disk_bytes"] for q in singles)  # every session loads, writes
    p["one_at_a_time"] = True
    return p
