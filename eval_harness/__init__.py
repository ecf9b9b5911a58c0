"""Async honesty scoring of any OpenAI-compatible endpoint.

    from eval_harness import evaluate, print_report
    results = evaluate("http://127.0.0.1:8000/v1", models=["base", "ft", "repaired"],
                       benchmarks=["selfaware", "falseqa"], data_dir="data", limit=200, progress=False)
    print_report(results)

Importing this package stays light (no torch, no openai): the pipeline loads on first call.
"""


def evaluate(*args, **kwargs) -> dict:
    """See eval_harness.run.evaluate."""
    from eval_harness.run import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


async def aevaluate(*args, **kwargs) -> dict:
    """See eval_harness.run.aevaluate (for callers inside an event loop)."""
    from eval_harness.run import aevaluate as _aevaluate

    return await _aevaluate(*args, **kwargs)


def print_report(results: dict, console=None):
    """See eval_harness.report.print_report."""
    from eval_harness.report import print_report as _print_report

    _print_report(results, console)
