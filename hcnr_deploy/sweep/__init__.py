"""`hcnr-deploy sweep`: measure the honesty/domain frontier of repair methods on the user's model, ship the best point.

By job: grid.py (the candidates of `--grid`), workdir.py (the working folder: key, resume, atomic writes,
the build-only frontier.json), inputs.py (evaluation questions, calibration overlap, prompt lengths), build.py
(one repair session writes every candidate), score.py (serve + eval), figures.py (per-candidate figures),
choice.py (the paired choice), table.py (table, figure), report.py (frontier.md, terminal lines, chosen/),
run.py (`run_sweep`, stage by stage), cli.py (the command).

Resume: DIR is a working folder. sweep.json (the settings the candidates depend on) is written first; a rerun with
the same settings reuses every finished candidate and every cached response, and frontier.json is written last,
so its presence means the sweep is finished (a finished DIR is only replaced with --overwrite).

`from hcnr_deploy import sweep; sweep(base=..., ...)` runs the command (hcnr_deploy.api); the names below are
the sweep's Python interface.
"""

from hcnr_deploy.sweep.build import build_candidates
from hcnr_deploy.sweep.choice import choose
from hcnr_deploy.sweep.cli import sweep
from hcnr_deploy.sweep.figures import candidate_figures, curve_gap, mark_pareto, unanswerable_share
from hcnr_deploy.sweep.grid import DEFAULT_GRID, GRID_HELP, METHODS, REFERENCES, Candidate, parse_grid
from hcnr_deploy.sweep.inputs import check_overlap, eval_tasks
from hcnr_deploy.sweep.report import print_frontier
from hcnr_deploy.sweep.run import run_sweep
from hcnr_deploy.sweep.table import STYLES, markdown_table, plot_frontier, rich_table
from hcnr_deploy.sweep.workdir import prepare_dir

__all__ = ["DEFAULT_GRID", "GRID_HELP", "METHODS", "REFERENCES", "STYLES", "Candidate", "build_candidates",
           "candidate_figures", "check_overlap", "choose", "curve_gap", "eval_tasks", "mark_pareto", "markdown_table",
           "parse_grid", "plot_frontier", "prepare_dir", "print_frontier", "rich_table", "run_sweep", "sweep",
           "unanswerable_share"]

from hcnr_deploy.api import make_callable  # noqa: E402  (`from hcnr_deploy import sweep; sweep(base=...)`)

make_callable(__name__)
