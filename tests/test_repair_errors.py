"""Bad input to `hcnr-deploy repair`: a one-line error, exit code 2, and no output folder (nor temp leftovers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from hcnr_deploy.cli import main
from hcnr_deploy.tiny import build_tiny_model, perturbed_copy, random_lora

GOOD_LINE = json.dumps({"prompt": "the capital city?", "response": "I do not know."}) + "\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    base = build_tiny_model(root / "base", arch="llama", hidden_size=64, seed=0)
    lora = random_lora(base, root / "lora", rank=8, seed=1)
    data = root / "data.jsonl"
    data.write_text(GOOD_LINE * 4)
    return dict(root=root, base=base, lora=lora, data=data)


def run(env, tmp_path, *extra, base=None, finetuned=None, hon=None, task=None, out=None):
    out = out or tmp_path / "out"
    args = ["repair", "--base", str(base or env["base"]), "--finetuned", str(finetuned or env["lora"]),
            "--honesty-data", str(hon or env["data"]), "--task-data", str(task or env["data"]), "--out", str(out),
            "--num-samples", "2", "--max-length", "24", *extra]
    return CliRunner().invoke(main, args), out


def assert_clean_error(result, out: Path, *fragments: str, out_existed: bool = False):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]
    if not out_existed:
        assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_mismatched_base_and_full_finetune(env, tmp_path):
    other_arch = build_tiny_model(tmp_path / "qwen", arch="qwen2", hidden_size=64, seed=0)
    result, out = run(env, tmp_path, finetuned=other_arch)
    assert_clean_error(result, out, "qwen2", "llama")
    wider = build_tiny_model(tmp_path / "wide", arch="llama", hidden_size=128, seed=0)
    result, out = run(env, tmp_path, finetuned=wider)
    assert_clean_error(result, out, "shape", "pass the base")


def test_adapter_for_another_base(env, tmp_path):
    wider = build_tiny_model(tmp_path / "wide", arch="llama", hidden_size=128, seed=0)
    wide_lora = random_lora(wider, tmp_path / "wide_lora", rank=8)
    result, out = run(env, tmp_path, finetuned=wide_lora)
    assert_clean_error(result, out, "another base")
    same_shape = build_tiny_model(tmp_path / "twin", arch="llama", hidden_size=64, seed=9)
    twin_lora = random_lora(same_shape, tmp_path / "twin_lora", rank=8)
    result, out = run(env, tmp_path, finetuned=twin_lora)
    assert_clean_error(result, out, "was trained on", "differ")


def test_missing_files(env, tmp_path):
    result, out = run(env, tmp_path, base=tmp_path / "nope")
    assert_clean_error(result, out, "does not exist")
    result, out = run(env, tmp_path, hon=tmp_path / "missing.jsonl")
    assert_clean_error(result, out, "missing.jsonl", "does not exist")
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    result, out = run(env, tmp_path, finetuned=empty_dir)
    assert_clean_error(result, out, "neither config.json")
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    shutil.copy(env["base"] / "config.json", no_weights / "config.json")
    result, out = run(env, tmp_path, base=no_weights)
    assert_clean_error(result, out, "no *.safetensors")
    no_adapter_weights = tmp_path / "noadapter"
    no_adapter_weights.mkdir()
    shutil.copy(env["lora"] / "adapter_config.json", no_adapter_weights / "adapter_config.json")
    result, out = run(env, tmp_path, finetuned=no_adapter_weights)
    assert_clean_error(result, out, "adapter_model.safetensors")


@pytest.mark.parametrize("content, fragments", [
    ("", ("no examples",)),
    ("\n\n", ("no examples",)),
    (GOOD_LINE * 2 + "{not json\n", ("bad.jsonl:3:", "invalid JSON")),
    (GOOD_LINE + json.dumps({"question": "x"}) + "\n", ("bad.jsonl:2:", "unknown keys")),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", ("bad.jsonl:1:", "no assistant turn")),
    (json.dumps([1, 2]) + "\n", ("bad.jsonl:1:", "not a JSON object")),
])
def test_empty_or_malformed_jsonl(env, tmp_path, content, fragments):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    result, out = run(env, tmp_path, task=bad)
    assert_clean_error(result, out, *fragments)


def test_nan_weights(env, tmp_path):
    full = perturbed_copy(env["base"], tmp_path / "full", seed=3)
    tensors = load_file(full / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(full / "model.safetensors"), metadata={"format": "pt"})
    result, out = run(env, tmp_path, finetuned=full)
    assert_clean_error(result, out, "model.layers.1.mlp.up_proj.weight", "NaN")
    nan_base = tmp_path / "nan_base"
    shutil.copytree(env["base"], nan_base)
    tensors = load_file(nan_base / "model.safetensors")
    tensors["model.norm.weight"][0] = float("inf")
    save_file(tensors, str(nan_base / "model.safetensors"), metadata={"format": "pt"})
    result, out = run(env, tmp_path, base=nan_base, finetuned=full)
    assert_clean_error(result, out, "NaN or Inf")


@pytest.mark.parametrize("args, fragment", [
    (("--r-iw", "0"), "--r-iw must be in (0, 1]"),
    (("--r-iw", "1.5"), "--r-iw must be in (0, 1]"),
    (("--r-cw", "-0.2"), "--r-cw must be in (0, 1]"),
    (("--r-cw", "nan"), "--r-cw must be in (0, 1]"),
    (("--num-samples", "0"), "--num-samples"),
    (("--damp", "-1"), "--damp"),
])
def test_bad_options(env, tmp_path, args, fragment):
    result, out = run(env, tmp_path, *args)
    assert_clean_error(result, out, fragment)


def test_existing_out_is_refused_and_left_alone(env, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result, out = run(env, tmp_path, out=out)
    assert_clean_error(result, out, "already exists", "--overwrite", out_existed=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result, out = run(env, tmp_path, "--overwrite", out=out)
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()


def test_out_overlapping_an_input_is_refused(env, tmp_path):
    result = CliRunner().invoke(main, ["repair", "--base", str(env["base"]), "--finetuned", str(env["lora"]),
                                       "--honesty-data", str(env["data"]), "--task-data", str(env["data"]),
                                       "--out", str(env["lora"]), "--overwrite"])
    assert result.exit_code == 2 and "overlaps --finetuned" in result.stderr
    assert (env["lora"] / "adapter_model.safetensors").is_file()


def test_finetune_equal_to_base(env, tmp_path):
    result, out = run(env, tmp_path, finetuned=env["base"])
    assert_clean_error(result, out, "nothing to repair")


def test_unsupported_adapter_kinds(env, tmp_path):
    dora = tmp_path / "dora"
    shutil.copytree(env["lora"], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    result, out = run(env, tmp_path, finetuned=dora)
    assert_clean_error(result, out, "DoRA")
    assert torch.__version__  # the environment's torch imported fine alongside
