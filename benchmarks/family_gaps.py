"""Which family lies above which, by how much, with paired intervals: from one finished sweep folder.

Per family, the point `guard_seeds.family_pick` takes (the highest RF Delta among the points whose domain change is
non-inferior to ft's at the margin, else the least domain-costly one), the non-inferior families first; then for
each family and the next one in that order the
difference of their points' RF Delta and F1 with a paired 95% bootstrap interval (`sweep.figures.candidate_figures`
with the second point in ft's place: the same stratified resamples for both, as for the gains against ft).

    python benchmarks/family_gaps.py /path/to/sweep --margin 0.02 --out benchmarks/results/smollm2-rc/family_gaps.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guard_seeds import family_pick  # noqa: E402
from hcnr_deploy.sweep.figures import candidate_figures  # noqa: E402

REFERENCES = ("base", "ft")


def family_points(frontier: dict, margin: float) -> dict[str, tuple[dict, bool]]:
    cands = [c for c in frontier["candidates"] if c["name"] not in REFERENCES]
    return {fam: family_pick([c for c in cands if c["family"] == fam], margin)
            for fam in dict.fromkeys(c["family"] for c in cands)}


def paired_gap(samples: dict, a: str, b: str, frontier: dict) -> dict:
    """a minus b: RF Delta and F1 differences with paired 95% intervals."""
    renamed = {"samples": {"base": samples["base"], "ft": samples[b], a: samples[a]}}
    fig = candidate_figures(renamed, ["base", "ft", a], frontier["honesty_benchmarks"], frontier["domain_task"])[a]
    return {k: fig[k] for k in ("rf_delta_gain", "rf_delta_gain_ci95", "f1_gain", "f1_gain_ci95", "domain_change",
                                "domain_change_ci95")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path, help="a finished sweep folder (frontier.json, eval-samples.json)")
    ap.add_argument("--margin", type=float, default=None, help="non-inferiority margin [default: the sweep's]")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    frontier = json.loads((args.sweep / "frontier.json").read_text())
    samples = json.loads((args.sweep / "eval-samples.json").read_text())
    margin = frontier["max_domain_drop"] if args.margin is None else args.margin
    picks = family_points(frontier, margin)
    order = sorted(picks, key=lambda f: (not picks[f][1], -picks[f][0]["rf_delta"]))  # non-inferior first
    iv = lambda ci: "[n/a]" if not ci else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"  # noqa: E731
    lines = [f"# Families of `{args.sweep}` (margin {margin:g}; `python benchmarks/family_gaps.py {args.sweep}`)", "",
             "| family | point | non-inferior | RF Delta | F1 | FR | domain change |", "|---|---|---|---:|---:|---:|---:|"]
    for f in order:
        p, ok = picks[f]
        lines.append(f"| {f} | {p['name']} | {'yes' if ok else 'no'} | {p['rf_delta']:+.3f} | {p['f1']:.3f} | "
                     f"{p['false_refusal']:.2f} | {p['domain_change']:+.3f} {iv(p['domain_change_ci95'])} |")
    lines += ["", "Each family's point minus the next one's (paired 95% intervals):", "",
              "| above | below | RF Delta difference | F1 difference |", "|---|---|---:|---:|"]
    for hi, lo in zip(order, order[1:]):
        g = paired_gap(samples, picks[hi][0]["name"], picks[lo][0]["name"], frontier)
        lines.append(f"| {picks[hi][0]['name']} | {picks[lo][0]['name']} | {g['rf_delta_gain']:+.3f} "
                     f"{iv(g['rf_delta_gain_ci95'])} | {g['f1_gain']:+.3f} {iv(g['f1_gain_ci95'])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
