"""What the sweep shows and ships: the frontier table and the choice in words (terminal, frontier.md), and chosen/:
a copy of the chosen artifact with its model card."""

from __future__ import annotations

import shutil
from pathlib import Path

from hcnr_deploy.sweep import choice as C
from hcnr_deploy.sweep.table import markdown_table, rich_table


def copy_artifact(src: Path, dst: Path, finish=None):
    """dst = a copy of src (atomically: a temporary folder renamed at the end); `finish(tmp)` adds to it first."""
    from hcnr_deploy.io.atomic import AtomicDir

    with AtomicDir(dst, overwrite=True) as tmp:
        for f in sorted(Path(src).iterdir()):
            if f.is_file() and f.name != "step.json":
                shutil.copy2(f, tmp / f.name)
            elif f.is_dir():
                shutil.copytree(f, tmp / f.name)
        if finish is not None:
            finish(tmp)


def write_card(folder: Path, report: dict | None, chosen: dict, figures: dict, max_domain_drop: float, frontier: dict):
    """chosen/'s model card: hcnr_deploy.card's, with the sweep's figures, for a repair output; for base or ft
    chosen as they are, their own README.md with the sweep's section appended (or that section alone)."""
    if report is None:
        st = frontier["settings"]
        card = folder / "README.md"
        own = card.read_text().rstrip("\n") + "\n\n" if card.exists() else ""
        if chosen["family"] == "guard":
            what = (f"The sweep chose the honesty guard `{chosen['name']}` (the fine-tune unchanged behind a probe): "
                    f"{frontier['reason']}. Serve it: `hcnr-deploy serve --base {st['base']} --adapter "
                    f"ft={st['finetuned']} --guard {chosen['name']}=CHOSEN_FOLDER`.")
        else:
            which = st["finetuned" if chosen["name"] == "ft" else "base"]
            what = f"The sweep chose `{chosen['name']}` itself (`{which}`), unchanged: {frontier['reason']}."
        lines = [f"## {chosen['name']}, chosen by hcnr-deploy sweep", "", what, "",
                 markdown_table(frontier["candidates"], frontier["chosen"], frontier.get("always_refuse")), ""]
        card.write_text(own + "\n".join(lines))
        return
    from hcnr_deploy.card import write_model_card

    keys = ("f1", "rf_delta", "domain_accuracy", "per_benchmark")
    sweep = {"chosen": {"name": chosen["name"], **{k: chosen[k] for k in keys}},
             "ft": {k: figures["ft"][k] for k in keys}, "base": {k: figures["base"][k] for k in keys},
             "recovery_ratio": chosen["recovery_ratio"], "max_domain_drop": max_domain_drop,
             "reason": frontier["reason"]}
    write_model_card(folder, report, sweep)


def chosen_lines(frontier: dict) -> list[str]:
    """The chosen point in words (hcnr_deploy.sweep.choice.summary_lines): recovery ratio and domain change against ft
    with their paired intervals, or ft shipped and why; the always-refuse reference; the domain resolution."""
    return C.summary_lines(frontier) + [f"ready to serve: {frontier['chosen_artifact']}"]


def frontier_markdown(frontier: dict) -> str:
    s = frontier["settings"]
    lines = [f"# Sweep: {s['finetuned']} on {s['base']}", "",
             f"Honesty F1 / RF Delta averaged over {', '.join(frontier['honesty_benchmarks'])}; domain accuracy on "
             f"{frontier['domain_task']}; 95% bootstrap intervals.", "",
             markdown_table(frontier["candidates"], frontier["chosen"], frontier.get("always_refuse")), ""]
    lines += chosen_lines(frontier)
    if s.get("command"):
        lines += ["", "Command:", "", "```", s["command"], "```"]
    return "\n".join(lines) + "\n"


def print_frontier(frontier: dict, console):
    if frontier.get("unscored"):
        return print_unscored(frontier, console)
    console.print(rich_table(frontier["candidates"], frontier["chosen"],
                               reference=frontier.get("always_refuse")))
    for line in chosen_lines(frontier):
        console.print(line, highlight=False)


def print_unscored(frontier: dict, console):
    names = ", ".join(c["name"] for c in frontier["candidates"])
    console.print(f"built {len(frontier['candidates'])} candidates ({names}); {frontier['reason']}.", highlight=False)
