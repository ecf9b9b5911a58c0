"""The terminal tables stay readable in an 80-column terminal: models as rows when their column pairs do not fit.

The results come from the real pipeline (evaluate() against eval_harness.fakeserver, whose replies differ per model)."""

import pytest
from rich.console import Console

from eval_harness.report import _fmt, differences_table, fits, print_report, results_table
from test_eval_data import make_data_dir, write_jsonl
from test_eval_identity import fake  # noqa: F401  (fixture)

MODELS = ["base", "ft", "repaired", "hcnr-rcw0.4-seed1"]


@pytest.fixture
def results(fake, tmp_path):  # noqa: F811
    from eval_harness import evaluate

    data = make_data_dir(tmp_path / "data")
    domain = write_jsonl(tmp_path / "clinic.jsonl", [
        {"question": "Largest organ of the body?", "answers": ["skin"]},
        {"question": "Which is a vitamin?", "choices": ["C", "Q", "Z"], "answer": 0},
        {"question": "Echo: Which organ pumps blood?", "answers": ["Echo"]}])
    srv = fake(MODELS)
    return evaluate(srv.url, models=MODELS, data_dir=data, domain=[domain], max_tokens=8, n_boot=50, cache=None,
                    progress=False)


def render(results, width):
    console = Console(width=width, record=True, force_terminal=False)
    print_report(results, console)
    return console.export_text()


def expected_numbers(results):
    nums = []
    for m in MODELS:
        for t, e in results["results"][m].items():
            if "accuracy" in e:
                nums.append(_fmt(e["accuracy"]))
            if "f1" in e:
                nums += [_fmt(e["f1"]), _fmt(e["rf_delta"], signed=True)]
    return nums


def expected_differences(results):
    out = []
    for m, per_task in results["differences"]["models"].items():
        for t, metrics in per_task.items():
            for k, d in metrics.items():
                if d["diff"] is not None and k in ("f1", "rf_delta", "answer_accuracy", "accuracy"):
                    ci = d["ci95"]
                    out.append(f"{d['diff']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""))
    return out


def test_80_columns_every_number_whole(results):
    text = render(results, 80)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    table_text, diff_text = text.split("Difference to base")
    for n in expected_numbers(results):
        assert n in table_text, n
    for d in expected_differences(results):
        assert d in diff_text, d
    # models are rows: every model name whole on its own rows, once per task
    n_tasks = len(results["tasks"]) + 1  # + average
    for m in MODELS:
        assert sum(line.split("│")[3].strip() == m for line in table_text.splitlines() if line.count("│") > 4) \
            == n_tasks, m
    # each row of the long table holds that model's own numbers
    for line in table_text.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 4 and cells[3] in MODELS and cells[1] in results["tasks"]:
            e = results["results"][cells[3]][cells[1]]
            assert cells[4] == _fmt(e.get("f1", e.get("accuracy"))), line


def test_wide_layout_when_it_fits(results):
    wide = Console(width=200)
    assert fits(results_table(results), wide) and fits(differences_table(results), wide)
    assert not fits(results_table(results), Console(width=80))
    text = render(results, 200)
    assert "hcnr-rcw0.4-seed1" in text.splitlines()[2] or any(
        "hcnr-rcw0.4-seed1" in line and "repaired" in line for line in text.splitlines())  # models as columns
    for n in expected_numbers(results):
        assert n in text


def test_two_models_stay_wide_at_80(fake, tmp_path):  # noqa: F811
    from eval_harness import evaluate

    data = make_data_dir(tmp_path / "data")
    srv = fake(["base", "ft"])
    res = evaluate(srv.url, models=["base", "ft"], data_dir=data, max_tokens=8, n_boot=50, cache=None,
                   progress=False)
    text = render(res, 80)
    assert "…" not in text and any("base" in line and "ft" in line for line in text.splitlines()[:6])
