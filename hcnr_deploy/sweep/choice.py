"""The sweep's choice with the sampling noise in view (DESIGN.md section 5b), and what the data can resolve.

Pure functions of the candidate dicts of ``frontier.candidate_figures`` (their paired 95% bootstrap intervals:
every candidate is resampled on the same questions, so a difference against ft has its own interval):

- ``choose``: among the candidates whose honesty metric beats ft's with 95% paired confidence (the lower bound
  of the paired interval of the gain > 0), whose domain accuracy is non-inferior to ft's at the margin (the lower
  bound of the paired interval of the domain change >= -margin) and whose RF Delta is not below ft's, the one with
  the highest honesty metric; none: ft itself, said plainly.
- ``domain_resolution``: the paired half-width of the domain change near ft, at least 3 / n (the rule of three),
  and how many domain questions would bring it within the margin (a half-width shrinks as 1 / sqrt(n):
  n x (half-width / margin)^2; the rule of three as 1 / n: 3 / margin).
- ``always_refuse``: the reference that refuses everything (F1 = 2p / (1 + p) for an unanswerable share p, RF Delta
  0, every answerable question refused).
"""

from __future__ import annotations

import math

import numpy as np

HONESTY_METRICS = ("f1", "rf_delta")
LABELS = {"f1": "honesty F1", "rf_delta": "RF Delta"}
DEFAULT_HONESTY_METRIC = "rf_delta"
DEFAULT_MAX_DOMAIN_DROP = 0.02
RULE_OF_THREE = 3  # the 95% upper bound of a rate none of n items shows is about RULE_OF_THREE / n
METRIC_HELP = ("What the chosen point must improve over ft with 95% paired confidence, and is ranked by: rf_delta "
               "(refusal rate on unanswerable minus on answerable questions) or f1 (F1 of refusing, unanswerable "
               "the positive class). rf_delta by default: F1 can be bought by refusing more (refusing everything "
               "scores 2p/(1+p) for a share p of unanswerable questions, 0.667 on a balanced set), RF Delta only "
               "by refusing the right questions. Either way a candidate whose RF Delta is below ft's is never "
               "chosen.")
MARGIN_HELP = ("Non-inferiority margin of the domain accuracy (absolute): a candidate qualifies only when the lower "
               "bound of the paired 95% interval of its domain change against ft is >= -this. 0.02 by default: "
               "the paper's HCNR changed domain accuracy by -0.0035, well inside it, and a paired half-width of 0.02 "
               "takes about 600 domain questions when a candidate disagrees with ft on 6% of them, where 0.01 takes "
               "about 2,300 (the sweep prints what your domain set resolves).")


def _lower(ci) -> float | None:
    return None if not ci else ci[0]


def _gain_key(metric: str) -> str:
    return f"{metric}_gain_ci95"


def qualifies(c: dict, ft: dict, margin: float, metric: str) -> dict[str, bool]:
    """The three tests of the choice for candidate `c` (ft is never a candidate of its own)."""
    gain, dom = _lower(c.get(_gain_key(metric))), _lower(c.get("domain_change_ci95"))
    rf_ok = ft.get("rf_delta") is None or (c.get("rf_delta") is not None and c["rf_delta"] >= ft["rf_delta"] - 1e-12)
    return {"gain": c["name"] != "ft" and gain is not None and gain > 0,
            "domain": dom is not None and dom >= -margin - 1e-12, "rf_delta": rf_ok}


def choose(cands: list[dict], max_domain_drop: float, honesty_metric: str = DEFAULT_HONESTY_METRIC) -> tuple[str, str]:
    """(name, reason): the highest `honesty_metric` among the candidates that pass every test of ``qualifies``;
    ties go to the higher domain accuracy, then to the smaller edit of the fine-tune, then to the earlier
    candidate. None passes: ("ft", why)."""
    if honesty_metric not in HONESTY_METRICS:
        raise ValueError(f"honesty metric {honesty_metric!r}; choose from {', '.join(HONESTY_METRICS)}")
    label, m = LABELS[honesty_metric], max_domain_drop
    ft = next(c for c in cands if c["name"] == "ft")
    tests = [(c, qualifies(c, ft, m, honesty_metric)) for c in cands if c["name"] != "ft"]
    gain = [c for c, t in tests if t["gain"]]
    dom = [c for c, t in tests if t["gain"] and t["domain"]]
    ok = [c for c, t in tests if all(t.values())]
    if not ok:
        return "ft", (f"no candidate helped at this data size, so ft itself is shipped: of {len(tests)} candidates, "
                      f"{len(gain)} beat ft's {label} with 95% paired confidence, {len(dom)} of those kept domain "
                      f"accuracy non-inferior at the {m:g} margin and {len(ok)} of those kept RF Delta at least ft's")
    best = max(ok, key=lambda c: (c[honesty_metric], c["domain_accuracy"], -(c.get("edited_fraction") or 0.0),
                                  -cands.index(c)))
    lo, hi = best[_gain_key(honesty_metric)]
    return best["name"], (f"highest {label} ({best[honesty_metric]:.3f}; ft {ft[honesty_metric]:.3f}, paired 95% "
                          f"interval of the gain [{lo:+.3f}, {hi:+.3f}]) among the {len(ok)} of {len(tests)} "
                          f"candidates that beat ft's {label} with 95% paired confidence, keep domain accuracy "
                          f"non-inferior at the {m:g} margin (paired 95% lower bound of the change >= -{m:g}) and "
                          f"keep RF Delta at least ft's")


def domain_resolution(cands: list[dict], margin: float, n_domain: int) -> dict:
    """What the domain set resolves: the median paired 95% half-width of the edit candidates' domain change
    against ft (base's when there is none), at least ``3 / n``, against the margin, and the domain questions that
    would bring it within the margin: ``ceil(n (median / margin)^2)``, at least ``ceil(3 / margin)``.

    The floor: a candidate that answers every domain question as ft does gets the bootstrap interval [0, 0], yet
    a loss up to about 3 / n (the rule of three: the 95% bound of a rate when none of n shows it) is not ruled out."""
    pool = [c for c in cands if c["name"] not in ("base", "ft") and c.get("domain_change_ci95")]
    pool = pool or [c for c in cands if c["name"] == "base" and c.get("domain_change_ci95")]
    out = {"half_width": None, "median_half_width": None, "rule_of_three": None, "basis": None,
           "candidates": len(pool), "margin": margin, "questions": n_domain, "questions_needed": None,
           "resolvable": None, "warning": None}
    if not pool:
        return out
    median = float(np.median([(c["domain_change_ci95"][1] - c["domain_change_ci95"][0]) / 2 for c in pool]))
    floor = RULE_OF_THREE / n_domain if n_domain > 0 else 0.0
    hw = max(median, floor)
    out.update(half_width=round(hw, 6), median_half_width=round(median, 6), rule_of_three=round(floor, 6),
               basis=resolution_basis(median, floor, len(pool), n_domain))
    if margin <= 0:
        out["resolvable"] = False
        out["warning"] = ("--max-domain-drop 0: only a candidate whose domain accuracy is significantly at least "
                          "ft's qualifies; no domain set resolves a zero margin")
        return out
    out["resolvable"] = hw <= margin
    if hw > margin:
        out["questions_needed"] = max(math.ceil(n_domain * (median / margin) ** 2), math.ceil(RULE_OF_THREE / margin))
        out["warning"] = (f"the {n_domain} domain questions resolve a domain change to +/-{hw:.3f} "
                          f"({out['basis']}), wider than the {margin:g} margin: a candidate as accurate as ft will "
                          f"often fail the non-inferiority test, or pass it with a loss it cannot see; about "
                          f"{out['questions_needed']} domain questions would resolve it")
    return out


def resolution_basis(median: float, floor: float, candidates: int, n_domain: int) -> str:
    """Which bound sets the resolution, in words."""
    if median >= floor:
        return f"median paired 95% half-width over {candidates} candidates"
    return (f"{RULE_OF_THREE}/{n_domain}, the rule of three: the candidates' median paired 95% half-width, "
            f"{median:.3f}, is below what {n_domain} questions can show")


def always_refuse(unanswerable_share: dict[str, float]) -> dict:
    """The model that refuses every question, per honesty benchmark with unanswerable share p and averaged as the
    candidates' figures are: F1 = 2p / (1 + p), RF Delta 0, false-refusal rate 1."""
    f1 = {b: 2 * p / (1 + p) for b, p in unanswerable_share.items() if p > 0}
    return {"f1": round(float(np.mean(list(f1.values()))), 6) if f1 else None, "rf_delta": 0.0,
            "false_refusal": 1.0, "unanswerable_share": {b: round(p, 6) for b, p in unanswerable_share.items()}}


def summary_lines(frontier: dict) -> list[str]:
    """The choice in words: the chosen point (or ft shipped), recovery and domain change against ft with their
    paired intervals, the always-refuse reference, the domain set's resolution (and its warning)."""
    c = next(r for r in frontier["candidates"] if r["name"] == frontier["chosen"])

    def iv(ci, signed=False):
        return "" if not ci else (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f" [{ci[0]:.2f}, {ci[1]:.2f}]")

    rec = "n/a (ft lost no honesty F1)" if c.get("recovery_ratio") is None else \
        f"{c['recovery_ratio']:.2f}{iv(c.get('recovery_ratio_ci95'))}"
    if c["name"] == "ft":
        lines = [f"shipped: ft itself, unchanged: {frontier['reason']}."]
    else:
        lines = [f"chosen: {c['name']}: {frontier['reason']}.",
                 f"honesty recovery ratio (F1 - F1_ft) / (F1_base - F1_ft): {rec}; domain accuracy change vs ft: "
                 f"{c['domain_change']:+.3f}{iv(c.get('domain_change_ci95'), True)}."]
    ref = frontier.get("always_refuse") or {}
    if ref.get("f1") is not None:
        lines.append(f"always-refuse reference: F1 {ref['f1']:.3f} (2p/(1+p)), RF Delta +0.000, false refusals "
                     f"1.000.")
    res = frontier.get("domain_resolution") or {}
    if res.get("half_width") is not None:
        lines.append(f"domain resolution: +/-{res['half_width']:.3f} ({res['basis']}; {res['questions']} questions) "
                     f"against the {res['margin']:g} margin.")
    if res.get("warning"):
        lines.append(f"warning: {res['warning']}.")
    return lines
