"""Stage 4: probe.json (every layer's AUROC, the split by question hash, settings, versions), probe.png (the
paper's Figure 3) and the terminal table."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from eval_harness.versions import versions
from hcnr_deploy import __version__
from hcnr_deploy.probe.fit import CONDITIONS, best_layer


LAYER_NOTE = ("layer 0 = embedding output; layer l = output of decoder block l (the last one after the final norm, "
              "as transformers' output_hidden_states returns it); features at the last prompt token")


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
