"""run_probe: the options checked, the items and models resolved, then features, fits and the report written in one
atomic output folder (the feature files inside it, deleted before the rename)."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from eval_harness.atomic import refuse_existing, refuse_overlap
from eval_harness.benchmarks import HONESTY_BENCHMARKS
from eval_harness.errors import UserError
from eval_harness.progress import progress_bar
from hcnr_deploy.engine.state import check_one_device
from hcnr_deploy.options import RepairOptions
from hcnr_deploy.probe.features import ProbedModel, extract_all, resolve_probed, shape_of
from hcnr_deploy.probe.fit import CONDITIONS, PROBE, fit_all
from hcnr_deploy.probe.items import MIN_PER_CLASS, load_probe_sets
from hcnr_deploy.probe.report import build_report, plot_figure


_REPAIR_FIELDS = {f.name: f for f in dataclasses.fields(RepairOptions)}
DTYPES = _REPAIR_FIELDS["dtype"].metadata["choices"]


def _check_options(test_size, batch_size, device, dtype, out: Path, overwrite: bool):
    if not (isinstance(test_size, (int, float)) and 0 < test_size < 1):
        raise UserError(f"--test-size must be a fraction strictly between 0 and 1 (e.g. 0.33), got {test_size}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    check_one_device(device)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: pass one of {', '.join(DTYPES)}")
    refuse_existing(out, overwrite)


def _check_models(models: list[ProbedModel], out: Path):
    refuse_overlap(out, [(pm.option, folder) for pm in models for folder in (pm.folder, pm.base) if folder],
                   "the probe")
    if len(models) == 2 and shape_of(models[0]) != shape_of(models[1]):
        (lm, wm), (lr, wr) = shape_of(models[0]), shape_of(models[1])
        raise UserError(f"--reference has {lr} decoder blocks of width {wr} but --model {lm} of width {wm}; a "
                        f"transferred probe needs the same architecture")


def run_probe(model, out, *, reference=None, base=None, data_dir=None, benchmarks=",".join(HONESTY_BENCHMARKS),
              limit=None, seed=0, test_size=0.33, device="auto", dtype="auto", batch_size=8, overwrite=False,
              progress=False, console=None) -> dict:
    """Probe `model` (and `reference`) and write probe.json and probe.png to `out`; return the report dict.

    Keyword arguments mirror `hcnr-deploy probe`'s options. Raises UserError on bad input, leaving nothing at `out`.
    """
    from hcnr_deploy.io.atomic import AtomicDir, write_json

    out = Path(out).expanduser().resolve()
    _check_options(test_size, batch_size, device, dtype, out, overwrite)
    if console is None:
        from rich.console import Console

        console = Console(stderr=True, quiet=not progress)
    sets = load_probe_sets(data_dir, benchmarks, limit, seed, test_size)
    models = [resolve_probed(model, "model", "--model", base)]
    if reference is not None:
        models.append(resolve_probed(reference, "reference", "--reference", base))
    _check_models(models, out)
    conditions = list(CONDITIONS) if reference is not None else ["model"]
    t0 = time.perf_counter()
    with AtomicDir(out, overwrite=overwrite) as tmp:
        (tmp / "features").mkdir()
        with progress_bar(console, progress) as bar:
            feats, dtypes = extract_all(models, sets, tmp / "features", device, dtype, batch_size, bar)
        t_feat = time.perf_counter() - t0
        with progress_bar(console, progress) as bar:
            aurocs, not_converged = fit_all(feats, sets, [pm.role for pm in models], conditions, seed, bar)
        for f in feats.values():
            f.close()
        shutil.rmtree(tmp / "features")
        settings = {"benchmarks": [ps.name for ps in sets], "data_dir": str(data_dir), "limit": limit, "seed": seed,
                    "test_size": test_size, "min_per_class": MIN_PER_CLASS, "device_option": device,
                    "dtype_option": dtype, "dtype": dtypes, "batch_size": batch_size, "probe": PROBE,
                    "prompt": {"render": "eval_harness.prompts.build_messages, tokenizer chat template with the "
                                         "generation prompt", "system_prompt": None, "icl": 0}}
        report = build_report(sets, models, conditions, aurocs, not_converged, settings)
        write_json(tmp / "probe.json", report)
        plot_figure(report, tmp / "probe.png")
    report["_run"] = {"features_s": round(t_feat, 2), "total_s": round(time.perf_counter() - t0, 2),
                      "out": str(out)}
    return report
