"""The command line's rough edges (issue 21, deliverable 5): one API-key order, sweep's serving dtype and key reach
the serving and the scoring, demo's scenarios, the top-level help."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from eval_harness.env import API_KEY_ENVVARS
from hcnr_deploy.cli import SUBCOMMANDS, main


def _command(name):
    return main.get_command(None, name)


@pytest.mark.parametrize("name", ["serve", "eval", "sweep"])
def test_every_command_reads_the_api_key_from_the_same_variables_in_the_same_order(name, monkeypatch):
    param = next(p for p in _command(name).params if p.name == "api_key")
    ctx = click.Context(_command(name))
    monkeypatch.setenv("OPENAI_API_KEY", "openai-key")
    monkeypatch.delenv("HCNR_API_KEY", raising=False)
    assert param.resolve_envvar_value(ctx) == "openai-key"
    monkeypatch.setenv("HCNR_API_KEY", "hcnr-key")
    assert param.resolve_envvar_value(ctx) == "hcnr-key"  # HCNR_API_KEY first
    assert API_KEY_ENVVARS == ("HCNR_API_KEY", "OPENAI_API_KEY")


def test_serve_takes_the_key_from_openai_api_key_too(tiny_base, monkeypatch):
    monkeypatch.delenv("HCNR_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "s3cret")
    r = CliRunner().invoke(main, ["serve", "--base", str(tiny_base), "--print-command"])
    assert r.exit_code == 0 and "VLLM_API_KEY='<your key>'" in r.stdout and "s3cret" not in r.output


def test_sweep_passes_serve_dtype_and_api_key(monkeypatch, tmp_path):
    """The CLI gives run_sweep the serving dtype and the key (run_sweep's own plumbing is below)."""
    from hcnr_deploy.sweep import report, run

    seen = {}
    monkeypatch.setattr(run, "run_sweep", lambda *a, **kw: seen.update(kw) or {"stop": True})
    monkeypatch.setattr(report, "print_frontier", lambda *a, **kw: None)
    f = tmp_path / "f.jsonl"
    f.write_text("{}\n")
    r = CliRunner().invoke(main, ["sweep", "--base", "b", "--finetuned", "f", "--honesty-data", str(f), "--task-data",
                                  str(f), "--eval-honesty", str(f), "--eval-domain", str(f), "--out",
                                  str(tmp_path / "o"), "--serve-dtype", "float32", "--api-key", "k", "--dtype",
                                  "bfloat16"])
    assert r.exit_code == 0, r.output
    assert seen["serve_dtype"] == "float32" and seen["api_key"] == "k"
    assert seen["repair_options"]["dtype"] == "bfloat16"


def test_sweep_serves_and_scores_with_the_key_and_dtype(monkeypatch, tmp_path):
    import contextlib

    import eval_harness
    import hcnr_deploy.serve as serve_mod
    from hcnr_deploy.sweep.score import serve_and_score

    calls = {}

    @contextlib.contextmanager
    def fake_serve(base, adapters, checkpoints, **kw):
        calls["serve"] = kw

        class S:
            base_url = "http://127.0.0.1:1/v1"
        yield [S()]

    def fake_eval(url, models, **kw):
        calls.setdefault("eval", []).append(kw)
        return {"results": {}, "samples": {}, "_run": None}

    monkeypatch.setattr(serve_mod, "serve_models", fake_serve)
    monkeypatch.setattr(eval_harness, "evaluate", fake_eval)
    kw = dict(port=1, vllm_args=[], serve_dtype="float16", max_model_len=None, startup_timeout=1,
              log_dir=tmp_path, console=__import__("rich.console").console.Console(quiet=True), api_key="k")
    serve_and_score(["base", "ft"], {"base": tmp_path, "ft": tmp_path}, True, {"api_key": "k"}, endpoint=None, **kw)
    assert calls["serve"]["dtype"] == "float16" and calls["serve"]["api_key"] == "k"
    assert calls["eval"][0]["api_key"] == "k"


def test_demo_offers_the_recipes_users_run():
    demo = _command("demo")
    r = CliRunner().invoke(main, ["demo", "--help"], terminal_width=200)
    assert "[tiny-demo|tiny|smollm2-rc]" in r.output and "ci:" not in r.output and "|ci" not in r.output
    param = next(p for p in demo.params if p.name == "model")
    assert param.type.convert("ci", param, None) == "ci"            # hidden: the tests' scenario
    assert param.type.convert("smollm2", param, None) == "smollm2"  # hidden: benchmarks/reproduce.py's default
    assert param.type.convert("smollm2-rc", param, None) == "smollm2-rc"
    assert param.default == "tiny-demo"  # the demo sized to resolve its margin (recipes.py)
    from hcnr_deploy.scenario.recipes import RECIPES

    assert set(param.type.choices) | set(param.type.hidden) == set(RECIPES)
    r = CliRunner().invoke(main, ["demo", "--model", "bogus"])
    assert r.exit_code == 2 and "tiny" in r.output


def test_top_level_help_shows_every_command_in_its_examples():
    r = CliRunner().invoke(main, ["--help"], terminal_width=200)
    examples = r.output.split("Options:")[0]
    for name in SUBCOMMANDS:
        assert f"hcnr-deploy {name} " in examples, name
