"""`hcnr-deploy probe`: does the model still tell answerable from unanswerable? (the paper's Observation 2, Figure 3)

Stages, kept apart:
1. items: the eval harness's loaders and `--limit` sample (eval_harness.benchmarks), each question rendered as the
   harness sends it to a chat endpoint (eval_harness.prompts.build_messages through the tokenizer's chat template,
   with the generation prompt), and a seeded stratified train/test split (`stratified_split`).
2. features: the hidden state of every layer at the last prompt token (transformers' `output_hidden_states`:
   layer 0 is the embedding output, layer l the output of decoder block l, the last one after the final norm),
   written as float32 to one raw file per model and benchmark, shape (layers, items, hidden), inside the
   temporary output folder and deleted before it is renamed. Fitting reads one layer of each model at a time.
3. probe math: per layer, StandardScaler + logistic regression (scikit-learn) on one model's train split, AUROC
   with unanswerable as the positive class on a test split (`fit_probe`, `auroc`, `layer_aurocs`).
4. report: probe.json, probe.png (Figure 3: layers x benchmarks heatmaps, one panel per condition), a rich table.

Conditions: `model` (probe trained and tested on --model), `transfer` (trained on --reference, applied unchanged
to --model's test features: the paper's transfer) and `reference` (trained and tested on --reference).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from eval_harness.benchmarks import HONESTY_BENCHMARKS, load_benchmark, parse_benchmarks, stratified_sample
from eval_harness.errors import UserError
from eval_harness.prompts import build_messages
from eval_harness.versions import versions
from hcnr_deploy import __version__
from hcnr_deploy.options import RepairOptions

CONDITIONS = {  # name: (features the probe is trained on, features it is tested on, description)
    "model": ("model", "model", "probe trained on --model, tested on --model's held-out split"),
    "transfer": ("reference", "model", "probe trained on --reference, applied unchanged to --model's held-out split"),
    "reference": ("reference", "reference", "probe trained on --reference, tested on --reference's held-out split"),
}
MIN_PER_CLASS = 4
PROBE = {"estimator": "StandardScaler + LogisticRegression (scikit-learn)", "C": 1.0, "solver": "lbfgs",
         "max_iter": 2000, "positive_class": "unanswerable"}
LAYER_NOTE = ("layer 0 = embedding output; layer l = output of decoder block l (the last one after the final norm, "
              "as transformers' output_hidden_states returns it); features at the last prompt token")
_REPAIR_FIELDS = {f.name: f for f in dataclasses.fields(RepairOptions)}
DEVICES = _REPAIR_FIELDS["device"].metadata["choices"]  # the repair's choices: one declaration
DTYPES = _REPAIR_FIELDS["dtype"].metadata["choices"]


# ---- 1. items and split ------------------------------------------------------------------------------------------


@dataclass
class ProbeSet:
    """One benchmark's sampled items, labels (1 = unanswerable) and held-out split (indices into items)."""
    name: str
    items: list
    available: int
    files: list
    labels: np.ndarray
    train: np.ndarray
    test: np.ndarray


def stratified_split(labels: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class with n items, round(test_size * n) of them (at least 1, at most n - 1), drawn with `seed`, are
    held out. Returns sorted (train, test) indices."""
    rng = np.random.default_rng(seed)
    test = []
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        k = min(max(int(round(test_size * len(idx))), 1), len(idx) - 1)
        test.extend(rng.permutation(idx)[:k].tolist())
    test = np.array(sorted(test), dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def load_probe_sets(data_dir, benchmarks, limit: int | None, seed: int, test_size: float) -> list[ProbeSet]:
    """The benchmarks as `hcnr-deploy eval` samples them (same --limit, same seed), each split for the probe."""
    names = parse_benchmarks(benchmarks) if isinstance(benchmarks, str) else list(benchmarks)
    if not names:
        raise UserError("--benchmarks is empty; name at least one of " + ", ".join(HONESTY_BENCHMARKS))
    for n in names:
        if n not in HONESTY_BENCHMARKS:
            parse_benchmarks(n)  # raises the one-line error
    if data_dir is None:
        from eval_harness.env import data_dir_or_default

        data_dir = data_dir_or_default(None)  # the user data folder (`hcnr-deploy data fetch`)
    sets = []
    for name in names:
        b = load_benchmark(name, Path(data_dir))
        items = stratified_sample(b.items, limit, seed)
        labels = np.array([1 if it.unanswerable else 0 for it in items], dtype=np.int64)
        n_u, n_a = int(labels.sum()), int(len(labels) - labels.sum())
        if min(n_u, n_a) < MIN_PER_CLASS:
            sampled = limit is not None and limit < len(b.items)
            raise UserError(f"{name}: {n_u} unanswerable and {n_a} answerable questions"
                            f"{f' in the --limit {limit} sample' if sampled else ''}; a probe needs at least "
                            f"{MIN_PER_CLASS} of each class: {'raise --limit or ' if sampled else ''}drop {name} "
                            f"from --benchmarks")
        train, test = stratified_split(labels, test_size, seed)
        sets.append(ProbeSet(name, items, len(b.items), b.files, labels, train, test))
    return sets


def render_prompts(tokenizer, items) -> list[list[int]]:
    """Token ids of each item's chat prompt, as the eval harness asks a chat endpoint (generation prompt on)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; the probe renders questions as the eval harness sends "
                        "them to a chat endpoint, so the model folder needs one (chat_template in tokenizer_config)")
    out = []
    for it in items:
        text = tokenizer.apply_chat_template(build_messages(it), tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


# ---- 2. models and features --------------------------------------------------------------------------------------


@dataclass
class ProbedModel:
    role: str  # "model" | "reference"
    option: str
    given: str
    folder: Path
    base: Path | None = None  # a LoRA adapter's base
    finetune: object = None  # modelio.FineTune of a LoRA adapter


def _reword(e: UserError, old: str, new: str) -> UserError:
    return UserError(e.message.replace(old, new))


def resolve_probed(given: str, role: str, option: str, base: str | None) -> ProbedModel:
    """A full HF model folder, or a PEFT LoRA adapter on `base` (default: the adapter's base_model_name_or_path)."""
    from hcnr_deploy.modelio import Checkpoint, FineTune, resolve_model_dir

    folder = resolve_model_dir(given, option)
    if (folder / "adapter_config.json").is_file():
        recorded = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not (base or recorded):
            raise UserError(f"{option} {folder} is a LoRA adapter that names no base model; pass --base BASE")
        base_dir = resolve_model_dir(base or recorded, "--base")
        try:
            finetune = FineTune(folder, Checkpoint(base_dir, "--base"))
        except UserError as e:
            raise _reword(e, "--finetuned", option) from None
        return ProbedModel(role, option, str(given), folder, base_dir, finetune)
    if not (folder / "config.json").is_file():
        raise UserError(f"{option} {folder} is not a model: it has neither config.json (Hugging Face model) nor "
                        f"adapter_config.json (PEFT LoRA adapter)")
    Checkpoint(folder, option)  # checks the weights are there
    return ProbedModel(role, option, str(given), folder)


def load_probed(pm: ProbedModel, device: str, dtype: str):
    """(model, tokenizer, resolved dtype name): a LoRA adapter is merged (W0 + s B A) into a loaded copy of its base."""
    import torch

    from hcnr_deploy.modelio import load_model, load_tokenizer
    from hcnr_deploy.repair.state import resolve_device_dtype  # the repair's rule, one definition

    src = pm.base or pm.folder
    dev, dt = resolve_device_dtype(device, dtype, json.loads((src / "config.json").read_text()))
    try:
        model = load_model(src, dt, dev)
    except UserError as e:
        raise _reword(e, "--base", pm.option if pm.base is None else "--base") from None
    if pm.finetune is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for module in pm.finetune.lora.modules():
                name = module + ".weight"
                if name not in params:
                    raise UserError(f"{pm.option} {pm.folder} adapts {module}, which the loaded base model lacks")
                params[name].copy_(pm.finetune.weight(name).to(params[name].dtype))
    return model, load_tokenizer(pm.folder, pm.base), str(dt).removeprefix("torch.")


def _free_device_memory():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _shape_of(pm: ProbedModel) -> tuple:
    """(decoder blocks, hidden width) from the config (a LoRA adapter's: its base's)."""
    cfg = json.loads(((pm.base or pm.folder) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return cfg.get("num_hidden_layers"), cfg.get("hidden_size")


def last_token_states(model, prompts: list[list[int]], pad_id: int):
    """Hidden states of every layer at each prompt's last token: float32 tensor (layers, len(prompts), hidden).

    Right padding, so the last real token never sees a pad token."""
    import torch

    from hcnr_deploy.guard.features import right_padded

    device = next(model.parameters()).device
    ids, att = right_padded(prompts, pad_id)
    with torch.no_grad():
        out = model(input_ids=ids.to(device), attention_mask=att.to(device), output_hidden_states=True,
                    use_cache=False)
    rows = torch.arange(len(prompts), device=device)
    last = att.sum(1).to(device) - 1
    return torch.stack([h[rows, last].float().cpu() for h in out.hidden_states])


class FeatureFile:
    """float32 features of shape (layers, items, hidden) in one raw file beside the output, written a batch at a
    time and read a layer at a time with plain positional I/O (no mmap: the process holds only what it read)."""

    def __init__(self, path: Path, n_items: int):
        self.path, self.n_items, self.shape = Path(path), n_items, None
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def write(self, idx: list[int], states: np.ndarray):
        """states (layers, len(idx), hidden): the rows of items `idx`."""
        if self.shape is None:
            self.shape = (states.shape[0], self.n_items, states.shape[2])
            os.ftruncate(self._fd, int(np.prod(self.shape)) * 4)
        layers, n, hidden = self.shape
        states = np.ascontiguousarray(states, dtype=np.float32)
        for layer in range(layers):
            for j, i in enumerate(idx):
                os.pwrite(self._fd, states[layer, j].tobytes(), (layer * n + i) * hidden * 4)

    def layer(self, layer: int) -> np.ndarray:
        """(items, hidden) of one layer."""
        _, n, hidden = self.shape
        out = np.empty((n, hidden), dtype=np.float32)
        view, offset = memoryview(out).cast("B"), layer * n * hidden * 4
        while len(view):
            got = os.preadv(self._fd, [view], offset)
            view, offset = view[got:], offset + got
        return out

    def close(self):
        os.close(self._fd)


def extract_features(model, prompts: list[list[int]], path: Path, batch_size: int, pad_id: int,
                     progress=None, task=None) -> FeatureFile:
    """All layers' last-token states of `prompts` into a FeatureFile at `path`, shape (layers, items, hidden).

    Prompts run in batches of similar length (a stable sort by length), each written at its own index."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    store = FeatureFile(path, len(prompts))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        store.write(idx, last_token_states(model, [prompts[i] for i in idx], pad_id).numpy())
        if progress is not None:
            progress.advance(task, len(idx))
    return store


# ---- 3. the probe math -------------------------------------------------------------------------------------------


def fit_probe(x: np.ndarray, y: np.ndarray, seed: int):
    """StandardScaler + L2 logistic regression on (items, hidden) features; (pipeline, converged)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE["C"], solver=PROBE["solver"],
                                                               max_iter=PROBE["max_iter"], random_state=seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(x, y)
    return probe, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def auroc(probe, x: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve of the probe's decision score, unanswerable (y = 1) the positive class."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, probe.decision_function(x)))


def layer_aurocs(feats: dict, ps: ProbeSet, layer: int, conditions: list[str], seed: int) -> tuple[dict, int]:
    """AUROC of each condition at one layer ({condition: auroc}, probes that did not converge). `feats` maps a
    role to its FeatureFile; only this layer of each role is read into memory."""
    x = {role: f.layer(layer) for role, f in feats.items()}
    probes, not_converged = {}, 0
    for role in sorted({CONDITIONS[c][0] for c in conditions}):
        probes[role], ok = fit_probe(x[role][ps.train], ps.labels[ps.train], seed)
        not_converged += not ok
    y_test = ps.labels[ps.test]
    out = {c: auroc(probes[CONDITIONS[c][0]], x[CONDITIONS[c][1]][ps.test], y_test) for c in conditions}
    return out, not_converged


def best_layer(values: list[float]) -> tuple[int, float]:
    """The layer with the highest AUROC (the first of ties)."""
    i = int(np.argmax(values))
    return i, values[i]


# ---- 4. report ---------------------------------------------------------------------------------------------------


def _versions() -> dict:
    return {"hcnr_deploy": __version__, **versions(("torch", "transformers", "scikit-learn", "numpy", "matplotlib"))}


def _qhash(question: str) -> str:
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


def _class_sizes(labels: np.ndarray) -> dict:
    return {"unanswerable": int(labels.sum()), "answerable": int(len(labels) - labels.sum())}


def build_report(sets, models, conditions, aurocs, not_converged, settings) -> dict:
    from eval_harness.benchmarks import file_sha256

    benchmarks = {}
    for ps in sets:
        benchmarks[ps.name] = {
            "available": ps.available,
            "files": [{"path": str(f), "sha256": file_sha256(f)} for f in ps.files],
            "sizes": {"all": _class_sizes(ps.labels), "train": _class_sizes(ps.labels[ps.train]),
                      "test": _class_sizes(ps.labels[ps.test])},
            "split": {part: [{"id": ps.items[i].id, "question_sha256": _qhash(ps.items[i].question),
                              "unanswerable": bool(ps.labels[i])} for i in idx]
                      for part, idx in (("train", ps.train), ("test", ps.test))},
        }
    conds = {}
    for c in conditions:
        per = {b: [round(v, 6) for v in aurocs[c][b]] for b in aurocs[c]}
        best = {b: dict(zip(("layer", "auroc"), best_layer(v))) for b, v in per.items()}
        mean_layers = [round(float(np.mean([per[b][l] for b in per])), 6) for l in range(len(next(iter(per.values()))))]
        ml, mv = best_layer(mean_layers)
        conds[c] = {"trained_on": CONDITIONS[c][0], "tested_on": CONDITIONS[c][1], "description": CONDITIONS[c][2],
                    "auroc": per, "best": best,
                    "summary": {"mean_of_best_auroc": round(float(np.mean([v["auroc"] for v in best.values()])), 6),
                                "best_layer_of_mean": ml, "mean_auroc_at_that_layer": mv}}
    n_layers = len(next(iter(aurocs[conditions[0]].values())))
    return {"layers": list(range(n_layers)), "layer_note": LAYER_NOTE,
            "models": {pm.role: {"given": pm.given, "kind": "lora" if pm.base else "full",
                                 **({"base": str(pm.base)} if pm.base else {})} for pm in models},
            "conditions": conds, "benchmarks": benchmarks, "probes_not_converged": not_converged,
            "settings": settings, "versions": _versions()}


def plot_figure(report: dict, path: Path):
    """The paper's Figure 3: AUROC heatmaps, layers by benchmark, one panel per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(report["conditions"])
    names = list(report["benchmarks"])
    layers = report["layers"]
    fig, axes = plt.subplots(1, len(conds), figsize=(1.2 + (1.4 + 0.55 * len(names)) * len(conds),
                                                     1.4 + 0.16 * len(layers)), squeeze=False, constrained_layout=True)
    for ax, c in zip(axes[0], conds):
        grid = np.array([report["conditions"][c]["auroc"][b] for b in names]).T  # (layers, benchmarks)
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0)
        for j, b in enumerate(names):
            ax.plot(j, report["conditions"][c]["best"][b]["layer"], "w*", markersize=7)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(f"{c}\ntrained on {CONDITIONS[c][0]}, tested on {CONDITIONS[c][1]}", fontsize=8)
        ax.set_ylabel("layer")
        if len(layers) <= 12:
            ax.set_yticks(layers)
    fig.colorbar(im, ax=axes[0].tolist(), label="held-out AUROC")
    fig.suptitle("Linear probes, unanswerable vs answerable (star: best layer)", fontsize=10)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def print_table(report: dict, console):
    """Best layer and its AUROC per benchmark and condition (fits 80 columns)."""
    from rich.table import Table

    conds = list(report["conditions"])
    table = Table(title=f"Probe AUROC at the best of {len(report['layers'])} layers")
    table.add_column("benchmark")
    table.add_column("test u/a", justify="right")
    for c in conds:
        table.add_column(c, justify="right")
    for b, info in report["benchmarks"].items():
        t = info["sizes"]["test"]
        cells = [f"{report['conditions'][c]['best'][b]['auroc']:.3f} @{report['conditions'][c]['best'][b]['layer']}"
                 for c in conds]
        table.add_row(b, f"{t['unanswerable']}/{t['answerable']}", *cells)
    table.add_row("mean", "", *[f"{report['conditions'][c]['summary']['mean_of_best_auroc']:.3f}" for c in conds],
                  style="bold")
    console.print(table)


# ---- the pipeline ------------------------------------------------------------------------------------------------


def _progress(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not enabled)


def extract_all(models, sets, feat_dir: Path, device: str, dtype: str, batch_size: int, bar) -> tuple[dict, dict]:
    """Features of every (model role, benchmark), one model loaded at a time: ({(role, name): FeatureFile}, dtypes)."""
    feats, dtypes = {}, {}
    for pm in models:
        net, tok, dtypes[pm.role] = load_probed(pm, device, dtype)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        prompts = {ps.name: render_prompts(tok, ps.items) for ps in sets}
        task = bar.add_task(f"features of {pm.role}", total=sum(len(p) for p in prompts.values()))
        for ps in sets:
            feats[pm.role, ps.name] = extract_features(net, prompts[ps.name], feat_dir / f"{pm.role}-{ps.name}.f32",
                                                       batch_size, pad, bar, task)
        del net
        _free_device_memory()
    return feats, dtypes


def fit_all(feats: dict, sets, roles: list[str], conditions: list[str], seed: int, bar) -> tuple[dict, int]:
    """{condition: {benchmark: [AUROC per layer]}} and the number of probes that did not converge."""
    aurocs = {c: {ps.name: [] for ps in sets} for c in conditions}
    not_converged = 0
    n_layers = feats[roles[0], sets[0].name].shape[0]
    task = bar.add_task("fitting probes", total=len(sets) * n_layers)
    for ps in sets:
        by_role = {r: feats[r, ps.name] for r in roles}
        shapes = {r: f.shape[::2] for r, f in by_role.items()}
        if len(set(shapes.values())) > 1:  # the configs agreed (checked before loading), the states do not
            raise UserError(f"hidden states (count, width): {shapes}; a transferred probe needs the same "
                            f"architecture for --model and --reference")
        for layer in range(n_layers):
            values, nc = layer_aurocs(by_role, ps, layer, conditions, seed)
            not_converged += nc
            for c, v in values.items():
                aurocs[c][ps.name].append(v)
            bar.advance(task)
    return aurocs, not_converged


def _check_options(test_size, batch_size, device, dtype, out: Path, overwrite: bool):
    if not (isinstance(test_size, (int, float)) and 0 < test_size < 1):
        raise UserError(f"--test-size must be a fraction strictly between 0 and 1 (e.g. 0.33), got {test_size}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if device not in DEVICES or dtype not in DTYPES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)} and --dtype one of {', '.join(DTYPES)}")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; choose a new folder or pass --overwrite")


def _check_models(models: list[ProbedModel], out: Path):
    for pm in models:
        for folder in filter(None, (pm.folder, pm.base)):
            if out == folder or out in folder.parents or folder in out.parents:
                raise UserError(f"--out {out} overlaps {pm.option} {folder}; write the probe to a separate folder")
    if len(models) == 2 and _shape_of(models[0]) != _shape_of(models[1]):
        (lm, wm), (lr, wr) = _shape_of(models[0]), _shape_of(models[1])
        raise UserError(f"--reference has {lr} decoder blocks of width {wr} but --model {lm} of width {wm}; a "
                        f"transferred probe needs the same architecture")


def run_probe(model, out, *, reference=None, base=None, data_dir=None, benchmarks=",".join(HONESTY_BENCHMARKS),
              limit=None, seed=0, test_size=0.33, device="auto", dtype="auto", batch_size=8, overwrite=False,
              progress=False, console=None) -> dict:
    """Probe `model` (and `reference`) and write probe.json and probe.png to `out`; return the report dict.

    Keyword arguments mirror `hcnr-deploy probe`'s options. Raises UserError on bad input, leaving nothing at `out`.
    """
    from hcnr_deploy.modelio import AtomicDir, write_json

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
        with _progress(console, progress) as bar:
            feats, dtypes = extract_all(models, sets, tmp / "features", device, dtype, batch_size, bar)
        t_feat = time.perf_counter() - t0
        with _progress(console, progress) as bar:
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


@click.command("probe", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model", "model", required=True,
              help="The model to probe (the fine-tune): a HF model folder or hub id, or a PEFT LoRA adapter folder.")
@click.option("--reference", default=None,
              help="A second model (the base): its probe is also applied unchanged to --model (the transfer).")
@click.option("--base", default=None,
              help="Base model of LoRA adapters given as --model / --reference (default: the adapter's "
                   "base_model_name_or_path).")
@click.option("--data-dir", type=click.Path(path_type=Path), envvar="HCNR_DATA_DIR", show_envvar=True,
              help="Folder with the benchmark files, as for `hcnr-deploy eval` (searched in sub-folders).")
@click.option("--benchmarks", default=",".join(HONESTY_BENCHMARKS), show_default=True,
              help="Honesty benchmarks, comma-separated.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most N questions per benchmark: the same seeded, class-keeping sample as `eval --limit`.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder for probe.json and probe.png (must not exist).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --limit and the train/test split.")
@click.option("--test-size", type=float, default=0.33, show_default=True,
              help="Fraction of each class held out to score the probes.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where the forward passes run (auto: cuda when available).")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Dtype of the forward passes (auto: float32 on CPU, the checkpoint's on GPU); features are "
                   "kept in float32.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Prompts per forward pass.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or table.")
def probe(model, reference, base, data_dir, benchmarks, limit, out, seed, test_size, device, dtype, batch_size,
          overwrite, quiet):
    """Linear probes on every layer's hidden state: can the model still tell answerable from unanswerable?

    \b
      hcnr-deploy probe --model FT --reference BASE --data-dir DATA --limit 600 --out probe-ft

    For each benchmark, the questions (rendered as the eval harness sends them to a chat endpoint) are split,
    per class and seeded, into a train and a held-out part. At every layer a logistic-regression probe on the
    last prompt token's hidden state is trained and scored by held-out AUROC (unanswerable positive): on --model,
    on --reference, and the --reference probe applied unchanged to --model (the paper's transfer, Observation 2).
    "Best layer" is the maximum over layers of held-out AUROC (so slightly optimistic); every layer's value is in
    probe.json. Features of all layers go to a float32 file inside the temporary output folder
    (layers x questions x hidden x 4 bytes per model; deleted at the end); memory holds one layer at a time.
    """
    from rich.console import Console

    report = run_probe(model, out, reference=reference, base=base, data_dir=data_dir, benchmarks=benchmarks,
                       limit=limit, seed=seed, test_size=test_size, device=device, dtype=dtype,
                       batch_size=batch_size, overwrite=overwrite, progress=not quiet,
                       console=Console(stderr=True, quiet=quiet))
    if not quiet:
        console = Console()
        print_table(report, console)
        run = report["_run"]
        console.print(f"features {run['features_s']:.1f} s, total {run['total_s']:.1f} s; wrote probe.json and "
                      f"probe.png to {run['out']}")
