"""The sweep's pure parts: the candidate grid, per-candidate figures from the eval results, the choice, the
frontier table and figure. No model, no server: everything here is tested on hand-made numbers.

The metrics themselves (F1, RF Delta, accuracy, bootstrap, recovery ratio, Pareto frontier) come from
`eval_harness.metrics`, the one metrics module.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from eval_harness import metrics as M
from eval_harness.errors import UserError
from hcnr_deploy import choice as C

REFERENCES = ("base", "ft")

# grid method -> (repair method, fixed repair options, {parameter: (type, short name in candidate names)})
METHODS = {
    "hcnr": ("hcnr", {}, {"r_cw": (float, "rcw"), "r_iw": (float, "riw"), "task_weight": (float, "mu"),
                          "compensation": (str, ""), "damp": (float, "damp")}),
    "random": ("hcnr", {"selection": "random"}, {"r_cw": (float, "rcw"), "r_iw": (float, "riw"),
                                                  "compensation": (str, "")}),
    "regmean": ("regmean", {}, {"task_weight": (float, "mu"), "damp": (float, "damp")}),
    "taskaware": ("hcnr", {"compensation": "task-aware"}, {"task_weight": (float, "mu"), "r_cw": (float, "rcw"),
                                                         "r_iw": (float, "riw"), "damp": (float, "damp")}),
    "scale": ("scale", {}, {"alpha": (float, "a")}),
    "lines": ("lines", {}, {"alpha": (float, "a"), "beta": (float, "b")}),
    "sft": ("sft", {}, {"steps": (int, "s"), "lr": (float, "lr")}),
    # not a weight edit: the honesty guard (hcnr_deploy/guard), scored from ft's answers (guard/family.py)
    "guard": ("guard", {}, {"false_refusal": (float, "fr"), "block": (str, "b")}),
}
ALIASES = {"mu": "task_weight", "a": "alpha", "b": "beta", "fr": "false_refusal", "rcw": "r_cw", "riw": "r_iw", "r-cw": "r_cw",
           "r-iw": "r_iw", "task-weight": "task_weight"}
# lines: two depth profiles (shallow blocks nearer the base, b > 0; deep blocks nearer the base, b < 0), each at
# the mean factors 0.5 and 0.7 of scale-a0.4..0.8, so the plot tells whether the profile beats flat scaling
DEFAULT_GRID = ("hcnr:r_cw=0.1,0.2,0.4,0.6,0.8; random:r_cw=0.4; taskaware:task_weight=0.1,1,10; "
                "regmean:task_weight=0.3,1,3,10; scale:alpha=0.2,0.4,0.6,0.8; lines:alpha=0.2,0.4:beta=0.6; "
                "lines:alpha=0.8,1:beta=-0.6; sft:steps=16,32,64; guard:false_refusal=0.02,0.05,0.1")
GRID_HELP = ("METHOD:PARAM=V1,V2[:PARAM=...]; ... Methods: hcnr (r_cw, r_iw, task_weight, compensation, damp), "
             "random (HCNR with random column selection: r_cw, r_iw, compensation), taskaware (HCNR with "
             "--compensation task-aware: task_weight, alias mu, r_cw, r_iw, damp), regmean (task_weight, alias mu), "
             "scale (alpha, alias a), lines (alpha, beta, aliases a, b: W0 + (a + b l / (L - 1)) D in block l of "
             "L), sft (steps, lr), guard (false_refusal, alias fr; block: auto or an index; the honesty guard, scored "
             "from ft's answers). Several PARAMs of one method give every combination; "
             "a method without parameters (e.g. 'hcnr') is its repair defaults. base and ft are always in.")


@dataclass(frozen=True)
class Candidate:
    """One point of the sweep: its served name, grid method, repair method and options."""

    name: str
    family: str                       # grid method: base, ft, hcnr, random, taskaware, regmean, scale, lines, sft
    method: str                       # the repair method (`repair --method`); the family for base / ft
    params: dict = field(default_factory=dict, hash=False)  # options given to the repair (beyond the fixed ones)

    @property
    def repair_kwargs(self) -> dict:
        return {**METHODS[self.family][1], **self.params} if self.family in METHODS else {}


def _fmt_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def candidate_name(family: str, params: dict) -> str:
    """`hcnr-rcw0.4`, `random-rcw0.4`, `regmean-mu3`, `scale-a0.6`, `sft-s32`, `hcnr-rcw0.2-exact`."""
    specs = METHODS[family][2]
    parts = [family] + [f"{specs[k][1]}{_fmt_value(v)}" for k, v in params.items()]
    return "-".join(parts)


def _parse_value(family, key, text, typ):
    """One grid value, converted to its type and checked by the options model (RepairOptions: one source)."""
    from hcnr_deploy.options import check_value

    try:
        v = typ(text)
    except ValueError:
        raise UserError(f"--grid {family}:{key}={text!r}: not a valid {typ.__name__}") from None
    if family == "guard":
        from hcnr_deploy.guard.options import GuardOptions

        try:
            GuardOptions(**{key: v})
        except UserError as e:
            raise UserError(f"--grid {family}:{key}={text}: {e.message}") from None
        return v
    problem = check_value(key, v)
    if problem is not None:
        raise UserError(f"--grid {family}:{key}={text}: {problem}")
    return v


def _check_combination(entry: str, family: str, params: dict):
    """A grid point the repair would refuse (e.g. lines' alpha + beta < 0) is an error before any work."""
    from hcnr_deploy.options import RepairOptions

    if family == "guard":  # not a repair: its values were checked by GuardOptions in _parse_value
        return
    try:
        RepairOptions(method=METHODS[family][0], **{**METHODS[family][1], **params})
    except UserError as e:
        raise UserError(f"--grid {entry!r}: {e.format_message()}") from None


def parse_grid(spec: str | None) -> list[Candidate]:
    """`--grid` text -> candidates (base and ft first, then the grid in its order, duplicates dropped).

    `hcnr:r_cw=0.1,0.4; regmean:task_weight=1,3; scale:alpha=0.5` -> base, ft, hcnr-rcw0.1, hcnr-rcw0.4,
    regmean-mu1, regmean-mu3, scale-a0.5."""
    spec = DEFAULT_GRID if spec is None else spec
    out = [Candidate("base", "base", "base"), Candidate("ft", "ft", "ft")]
    seen = set(REFERENCES)
    for entry in (e.strip() for e in spec.split(";")):
        if not entry or entry in REFERENCES:
            continue
        family, *groups = [g.strip() for g in entry.split(":")]
        family = family.lower()
        if family not in METHODS:
            raise UserError(f"--grid {entry!r}: unknown method {family!r}; choose from {', '.join(METHODS)} "
                            f"(format: {GRID_HELP.split(' Methods')[0]})")
        specs = METHODS[family][2]
        axes = []
        for g in groups:
            key, sep, values = g.partition("=")
            key = ALIASES.get(key.strip().lower(), key.strip().lower())
            if not sep or not values.strip():
                raise UserError(f"--grid {entry!r}: expected PARAM=V1,V2 after '{family}:', got {g!r}")
            if key not in specs:
                raise UserError(f"--grid {entry!r}: {family} has no parameter {key!r}; it takes "
                                f"{', '.join(specs)}")
            if any(k == key for k, _ in axes):
                raise UserError(f"--grid {entry!r}: parameter {key} is given twice")
            vals = [_parse_value(family, key, v.strip(), specs[key][0]) for v in values.split(",") if v.strip()]
            axes.append((key, vals))
        for combo in itertools.product(*[vals for _, vals in axes]):
            params = dict(zip([k for k, _ in axes], combo))
            _check_combination(entry, family, params)
            name = candidate_name(family, params)
            if name not in seen:
                seen.add(name)
                out.append(Candidate(name, family, METHODS[family][0], params))
    return out


# ---------------------------------------------------------------------------------------------- figures


def _arrays(samples: list[dict]):
    refused = np.array([bool(s.get("verdict", {}).get("refused", False)) for s in samples], dtype=bool)
    unans = np.array([bool(s.get("unanswerable")) for s in samples], dtype=bool)
    return refused, unans


def _ci(reps) -> list | None:
    lo, hi = M.percentile_ci(reps)
    return None if math.isnan(lo) else [round(float(lo), 6), round(float(hi), 6)]


def _num(x):
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


def candidate_figures(results: dict, names: list[str], benchmarks: list[str], domain_task: str,
                      n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per candidate: F1 / RF Delta per honesty benchmark and averaged over them, the false-refusal rate (refusals
    on answerable questions, averaged likewise), domain accuracy, the recovery ratio, and the changes against ft
    (domain accuracy, F1 gain, RF Delta gain), each with a 95% percentile interval; the changes' are paired.

    `results`: the eval harness's results dict with `samples` (log_samples=True) for every name in `names`
    (which holds "base" and "ft"). Resamples are stratified by class and shared by all candidates (paired), per
    benchmark with the seed the harness's report uses; the average's replicates average the benchmarks'."""
    i_base, i_ft = names.index("base"), names.index("ft")
    f1_pts, f1_reps, rf_pts, rf_reps, fr_pts, fr_reps, per_bench = [], [], [], [], [], [], {}
    for b in benchmarks:
        arrs = [_arrays(results["samples"][n][b]) for n in names]
        refused = np.stack([a[0] for a in arrs])
        unans = arrs[0][1]
        point = M.honesty_arrays(refused, unans)
        reps = M.bootstrap_replicates(M.honesty_arrays, {"refused": refused, "unanswerable": unans}, unans,
                                      n_boot, M.stable_seed(seed, b))
        per_bench[b] = (point, reps)
        f1_pts.append(point["f1"]), f1_reps.append(reps["f1"])
        rf_pts.append(point["rf_delta"]), rf_reps.append(reps["rf_delta"])
        fr_pts.append(point["refusal_answerable"]), fr_reps.append(reps["refusal_answerable"])
    f1, f1_r = np.mean(f1_pts, axis=0), np.mean(f1_reps, axis=0)
    rf, rf_r = np.mean(rf_pts, axis=0), np.mean(rf_reps, axis=0)
    far, far_r = np.mean(fr_pts, axis=0), np.mean(fr_reps, axis=0)
    correct = np.array([[float(bool(s.get("correct"))) for s in results["samples"][n][domain_task]] for n in names],
                       dtype=np.float32)
    dom = M.accuracy_arrays(correct)["accuracy"]
    dom_r = M.bootstrap_replicates(M.accuracy_arrays, {"correct": correct}, np.zeros(correct.shape[1]), n_boot,
                                   M.stable_seed(seed, domain_task))["accuracy"]
    rec = M.recovery_ratio(f1, f1[i_base], f1[i_ft])
    rec_r = M.recovery_ratio(f1_r, f1_r[i_base], f1_r[i_ft])
    out = {}
    for i, n in enumerate(names):
        out[n] = {
            "f1": _num(f1[i]), "f1_ci95": _ci(f1_r[i]), "rf_delta": _num(rf[i]), "rf_delta_ci95": _ci(rf_r[i]),
            "per_benchmark": {b: {"f1": _num(p["f1"][i]), "f1_ci95": _ci(r["f1"][i]),
                                  "rf_delta": _num(p["rf_delta"][i]), "rf_delta_ci95": _ci(r["rf_delta"][i]),
                                  "refusal_unanswerable": _num(p["refusal_unanswerable"][i]),
                                  "refusal_answerable": _num(p["refusal_answerable"][i])}
                              for b, (p, r) in per_bench.items()},
            "domain_accuracy": _num(dom[i]), "domain_accuracy_ci95": _ci(dom_r[i]),
            "recovery_ratio": _num(rec[i]), "recovery_ratio_ci95": _ci(rec_r[i]),
            "domain_change": _num(dom[i] - dom[i_ft]), "domain_change_ci95": _ci(dom_r[i] - dom_r[i_ft]),
            "f1_gain": _num(f1[i] - f1[i_ft]), "f1_gain_ci95": _ci(f1_r[i] - f1_r[i_ft]),
            "rf_delta_gain": _num(rf[i] - rf[i_ft]), "rf_delta_gain_ci95": _ci(rf_r[i] - rf_r[i_ft]),
            "false_refusal": _num(far[i]), "false_refusal_ci95": _ci(far_r[i]),
        }
    return out


def mark_pareto(cands: list[dict]) -> None:
    """Set `pareto` on each candidate dict: on the frontier of (honesty F1, domain accuracy), both maximised."""
    mask = M.pareto_mask([c["f1"] for c in cands], [c["domain_accuracy"] for c in cands])
    for c, m in zip(cands, mask):
        c["pareto"] = bool(m)


def unanswerable_share(results: dict, name: str, benchmarks: list[str]) -> dict[str, float]:
    """Per honesty benchmark: the share of unanswerable questions (the same for every model scored on it)."""
    return {b: float(_arrays(results["samples"][name][b])[1].mean()) for b in benchmarks}


def choose(cands: list[dict], max_domain_drop: float, honesty_metric: str = C.DEFAULT_HONESTY_METRIC):
    """hcnr_deploy.choice.choose: the paired choice (significant honesty gain, domain non-inferior at the margin,
    RF Delta not below ft's; else ft). Returns (name, reason)."""
    return C.choose(cands, max_domain_drop, honesty_metric)


def curve_gap(points: list[tuple[float, float]], curve: list[tuple[float, float]]) -> list[float | None]:
    """For each (f1, acc) point: acc minus the curve's accuracy at the same F1 (linear interpolation; None outside
    the curve's F1 range). Positive: the point lies above the curve (e.g. HCNR against delta scaling)."""
    c = sorted(curve)
    xs, ys = [p[0] for p in c], [p[1] for p in c]
    return [None if not xs[0] <= f1 <= xs[-1] else float(acc - np.interp(f1, xs, ys)) for f1, acc in points]


# ---------------------------------------------------------------------------------------------- table, figure


def _short(x: float, fmt: str) -> str:
    """A number without its leading zero (-0.013 -> -.013), so the table fits 80 columns."""
    return format(x, fmt).replace("0.", ".", 1) if abs(x) < 1 else format(x, fmt)


def _short_ci(ci) -> str:
    return "" if not ci else f"[{ci[0]:.2f},{ci[1]:.2f}]".replace("0.", ".")


def table_rows(cands: list[dict], chosen: str, reference: dict | None = None) -> list[list[str]]:
    """The frontier table's cells: candidate, F1 [CI], RF Delta, false refusals, domain [CI], domain change,
    edited, marks; `reference` (choice.always_refuse) adds the always-refuse row."""
    rows = []
    for c in cands:
        ef, fr = c.get("edited_fraction"), c.get("false_refusal")
        mark = ("*" if c["pareto"] else "") + (" <" if c["name"] == chosen else "")
        rows.append([c["name"], f"{c['f1']:.3f} {_short_ci(c['f1_ci95'])}", _short(c["rf_delta"], "+.3f"),
                     "-" if fr is None else _short(fr, ".2f"),
                     f"{c['domain_accuracy']:.3f} {_short_ci(c['domain_accuracy_ci95'])}",
                     _short(c["domain_change"], "+.3f"), "-" if ef is None else f"{ef:.0%}", mark])
    if reference and reference.get("f1") is not None:
        rows.append(["always-refuse", f"{reference['f1']:.3f}", _short(reference["rf_delta"], "+.3f"),
                     _short(reference["false_refusal"], ".2f"), "-", "-", "-", ""])
    return rows


HEADERS = ["candidate", "F1 [95% CI]", "RF Δ", "FR", "domain [95% CI]", "Δdom", "edit", "P"]


def rich_table(cands: list[dict], chosen: str, title: str = "sweep: honesty / domain frontier",
               reference: dict | None = None):
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False, collapse_padding=True,
                  show_edge=False,
                  caption="P: * Pareto frontier, < chosen. FR: refusals of answerable questions. edit: "
                          "eligible weights changed vs ft")
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("candidate", "P") else "right", no_wrap=True)
    for row in table_rows(cands, chosen, reference):
        table.add_row(*row, style="bold" if row[0] == chosen else ("dim" if row[0] == "always-refuse" else None))
    return table


def markdown_table(cands: list[dict], chosen: str, reference: dict | None = None) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|---" + "|---:" * (len(HEADERS) - 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(cands, chosen, reference)]
    return "\n".join(lines)


STYLES = {"hcnr": ("o-", "C0"), "random": ("s--", "C1"), "regmean": ("^-", "C2"), "scale": ("d:", "C3"),
          "sft": ("v-", "C4"), "taskaware": (">-.", "C6"), "lines": ("<:", "olive"), "guard": ("h-", "k"), "rait": ("x-", "C5"),
          "dpo": ("P-", "C8"), "orpo": ("*-", "C9")}  # one curve per family, its points in the order given
# single points (candidates with `single: True`), by name; base and ft are always drawn as points
POINT_STYLES = {"hcnr": ("P", "C0"), "random": ("s", "C1"), "no-task": ("D", "C7"), "no-comp": ("d", "C7"),
                "exact": ("p", "C0"), "icl": ("<", "m"), "rehearsal": ("h", "teal")}


def plot_frontier(cands: list[dict], chosen: str | None, path, title: str = ""):
    """frontier.png: domain accuracy against honesty F1, one curve per family of STYLES (its points in the order
    of `cands`), the Pareto frontier as a step line, base / ft / the chosen point (when given) marked.

    A candidate with `single: True` is drawn as a marker of its own (POINT_STYLES by name, e.g. reproduce.py's
    icl, rehearsal and default hcnr), not on its family's curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for family, (style, color) in STYLES.items():
        pts = [c for c in cands if c["family"] == family and not c.get("single")]
        if pts:
            ax.plot([c["f1"] for c in pts], [c["domain_accuracy"] for c in pts], style, color=color, label=family)
            for c in pts:
                ax.annotate(c["name"][len(family) + 1:], (c["f1"], c["domain_accuracy"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    front = sorted((c["f1"], c["domain_accuracy"]) for c in cands if c["pareto"])
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.5", lw=1, alpha=0.7,
                label="Pareto frontier")
    for name, marker in (("base", "k*"), ("ft", "kX")):
        c = next((c for c in cands if c["name"] == name), None)
        if c:
            ax.plot(c["f1"], c["domain_accuracy"], marker, markersize=11, label=name)
    for c in cands:
        if c.get("single") and c["name"] not in REFERENCES:
            marker, color = POINT_STYLES.get(c["name"], ("o", "0.4"))
            label = c["name"] + (" (default)" if c["name"] in STYLES else "")  # beside its family's curve
            ax.plot(c["f1"], c["domain_accuracy"], marker, color=color, markersize=10, label=label)
    if chosen is not None:
        c = next(c for c in cands if c["name"] == chosen)
        ax.plot(c["f1"], c["domain_accuracy"], "o", markersize=16, mfc="none", mec="red", mew=2,
                label=f"chosen: {chosen}")
    ax.set_xlabel("honesty F1 (mean over honesty benchmarks)")
    ax.set_ylabel("domain accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
