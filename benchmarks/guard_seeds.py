"""Across training seeds: how far each family gets, from `guard_frontier.py`'s summary.json files.

For each seed: base, ft, Rehearsal, the sweep's choice, and per family the point with the highest RF Delta among
those whose domain change is non-inferior to ft's (lower bound of the paired 95% interval >= -margin), or the
family's least domain-costly point when none is; then each family's mean F1 recovery over the seeds.

    python benchmarks/guard_seeds.py benchmarks/results/guard/tiny-seed{0,1,2} --margin 0.03
    python benchmarks/guard_seeds.py benchmarks/results/smollm2-rc/guard_frontier.json \
        benchmarks/results/guard/smollm2-rc-seed{1,2} --margin 0.02
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FIXED = ("base", "ft", "rehearsal")


def non_inferior(p: dict, margin: float) -> bool:
    return p["domain_change_ci95"][0] >= -margin


def family_pick(points: list[dict], margin: float) -> tuple[dict, bool]:
    """(point, whether it is non-inferior): the best RF Delta within the margin, else the smallest domain loss."""
    ok = [p for p in points if non_inferior(p, margin)]
    if ok:
        return max(ok, key=lambda p: p["rf_delta"]), True
    return max(points, key=lambda p: p["domain_change"]), False


def rows(summary: dict, margin: float) -> list[tuple[str, dict, bool | None]]:
    pts = summary["points"]
    by_name = {p["name"]: p for p in pts}
    out = [(n, by_name[n], None if n in ("base", "ft") else non_inferior(by_name[n], margin))
           for n in FIXED if n in by_name]
    families = sorted({p["family"] for p in pts} - set(FIXED))
    for fam in families:
        p, ok = family_pick([q for q in pts if q["family"] == fam], margin)
        out.append((fam, p, ok))
    return out


def fmt_ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def table(summaries: list[dict], margin: float) -> str:
    lines = [f"Per family: the highest RF Delta whose paired domain change is non-inferior at the {margin} margin "
             "(marked *), else the family's least domain-costly point. FR = refusals on answerable questions.", "",
             "| seed | row | point | F1 | RF Δ [95%] | FR | Δdomain [95%] | F1 recovery [95%] |",
             "|---|---|---|---|---|---|---|---|"]
    recov: dict[str, list[float]] = {}
    for s in summaries:
        for row, p, ok in rows(s, margin):
            mark = "" if ok is None else (" *" if ok else "")
            rec = p["recovery_ratio"]
            if row not in ("base", "ft"):
                recov.setdefault(row, []).append(rec if ok else float("nan"))
            lines.append(f"| {s['seed']} | {row} | {p['name']}{mark} | {p['f1']:.3f} | {p['rf_delta']:+.3f} "
                         f"{fmt_ci(p['rf_delta_ci95'])} | {p['false_refusal']:.3f} | {p['domain_change']:+.3f} "
                         f"{fmt_ci(p['domain_change_ci95'])} | {rec:.2f} {fmt_ci(p['recovery_ratio_ci95'])} |")
        lines.append(f"| {s['seed']} | chosen | {s['chosen']} | | | | | |")
    lines += ["", "Mean F1 recovery over seeds of the non-inferior pick (nan: some seed had none within the margin):", ""]
    for row, vals in recov.items():
        good = [v for v in vals if v == v]
        mean = sum(vals) / len(vals) if len(good) == len(vals) else float("nan")
        scored = "" if len(vals) == len(summaries) else f"; scored on {len(vals)} of {len(summaries)} seeds"
        lines.append(f"- {row}: {mean:.2f} ({len(good)}/{len(vals)} seeds non-inferior{scored})")
    return "\n".join(lines) + "\n"


def load(folder: Path) -> dict:
    """A guard_frontier.py summary (its summary.json, or the file itself, e.g. a kept guard_frontier.json), or a
    sweep's frontier.json (its folder name stands for the seed)."""
    if folder.is_file():
        return json.loads(folder.read_text())
    if (folder / "summary.json").exists():
        return json.loads((folder / "summary.json").read_text())
    f = json.loads((folder / "frontier.json").read_text())
    return {"seed": folder.name, "points": f["candidates"], "chosen": f["chosen"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path,
                    help="guard_frontier.py --out folders (summary.json) or summary files, or sweep folders "
                         "(frontier.json)")
    ap.add_argument("--margin", type=float, default=0.03, help="the non-inferiority margin on domain accuracy")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    summaries = sorted((load(d) for d in args.dirs), key=lambda s: str(s["seed"]))
    text = table(summaries, args.margin)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
