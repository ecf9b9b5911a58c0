"""Stage 3: per layer, StandardScaler + logistic regression on one model's train split, AUROC on a test split
(unanswerable the positive class), for each condition (which model the probe is trained on and tested on)."""

from __future__ import annotations

import warnings

import numpy as np

from eval_harness.errors import UserError
from hcnr_deploy.probe.items import ProbeSet


CONDITIONS = {  # name: (features the probe is trained on, features it is tested on, description)
    "model": ("model", "model", "probe trained on --model, tested on --model's held-out split"),
    "transfer": ("reference", "model", "probe trained on --reference, applied unchanged to --model's held-out split"),
    "reference": ("reference", "reference", "probe trained on --reference, tested on --reference's held-out split"),
}
PROBE = {"estimator": "StandardScaler + LogisticRegression (scikit-learn)", "C": 1.0, "solver": "lbfgs",
         "max_iter": 2000, "positive_class": "unanswerable"}


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
