"""The Python API (`from hcnr_deploy import repair, sweep, evaluate`) and recipe files (`--config`, recipe.yaml)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from eval_harness.errors import UserError
from hcnr_deploy.cli import main

from conftest import repair_pair
from test_eval_data import make_data_dir, write_jsonl
from test_eval_identity import fake  # noqa: F401  (fixture)

WORDS = ["river", "stone", "blue", "seven", "quiet", "north", "lamp", "paper", "green", "house"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return repair_pair(tmp_path_factory.mktemp("api"), "llama", 6, WORDS)


def _inputs(pair) -> dict:
    return dict(base=str(pair["base"]), finetuned=str(pair["lora"]), honesty_data=str(pair["root"] / "hon.jsonl"),
                task_data=str(pair["root"] / "task.jsonl"))


def _files(folder: Path, skip=("report.json", "README.md")) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file() and f.name not in skip}


def test_importing_the_package_loads_neither_torch_nor_vllm():
    code = ("import sys, hcnr_deploy; from hcnr_deploy import evaluate, sweep; "
            "print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_repair_api_equals_the_command_line_and_its_recipe_repeats_it(pair, tmp_path):
    """The CLI run writes recipe.yaml; `--config` on it (new --out) and the API with the same names give the same
    bytes; the recipe holds the method's options only (so `--config` passes the method check)."""
    from hcnr_deploy import repair

    i = _inputs(pair)
    r = CliRunner().invoke(main, ["repair", "--base", i["base"], "--finetuned", i["finetuned"], "--honesty-data",
                                  i["honesty_data"], "--task-data", i["task_data"], "--out", str(tmp_path / "cli"),
                                  "--r-cw", "0.5", "--num-samples", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    recipe_file = tmp_path / "cli" / "recipe.yaml"
    recipe = yaml.safe_load(recipe_file.read_text())
    assert recipe["r_cw"] == 0.5 and recipe["num_samples"] == 4 and recipe["method"] == "hcnr"
    assert "out" not in recipe and "alpha" not in recipe and "steps" not in recipe
    assert recipe["honesty_data"] == i["honesty_data"] and Path(recipe["base"]).is_absolute()

    r = CliRunner().invoke(main, ["repair", "--config", str(recipe_file), "--out", str(tmp_path / "again"), "-q"])
    assert r.exit_code == 0, r.output
    assert _files(tmp_path / "again") == _files(tmp_path / "cli")  # adapter and recipe.yaml: same bytes

    report = repair(**i, out=str(tmp_path / "api"), r_cw=0.5, num_samples=4)
    assert report["settings"]["r_cw"] == 0.5 and report["output"] == str(tmp_path / "api")
    assert json.loads((tmp_path / "api" / "report.json").read_text())["edited_fraction"] == report["edited_fraction"]
    assert _files(tmp_path / "api") == _files(tmp_path / "cli")


def test_command_line_flags_win_over_the_recipe(pair, tmp_path):
    recipe = {**_inputs(pair), "method": "scale", "alpha": 0.3, "num_samples": 4}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = CliRunner().invoke(main, ["repair", "--config", str(tmp_path / "r.yaml"), "--alpha", "0.7", "--out",
                                  str(tmp_path / "o"), "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["settings"]["alpha"] == 0.7 and report["settings"]["method"] == "scale"
    assert yaml.safe_load((tmp_path / "o" / "recipe.yaml").read_text())["alpha"] == 0.7


@pytest.mark.parametrize("command", ["repair", "sweep"])
def test_unknown_recipe_key_is_a_one_line_error_naming_it(command, tmp_path):
    (tmp_path / "r.yaml").write_text("base: b\nr_cww: 0.2\n")
    r = CliRunner().invoke(main, [command, "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and f"unknown option 'r_cww' for `hcnr-deploy {command}`" in r.output
    assert r.output.count("\n") == 1 and not (tmp_path / "o").exists()
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    r = CliRunner().invoke(main, [command, "--config", str(tmp_path / "bad.yaml")])
    assert r.exit_code == 2 and "expected a mapping of option names" in r.output


def test_recipe_options_of_another_method_are_refused(pair, tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**_inputs(pair), "method": "scale", "r_cw": 0.2}))
    r = CliRunner().invoke(main, ["repair", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--r-cw does not apply to --method scale" in r.output


def test_api_bad_input_raises_user_errors(pair, tmp_path):
    from hcnr_deploy import repair, sweep

    with pytest.raises(UserError, match="unknown option 'rcw'"):
        repair(**_inputs(pair), out=str(tmp_path / "o"), rcw=0.2)
    with pytest.raises(UserError, match="missing keyword argument out="):
        repair(**_inputs(pair))
    with pytest.raises(UserError, match="--r-iw must be in"):
        repair(**_inputs(pair), out=str(tmp_path / "o"), r_iw=3.0)
    with pytest.raises(UserError, match="--grid sft:lr=0: must be > 0"):
        sweep(**_inputs(pair), eval_honesty=str(pair["root"] / "hon.jsonl"),
              eval_domain=str(pair["root"] / "hon.jsonl"), out=str(tmp_path / "s"), grid="sft:lr=0")
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_sweep_recipe_repeats_the_same_run(monkeypatch, tmp_path):
    """sweep's recipe.yaml (written by run_sweep once --out is prepared) given back to --config calls run_sweep
    with the same arguments; the key is not written."""
    from hcnr_deploy.recipe import write_recipe
    from hcnr_deploy.sweep import report, run

    calls = []

    def fake_run_sweep(*args, **kw):
        calls.append((args, kw))
        out = Path(args[6])
        out.mkdir(parents=True, exist_ok=True)
        write_recipe(out, kw["recipe"])
        return {}

    monkeypatch.setattr(run, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(report, "print_frontier", lambda *a, **kw: None)
    f = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "q", "response": "a"}])
    argv = ["sweep", "--base", "acme/base", "--finetuned", str(tmp_path), "--honesty-data", str(f), "--task-data",
            str(f), "--eval-honesty", str(f), "--eval-domain", str(f), "--grid", "hcnr:r_cw=0.2; scale:a=0.5",
            "--limit", "40", "--serve-dtype", "float32", "--num-samples", "16", "--api-key", "s3cret"]
    r = CliRunner().invoke(main, [*argv, "--out", str(tmp_path / "one"), "--", "--enforce-eager"])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "one" / "recipe.yaml").read_text()
    assert "s3cret" not in text and "acme/base" in text and "vllm_args:\n- --enforce-eager" in text
    r = CliRunner().invoke(main, ["sweep", "--config", str(tmp_path / "one" / "recipe.yaml"), "--api-key", "s3cret",
                                  "--out", str(tmp_path / "two")])
    assert r.exit_code == 0, r.output
    (a1, k1), (a2, k2) = calls
    assert a1[:6] == a2[:6] and {k: v for k, v in k1.items() if k not in ("console", "command")} == \
        {k: v for k, v in k2.items() if k not in ("console", "command")}
    assert (tmp_path / "two" / "recipe.yaml").read_bytes() == text.encode()


def test_evaluate_api_takes_the_command_line_names(fake, tmp_path):  # noqa: F811
    """Argument plumbing against the fake server (the real-server evidence for evaluate: test_eval_e2e.py)."""
    from hcnr_deploy import evaluate

    data = make_data_dir(tmp_path / "data")
    srv = fake(["base", "ft"])
    res = evaluate(endpoints=srv.url, models="base,ft", benchmarks="falseqa,nec", data_dir=str(data), max_tokens=8,
                   n_boot=20, no_cache=True, out=str(tmp_path / "res.json"))
    assert set(res["results"]) == {"base", "ft"} and {"falseqa", "nec"} <= set(res["results"]["ft"])
    assert json.loads((tmp_path / "res.json").read_text())["results"] == json.loads(json.dumps(res["results"]))
    with pytest.raises(UserError, match="unknown option 'endpoint' for `hcnr-deploy eval`"):
        evaluate(endpoint=srv.url)
