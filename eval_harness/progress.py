"""The one progress-bar builder (rich) of every command: eval, repair, sweep, probe and the demo's trainings."""

from __future__ import annotations


def progress_bar(console, enabled: bool = True, *, label: str = "[bold]{task.description}", spinner: bool = False,
                 unit: str | None = None, note: bool = False, eta: bool = False, **kwargs):
    """A rich Progress: [spinner] label, bar, done/total, [unit], [the task's `note` field], elapsed time,
    [time remaining]; disabled (prints nothing) unless `enabled`. kwargs go to rich's Progress."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = [SpinnerColumn()] if spinner else []
    columns += [TextColumn(label), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(unit)] if unit else []
    columns += [TextColumn("{task.fields[note]}")] if note else []
    columns += [TimeElapsedColumn()] + ([TimeRemainingColumn()] if eta else [])
    return Progress(*columns, console=console, disable=not enabled, transient=False, **kwargs)
