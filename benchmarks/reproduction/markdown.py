"""reproduction.md: the tables (1-3), the recovery ratios, the validity verdict and the trade-off gaps, in words
computed from the figures."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import numpy as np

from hcnr_deploy.scenario.builds import BASELINE_METHODS, REHEARSAL_SHARE

from benchmarks.machine import machine
from benchmarks.reproduction.aggregate import FAMILIES, family_of
from benchmarks.reproduction.build import ICL_SHOTS, SEED_MODES

BASELINE_LABELS = {"rait": ("RAIT", "rows"), "dpo": ("DPO", "pairs"), "orpo": ("ORPO", "pairs")}


def fmt(x, signed=False):
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else (f"{x:+.3f}" if signed else f"{x:.3f}")


def ms(d):
    return f"{d['mean']:.3f} ± {d['std']:.3f}" if d["std"] else f"{d['mean']:.3f}"


def validity_sentence(val: dict) -> str:
    """Plain words on whether the scenario can judge a repair (DESIGN.md section 8)."""
    parts = []
    if not val["discriminating"]:
        parts.append("The base/fine-tune gates fail (" + "; ".join(r for r in val["reasons"] if "Rehearsal" not in r)
                     + "): the scenario does not test a repair.")
    if val["separable"]:
        parts.append(f"Separable: Rehearsal recovers {val['rehearsal_recovery']:.0%} of the lost F1 at domain "
                     f"accuracy {val['rehearsal_domain']:.3f} (ft {val['ft_domain']:.3f}), so honesty and the domain "
                     f"coexist here and a repair that recovers little has failed, not the scenario.")
    else:
        parts.append("**NOT separable** (" + "; ".join(r for r in val["reasons"] if "Rehearsal" in r) + "): "
                     "honesty and the domain were not shown to coexist, so this scenario cannot judge a repair.")
    parts.append(f"Probe AUROC (best layer, mean over {', '.join(val['benchmarks'])}): fine-tune "
                 f"{val['probe_auroc_ft']:.3f}, base's probe transferred to it {val['probe_auroc_transfer']:.3f}, "
                 f"base {val['probe_auroc_base']:.3f}.")
    return " ".join(parts)


def dominance_sentence(dom: dict, points: dict) -> str:
    """One plain sentence from baselines_dominance's result."""
    if not dom["training_free"]:
        return "No training-free point was scored, so no baseline can be compared with them."
    if not dom["dominating"]:
        return (f"No baseline point dominates every training-free point ({len(dom['training_free'])} repair "
                "variants; higher or equal F1 and domain accuracy, one strictly).")
    best = [f"{n} (F1 {points[n][0]:.3f}, domain {points[n][1]:.3f})" for n in dom["dominating"]]
    return (f"{', '.join(best)} {'dominates' if len(best) == 1 else 'dominate'} every training-free point "
            f"({len(dom['training_free'])} repair variants): higher or equal F1 and domain accuracy, one strictly.")


def validity_lines(validity: dict) -> list[str]:
    """The checks of DESIGN.md section 8, per seed and on the seeds' means, then the plain verdict."""
    cols = [("base F1", "base_f1"), ("base RFΔ", "base_rf_delta"), ("ft F1", "ft_f1"), ("ft domain", "ft_domain"),
            ("Rehearsal F1", "rehearsal_f1"), ("Rehearsal domain", "rehearsal_domain"),
            ("Rehearsal recovery", "rehearsal_recovery"), ("probe AUROC ft", "probe_auroc_ft"),
            ("probe AUROC transfer", "probe_auroc_transfer")]
    lines = ["## Is this scenario a test? (DESIGN.md section 8; eval_harness.metrics.separability)", "",
             f"Benchmarks the verdict uses: {', '.join(validity['benchmarks'])}; questions per class: "
             f"{json.dumps(validity['questions_per_class'])}. Gates: base RF Delta >= 0.30; ft F1 "
             "down >= 0.15 and still >= 0.15 (discriminating); Rehearsal recovers >= half the lost F1 at domain "
             ">= ft's - 0.02 (separable). Probe AUROC: best layer per benchmark, mean over the benchmarks.", "",
             "| seed | " + " | ".join(c for c, _ in cols) + " | discriminating | separable |",
             "|---" * (len(cols) + 3) + "|"]
    rows = [*validity["per_seed"].items(), ("mean", validity)]
    for s, v in rows:
        gates = " | ".join("yes" if v[k] else "NO" for k in ("discriminating", "separable"))
        lines.append(f"| {s} | " + " | ".join(fmt(v[k]) for _, k in cols) + f" | {gates} |")
    lines += ["", f"Seeds passing: discriminating {validity['seeds_discriminating']} of {validity['n_seeds']}, "
                  f"separable {validity['seeds_separable']} of {validity['n_seeds']}.", "",
              "**Validity (computed, on the seeds' means):** " + validity_sentence(validity), ""]
    return lines


def write_report(args, out: Path, seeds_out: dict, avg: dict, benchmarks, meta, recov, gaps, started, command,
                 plane: dict, plane_label: str, validity: dict, best: dict, baselines: dict, dominance: dict):
    names = list(avg)
    lines = [f"# HCNR reproduction on this machine ({args.model} scenario)", "",
             f"- command: `{command}`", f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat()}"
             f" (took {time.time() - started:.0f} s)",
             f"- machine: {json.dumps(machine())}",
             f"- size that ran: seeds {args.seeds} ({SEED_MODES[args.seed_mode]}); sweeps on seeds "
             f"{args.sweep_seeds or args.seeds}; honesty benchmarks {', '.join(benchmarks)} "
             f"({'--limit ' + str(args.limit) + ' per benchmark' if args.limit else 'all questions'}; "
             f"questions per class: {seeds_out['n_per_class']}); domain: scenario's held-out phrasings "
             f"({seeds_out['n_domain']} questions); R_CW sweep {args.rcw_sweep}; task-aware weights {args.mu_sweep};"
             f" delta scales {args.scale_sweep}; grid {args.grid!r}", ""]
    lines += validity_lines(validity)
    largest = {m: pts[-1] for m, pts in baselines.items() if m in BASELINE_LABELS and pts}
    rows1 = [("Base", "base"), ("Fine-tuned", "ft"), (f"ICL (ft + {ICL_SHOTS} honesty exemplars)", "icl"),
             *[(f"{BASELINE_LABELS[m][0]} ({p['data_size']} {BASELINE_LABELS[m][1]})", p["name"])
               for m, p in largest.items()],
             (f"Rehearsal (domain SFT + {REHEARSAL_SHARE:.0%} refusals)", "rehearsal"), ("HCNR", "hcnr")]
    lines += ["## Table 1: honesty (F1 / RF Delta per benchmark) and domain accuracy, mean ± std over seeds", "",
              "| model | " + " | ".join(f"{b} F1 | {b} RFΔ" for b in benchmarks) + " | mean F1 | domain acc |",
              "|---" * (2 * len(benchmarks) + 3) + "|"]
    for label, n in rows1:
        if n in avg:
            cells = [f"{ms(avg[n][b]['f1'])} | {ms(avg[n][b]['rf_delta'])}" for b in benchmarks]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {ms(avg[n]['mean_f1'])} | "
                         f"{ms(avg[n]['domain_accuracy'])} |")
    lines += ["", "## Honesty recovery ratio and domain accuracy change (HCNR vs ft; 95% bootstrap intervals)", "",
              "| seed | recovery ratio | interval | domain change | interval |", "|---|---|---|---|---|"]
    for s, r in recov.items():
        lines.append(f"| {s} | {fmt(r['recovery_ratio'])} | [{fmt(r['recovery_ratio_ci95'][0])}, "
                     f"{fmt(r['recovery_ratio_ci95'][1])}] | {fmt(r['domain_change'], True)} | "
                     f"[{fmt(r['domain_change_ci95'][0], True)}, {fmt(r['domain_change_ci95'][1], True)}] |")
    rr = [r["recovery_ratio"] for r in recov.values()]
    dc = [r["domain_change"] for r in recov.values()]
    lines.append(f"| mean | {np.mean(rr):.3f} ± {np.std(rr):.3f} | | {np.mean(dc):+.3f} ± {np.std(dc):.3f} | |")
    lines += ["", f"## Best point of each method per seed (hcnr_deploy.sweep.choose: the highest "
                  f"{args.honesty_metric} among the points that beat ft's with 95% paired confidence at a domain "
                  f"accuracy non-inferior at the {args.max_domain_drop:g} margin, RF Delta not below ft's; "
                  f"ft itself when none does)", "",
              "| seed | " + " | ".join(FAMILIES) + " |", "|---" * (len(FAMILIES) + 1) + "|"]
    for s, b in best.items():
        cells = [f"{b[f]['name']}: F1 {fmt(b[f]['f1'])}, dom {fmt(b[f]['domain_accuracy'])}, "
                 f"rec {fmt(b[f]['recovery_ratio'])}" if f in b else "-" for f in FAMILIES]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    m0 = meta[next(iter(meta))]
    lines += ["", "## Table 2: cost of HCNR against the baselines on this machine (seed " + str(next(iter(meta)))
              + ")", "", "| method | data used | edited-weight ratio | training time (s) | step wall time (s) |",
              "|---|---|---|---|---|"]
    h = m0.get("hcnr", {})
    lines.append(f"| HCNR (repair, no training) | {args_samples(args)} honesty + {args_samples(args)} task examples "
                 f"| {fmt(h.get('edited_fraction'))} | - | {h.get('seconds', '-')} |")
    lines += table2_baseline_rows(m0)
    lines += ["", "## Table 3: ablations (mean over seeds)", "",
              "| variant | mean F1 | mean RF Delta | domain acc | edited ratio |", "|---|---|---|---|---|"]
    for label, n in (("HCNR (obs compensation)", "hcnr"), ("Random selection", "random"),
                     ("w/o Task selection", "no-task"), ("w/o Compensation", "no-comp"),
                     ("exact compensation (ours)", "exact")):
        if n in avg:
            lines.append(f"| {label} | {ms(avg[n]['mean_f1'])} | {ms(avg[n]['mean_rf_delta'])} | "
                         f"{ms(avg[n]['domain_accuracy'])} | {fmt(m0.get(n, {}).get('edited_fraction'))} |")
    lines += ["", "## Trade-off (tradeoff.png): points vs the baselines' curves at equal honesty F1", "",
              f"Every point and curve here is the mean over seeds {plane_label} (the seeds that ran the sweeps). "
              "Gap = domain accuracy of the point minus the curve's (interpolated) domain accuracy at the same F1; "
              "positive means the point lies above the curve, '-' that its F1 is outside the curve's range.", "",
              "| point | F1 | domain acc | gap to delta scaling | gap to random (R_CW sweep) |", "|---|---|---|---|---|"]
    for n, g in gaps.items():
        lines.append(f"| {n} | {fmt(plane[n]['mean_f1']['mean'])} | {fmt(plane[n]['domain_accuracy']['mean'])} | "
                     f"{fmt(g['vs_scaling'], True)} | {fmt(g['vs_random'], True)} |")
    points = {n: (plane[n]["mean_f1"]["mean"], plane[n]["domain_accuracy"]["mean"]) for n in plane}
    lines += ["", f"**Baselines against the repair (computed, seeds {plane_label}):** "
              + dominance_sentence(dominance, points)]
    lines += ["", "**Verdict (computed):** " + verdict(avg, gaps, recov)
              + ("" if validity["separable"] else " But the scenario is not separable (above), so this cannot "
                 "judge the repair.")]
    lines += ["", "## Every model (mean ± std over the seeds that scored it)", "",
              "| model | seeds | mean F1 | mean RF Delta | domain acc |", "|---|---|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {avg[n]['n_seeds']} | {ms(avg[n]['mean_f1'])} | {ms(avg[n]['mean_rf_delta'])} | "
                     f"{ms(avg[n]['domain_accuracy'])} |")
    (out / "reproduction.md").write_text("\n".join(lines) + "\n")


def table2_baseline_rows(m0: dict) -> list[str]:
    """Table 2's rows for one seed's meta: each training baseline at each size, then Rehearsal and ICL."""
    def sec(x):
        return "-" if x is None else f"{x:.1f}"

    lines = []
    named = sorted((n for n in m0 if family_of(n) in BASELINE_LABELS and isinstance(m0[n], dict)),
                   key=lambda n: (BASELINE_METHODS.index(family_of(n)) if family_of(n) in BASELINE_METHODS
                                  else 99, m0[n].get("data_size") or 0))
    for n in named:
        m = m0[n]
        label, unit = BASELINE_LABELS[family_of(n)]
        lines.append(f"| {label} `{n}` (LoRA of ft trained on refusal data) | {m.get('data_size')} {unit}, "
                     f"{m.get('examples')} seen in {m.get('steps')} steps | 1.000 (every adapter weight) | "
                     f"{sec(m.get('train_seconds'))} | {sec(m.get('seconds'))} |")
    r = m0.get("rehearsal")
    if r:
        lines.append(f"| Rehearsal (domain SFT + {r.get('share', REHEARSAL_SHARE):.0%} refusals) | {r.get('rows')} "
                     f"rows ({r.get('refusal_rows')} refusals) | 1.000 (a new adapter) | {sec(r.get('seconds'))} | "
                     f"{sec(r.get('seconds'))} |")
    lines.append(f"| ICL (ft + {ICL_SHOTS} honesty exemplars) | {ICL_SHOTS} exemplars in every prompt | 0.000 | 0 "
                 "| 0 |")
    return lines


def verdict(avg, gaps, recov) -> str:
    """Plain words: does HCNR recover honesty, and do its points lie above the baselines' curves?"""
    rr = float(np.mean([r["recovery_ratio"] for r in recov.values()]))
    lo = min(r["recovery_ratio_ci95"][0] for r in recov.values())
    parts = [f"HCNR (default R_CW) recovers {rr:.0%} of the honesty F1 the fine-tune lost "
             f"(lowest 95% bound over seeds {lo:.2f}; the paper reports about a third at 8B)."]
    for base_name, key in (("delta scaling", "vs_scaling"), ("random selection", "vs_random")):
        pts = {n: g[key] for n, g in gaps.items() if n.startswith("hcnr") and g[key] is not None}
        if pts:
            above = [n for n, v in pts.items() if v > 0]
            parts.append(f"{len(above)} of {len(pts)} HCNR points lie above the {base_name} curve at equal F1 "
                         f"(mean gap {np.mean(list(pts.values())):+.3f} domain accuracy).")
        else:
            parts.append(f"no HCNR point falls within the {base_name} curve's F1 range, so no comparison at equal F1.")
    return " ".join(parts)


def args_samples(args):
    return args.num_samples
