"""RepairOptions, the one declaration of the repair options: click flags, defaults, checks, command line."""

from __future__ import annotations

import dataclasses
import json
import shlex

import click
import pytest
from click.testing import CliRunner

from eval_harness.errors import UserError
from hcnr_deploy.options import RepairOptions, click_options

from conftest import repair_pair

# `hcnr-deploy repair`'s flags and defaults before RepairOptions (commit 03b8797's cli_repair.py)
BEFORE = {"--num-samples": 128, "--max-length": 512, "--r-iw": 0.5, "--r-cw": 0.4, "--granularity": "column",
          "--selection": "hcnr", "--compensation": "obs", "--task-weight": 1.0, "--fisher-model": "paired",
          "--hessian-inputs": "base", "--damp": 0.01, "--seed": 0, "--device": "auto", "--dtype": "auto",
          "--batch-size": 8, "--hessian-memory": 8.0, "--offload": False, "--format": "auto", "--max-rank": 64}
NEW = {"--method": "hcnr", "--alpha": 0.5, "--beta": 0.5, "--steps": 32, "--lr": 5e-4}


def _flags(command) -> dict:
    return {p.opts[0]: p.default for p in command.params if isinstance(p, click.Option)}


def test_repair_flags_and_defaults_are_todays_plus_the_methods():
    from hcnr_deploy.cli_repair import repair

    flags = _flags(repair)
    for fixed in ("--base", "--finetuned", "--honesty-data", "--task-data", "--out", "--overwrite", "--quiet",
                  "--config", "--plan", "--json"):
        flags.pop(fixed)
    assert flags == {**BEFORE, **NEW}
    choices = {p.opts[0]: list(p.type.choices) for p in repair.params if isinstance(p.type, click.Choice)}
    assert choices["--method"] == ["hcnr", "regmean", "scale", "lines", "sft"]
    assert choices["--compensation"] == ["obs", "exact", "none", "task-aware"]
    help_text = CliRunner().invoke(repair, ["--help"], terminal_width=200).output
    for f in dataclasses.fields(RepairOptions):  # every option is explained, with its default
        assert f.metadata["help"][:40] in " ".join(help_text.split()), f.name


def test_groups_give_the_sweep_only_data_and_compute():
    @click.command()
    @click_options("data", "compute")
    def sweep(**kw):
        click.echo(json.dumps(kw))

    assert list(_flags(sweep)) == ["--num-samples", "--max-length", "--seed", "--device", "--dtype", "--batch-size",
                                   "--hessian-memory", "--offload"]
    out = json.loads(CliRunner().invoke(sweep, ["--num-samples", "4", "--offload"]).output)
    opts = RepairOptions(**out)
    assert opts.num_samples == 4 and opts.offload and opts.method == "hcnr"
    assert set(opts.group("data")) == {"num_samples", "max_length"}


@pytest.mark.parametrize("field, value, message", [
    ("r_iw", 0, "--r-iw must be in (0, 1], got 0."), ("r_cw", 1.5, "--r-cw must be in (0, 1], got 1.5."),
    ("r_cw", float("nan"), "--r-cw must be in (0, 1], got nan."), ("num_samples", 0, "--num-samples must be at least 1"),
    ("max_length", 2.5, "--max-length must be an integer, at least 1"), ("task_weight", -1.0, "--task-weight must be >= 0"),
    ("alpha", float("inf"), "--alpha must be >= 0, got inf."), ("steps", 0, "--steps must be at least 1"),
    ("lr", 0.0, "--lr must be > 0"), ("damp", -0.1, "--damp must be >= 0"),
    ("hessian_memory_gb", 0, "--hessian-memory must be > 0"),
    ("method", "ties", "--method must be one of hcnr, regmean, scale, lines, sft, got 'ties'."),
    ("beta", float("nan"), "--beta must be a finite number, got nan."),
    ("compensation", "OBS", "--compensation must be one of"), ("offload", 1, "--offload is a switch"),
    ("max_rank", 0, "--max-rank must be at least 1"), ("batch_size", True, "--batch-size must be an integer"),
])
def test_bad_values_give_one_line_errors_naming_the_flag(field, value, message):
    with pytest.raises(UserError) as e:
        RepairOptions(**{field: value})
    assert e.value.message.startswith(message) and "\n" not in e.value.message
    with pytest.raises(UserError, match="--r-iw"):
        RepairOptions().replace(r_iw=2.0)  # replace() validates too
    with pytest.raises(UserError, match="unknown repair option 'r_iww'"):
        RepairOptions().replace(r_iww=0.5)


def test_lines_needs_a_non_negative_last_block_factor():
    assert RepairOptions(method="lines", alpha=0.8, beta=-0.8).beta == -0.8  # the last block at the base
    with pytest.raises(UserError) as e:
        RepairOptions(method="lines", alpha=0.2, beta=-0.5)
    assert e.value.message == ("--alpha 0.2 --beta -0.5: the last block's factor alpha + beta must be >= 0; raise "
                               "--beta to at least -0.2.")
    assert RepairOptions(method="scale", alpha=0.2, beta=-0.5).method == "scale"  # beta is lines' alone


def test_cli_bad_value_is_one_line_and_exit_2(tmp_path):
    from hcnr_deploy.cli import main

    result = CliRunner().invoke(main, ["repair", "--base", "b", "--finetuned", "f", "--honesty-data", "h",
                                       "--task-data", "t", "--out", str(tmp_path / "o"), "--alpha", "-1"])
    assert result.exit_code == 2 and result.stderr.strip() == "Error: --alpha must be >= 0, got -1.0."
    assert not (tmp_path / "o").exists()


def test_settings_and_command_args_cover_every_option():
    o = RepairOptions(method="scale", alpha=0.25, offload=True, hessian_memory_gb=2.0)
    assert o.settings() == {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}
    args = o.command_args()
    assert args[args.index("--alpha") + 1] == "0.25" and "--offload" in args
    assert args[args.index("--hessian-memory") + 1] == "2.0"
    assert "--offload" not in RepairOptions().command_args()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.alpha = 1.0


WORDS = "the capital city river country born wrote unknown answer question sure Paris 1492 future".split()


@pytest.mark.parametrize("method_args", [["--method", "regmean", "--task-weight", "2.5"],
                                         ["--r-cw", "0.6", "--compensation", "exact", "--seed", "3"]])
def test_the_equivalent_command_reproduces_the_run(tmp_path, method_args):
    from hcnr_deploy.cli import main

    pair = repair_pair(tmp_path / "m", "llama", 6, WORDS)
    r = pair["root"]
    first = tmp_path / "first"
    result = CliRunner().invoke(main, ["repair", "--base", str(pair["base"]), "--finetuned", str(pair["full"]),
                                       "--honesty-data", str(r / "hon.jsonl"), "--task-data", str(r / "task.jsonl"),
                                       "--out", str(first), "--num-samples", "6", "--max-length", "32", "-q",
                                       *method_args])
    assert result.exit_code == 0, result.output
    report = json.loads((first / "report.json").read_text())
    argv = shlex.split(report["settings"]["command"])
    assert argv[:2] == ["hcnr-deploy", "repair"]
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    result = CliRunner().invoke(main, [*argv[1:], "-q"])
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["settings"] == {**report["settings"], "out": str(tmp_path / "again"),
                                 "command": report["settings"]["command"].replace(str(first), str(tmp_path / "again"))}
    assert (first / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--method", "scale", "--r-cw", "0.2"], "--r-cw does not apply to --method scale (only to --method hcnr)"),
    (["--method", "sft", "--alpha", "0.3"], "--alpha does not apply to --method sft (only to --method scale, --method lines)"),
    (["--lr", "0.01"], "--lr does not apply to --method hcnr (only to --method sft)"),
    (["--method", "scale", "--compensation", "exact"], "--compensation does not apply to --method scale"),
])
def test_options_of_another_method_are_a_one_line_error_before_any_work(tmp_path, args, message):
    """An option the chosen method ignores is refused (not a warning: the run would not be what its command says),
    before the models are read: the paths here do not even exist."""
    from hcnr_deploy.cli import main

    r = CliRunner().invoke(main, ["repair", "--base", "nowhere/b", "--finetuned", str(tmp_path / "ft"),
                                  "--honesty-data", "h.jsonl", "--task-data", "t.jsonl", "--out",
                                  str(tmp_path / "out"), *args])
    assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "out").exists()


def test_options_of_the_method_and_shared_options_pass_the_check():
    from hcnr_deploy.options import check_applicable

    check_applicable("regmean", {"task_weight", "damp", "hessian_inputs", "format", "max_rank", "seed"})
    check_applicable("scale", {"alpha", "num_samples", "dtype"})
    with pytest.raises(UserError, match="--task-weight does not apply to --method scale"):
        check_applicable("scale", {"task_weight"})
