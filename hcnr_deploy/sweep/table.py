"""The frontier table (terminal and markdown) and frontier.png: domain accuracy against honesty F1."""

from __future__ import annotations

from hcnr_deploy.sweep.grid import REFERENCES


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
