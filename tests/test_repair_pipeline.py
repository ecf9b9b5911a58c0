"""End-to-end `repair` on tiny models: adapters, checkpoints, selection, ablations, architectures, determinism."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from hcnr_deploy.repair import run_repair
from hcnr_deploy.tiny import build_tiny_model, perturbed_copy, random_lora, reshard

WORDS = "the capital city river country born wrote unknown answer question sure Paris 1492 future".split()
REPORT_FIELDS = {"edited_fraction", "num_samples", "timings_s", "peak_memory_bytes", "settings", "versions", "matrices"}
MATRIX_FIELDS = {"name", "displacement", "selected", "restored_columns", "compensation_norm", "cholesky_retries"}


def write_calibration(folder: Path, n: int = 10, seed: int = 0) -> tuple[Path, Path]:
    """An honesty JSONL in the messages format and a task JSONL in the prompt/response format."""
    rng = random.Random(seed)
    q = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + "?"  # noqa: E731
    hon, task = folder / "honesty.jsonl", folder / "task.jsonl"
    hon.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "Be honest."},
                                                    {"role": "user", "content": q()},
                                                    {"role": "assistant", "content": "I am not sure; it is unknown."}]})
                           + "\n" for _ in range(n)))
    task.write_text("".join(json.dumps({"prompt": q(), "response": f"The answer is {rng.choice(WORDS)}."}) + "\n"
                            for _ in range(n)))
    return hon, task


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("repair")
    base = build_tiny_model(root / "base", arch="llama", hidden_size=64, seed=0)
    reshard(base)
    full = perturbed_copy(base, root / "full", scale=0.03, seed=2)
    lora = random_lora(base, root / "lora", rank=8, seed=1, scale=0.2)
    hon, task = write_calibration(root)
    return dict(root=root, base=base, full=full, lora=lora, hon=hon, task=task)


def repair(models, finetuned, out, **kw):
    kw.setdefault("num_samples", 8)
    kw.setdefault("max_length", 48)
    return run_repair(models["base"], finetuned, models["hon"], models["task"], out, **kw)


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def check_report(report: dict, out: Path, n_matrices: int, r_iw: float = 0.5, r_cw: float = 0.4):
    assert REPORT_FIELDS <= set(report)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["num_samples"] == {"honesty": 8, "task": 8}
    assert {"fisher_honesty", "selection", "export", "total"} <= set(report["timings_s"])
    assert report["peak_memory_bytes"] > 0 and report["versions"]["torch"] == torch.__version__
    assert {"r_iw", "r_cw", "seed", "compensation", "selection", "granularity", "damp"} <= set(report["settings"])
    mats = report["matrices"]
    assert len(mats) == n_matrices and all(MATRIX_FIELDS <= set(m) for m in mats)
    selected = [m for m in mats if m["selected"]]
    assert len(selected) == math.ceil(r_cw * n_matrices)
    for m in mats:
        n_in = m["shape"][1]
        assert len(m["restored_columns"]) == (math.ceil(r_iw * n_in) if m["selected"] else 0)
    # kept matrices are the most displaced ones (Eq. 6-7)
    assert min(m["displacement"] for m in selected) >= max(m["displacement"] for m in mats if not m["selected"])
    restored = sum(m["shape"][0] * len(m["restored_columns"]) for m in selected)
    total = sum(m["shape"][0] * m["shape"][1] for m in mats)
    assert report["edited_fraction"] == pytest.approx(restored / total)
    return selected


def test_lora_adapter_is_exact_and_merges_to_the_patched_checkpoint(models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rep_a = repair(models, models["lora"], tmp_path / "adapter")
    rep_c = repair(models, models["lora"], tmp_path / "ckpt", format="checkpoint")
    assert rep_a["format"] == "adapter" and rep_c["format"] == "checkpoint"
    selected = check_report(rep_a, tmp_path / "adapter", n_matrices=14)
    assert [m["restored_columns"] for m in rep_a["matrices"]] == [m["restored_columns"] for m in rep_c["matrices"]]

    src_cfg = json.loads((models["lora"] / "adapter_config.json").read_text())
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == src_cfg["r"] == 8 and cfg["lora_alpha"] == src_cfg["lora_alpha"]
    assert not cfg["modules_to_save"] and cfg["bias"] == "none" and not cfg["use_dora"]
    assert sorted(cfg["target_modules"]) == sorted(src_cfg["target_modules"])
    old, new = load_file(models["lora"] / "adapter_model.safetensors"), load_file(tmp_path / "adapter" /
                                                                                   "adapter_model.safetensors")
    assert old.keys() == new.keys()
    by_name = {m["name"]: m for m in rep_a["matrices"]}
    for k in old:
        mod = k.split("base_model.model.")[1].rsplit(".lora_", 1)[0]
        if ".lora_B." in k or not by_name[mod]["selected"]:
            assert torch.equal(old[k], new[k]), k  # same B everywhere; untouched modules bit-identical
        else:
            f = by_name[mod]["restored_columns"]
            t = [i for i in range(old[k].shape[1]) if i not in f]
            assert torch.equal(old[k][:, t], new[k][:, t])  # task columns keep the fine-tune
            assert not torch.equal(old[k][:, f], new[k][:, f])

    base = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    dense = tensors_of(tmp_path / "ckpt")
    num = sum(float((merged[k] - dense[k]).square().sum()) for k in dense)
    den = sum(float(dense[k].square().sum()) for k in dense)
    assert math.sqrt(num / den) < 1e-5
    # the repair moved the selected matrices back towards the base
    ft_dense = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32),
                                         models["lora"]).merge_and_unload().state_dict()
    name = selected[0]["name"] + ".weight"
    assert not torch.equal(dense[name], ft_dense[name])


def test_full_finetune_checkpoint_loads_generates_and_keeps_untouched_bytes(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ckpt"
    report = repair(models, models["full"], out)
    assert report["format"] == "checkpoint" and report["finetune_kind"] == "full"
    selected = check_report(report, out, n_matrices=14)
    assert report["edited_fraction"] == pytest.approx(0.2, abs=0.05)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    ft, new, base = tensors_of(models["full"]), tensors_of(out), tensors_of(models["base"])
    assert ft.keys() == new.keys()
    sel = {m["name"] + ".weight": m["restored_columns"] for m in selected}
    for k in ft:
        if k not in sel:
            assert torch.equal(ft[k], new[k]), k  # untouched matrices and all other tensors: fine-tune bytes
        else:
            f = sel[k]
            t = [i for i in range(ft[k].shape[1]) if i not in f]
            assert torch.equal(ft[k][:, t], new[k][:, t])
            assert not torch.equal(new[k][:, f], ft[k][:, f]) and not torch.equal(new[k][:, f], base[k][:, f])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "the capital city?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5


def test_sharded_source_is_written_shard_by_shard(models, tmp_path):
    """A LoRA checkpoint is written in the base's shard layout, with an index naming every tensor."""
    out = tmp_path / "ckpt"
    repair(models, models["lora"], out, format="checkpoint", compensation="none")
    src_index = json.loads((models["base"] / "model.safetensors.index.json").read_text())["weight_map"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == src_index
    base = tensors_of(models["base"])
    for name, shard in index.items():
        with safe_open(out / shard, "pt") as h:
            assert name in h.keys()
            if ".layers." not in name or "norm" in name:  # not adapted: the base's bytes
                assert torch.equal(h.get_tensor(name), base[name]), name


def test_compensation_none_restores_base_columns(models, tmp_path):
    out = tmp_path / "none"
    report = repair(models, models["full"], out, compensation="none")
    new, base, ft = tensors_of(out), tensors_of(models["base"]), tensors_of(models["full"])
    for m in report["matrices"]:
        k = m["name"] + ".weight"
        if m["selected"]:
            f = m["restored_columns"]
            assert torch.equal(new[k][:, f], base[k][:, f])
            assert m["compensation_norm"] == 0.0
        else:
            assert torch.equal(new[k], ft[k])


def test_selection_follows_eq5_on_the_fisher_of_base_and_finetune(models, tmp_path):
    """The restored columns are the top-R_IW priority columns of s_hon (base) and s_task (fine-tune)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hcnr_deploy.data import batches, encode, load_jsonl
    from hcnr_deploy.engine.streaming import fisher_importance
    from hcnr_deploy.equations.selection import candidate_columns, priority

    report = repair(models, models["full"], tmp_path / "o", compensation="none", r_iw=0.25)
    m = next(m for m in report["matrices"] if m["selected"])
    tok = AutoTokenizer.from_pretrained(models["full"])

    def fisher(model_dir, data):
        enc = encode(tok, load_jsonl(data, 8), 48)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model.requires_grad_(False)
        return fisher_importance(model, {"m": model.get_submodule(m["name"])}, batches(enc, 3), len(enc))["m"]

    r = priority(fisher(models["base"], models["hon"]), fisher(models["full"], models["task"]))
    assert candidate_columns(r, 0.25).tolist() == m["restored_columns"]


def test_ablations_and_r_ratios(models, tmp_path):
    def cols(rep):
        return {m["name"]: m["restored_columns"] for m in rep["matrices"] if m["selected"]}

    hcnr = repair(models, models["lora"], tmp_path / "h", compensation="none")
    no_task = repair(models, models["lora"], tmp_path / "n", compensation="none", selection="no-task")
    rnd1 = repair(models, models["lora"], tmp_path / "r1", compensation="none", selection="random", seed=1)
    rnd1b = repair(models, models["lora"], tmp_path / "r1b", compensation="none", selection="random", seed=1)
    rnd2 = repair(models, models["lora"], tmp_path / "r2", compensation="none", selection="random", seed=2)
    assert "fisher_task" not in no_task["timings_s"] and "fisher_honesty" not in rnd1["timings_s"]
    assert cols(no_task) != cols(hcnr) and cols(rnd1) != cols(hcnr)
    assert cols(rnd1) == cols(rnd1b) and cols(rnd1) != cols(rnd2)
    other = repair(models, models["lora"], tmp_path / "ratio", compensation="none", r_iw=0.25, r_cw=0.75)
    check_report(other, tmp_path / "ratio", n_matrices=14, r_iw=0.25, r_cw=0.75)
    whole = repair(models, models["lora"], tmp_path / "all", compensation="none", r_iw=1.0, r_cw=1.0)
    assert whole["edited_fraction"] == 1.0


def test_exact_and_task_aware_adapters(models, tmp_path):
    exact = repair(models, models["lora"], tmp_path / "exact", compensation="exact")
    ta0 = repair(models, models["lora"], tmp_path / "ta0", compensation="task-aware", task_weight=0.0)
    ta = repair(models, models["lora"], tmp_path / "ta", compensation="task-aware", task_weight=5.0)
    a_exact = load_file(tmp_path / "exact" / "adapter_model.safetensors")
    a_ta0 = load_file(tmp_path / "ta0" / "adapter_model.safetensors")
    a_ta = load_file(tmp_path / "ta" / "adapter_model.safetensors")
    for k in a_exact:
        torch.testing.assert_close(a_exact[k], a_ta0[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(a_exact[k], a_ta[k]) for k in a_exact)
    assert "hessian" in exact["timings_s"] and ta["settings"]["task_weight"] == 5.0
    assert [m["restored_columns"] for m in ta0["matrices"]] == [m["restored_columns"] for m in exact["matrices"]]
    # the task weight pulls the restored columns back towards the fine-tune
    ft = load_file(models["lora"] / "adapter_model.safetensors")
    gap = lambda a: sum(float((a[k] - ft[k]).norm()) for k in ft)  # noqa: E731
    assert gap(a_ta) < gap(a_ta0)


def test_hessian_passes_split_by_memory_budget_give_the_same_bytes(models, tmp_path):
    """A tiny --hessian-memory forces one pass per block group (with base/fine-tune switches): same result."""
    for kw in (dict(compensation="task-aware", task_weight=2.0), dict(compensation="obs", r_cw=0.75)):
        one = repair(models, models["full"], tmp_path / "one", overwrite=True, **kw)
        split = repair(models, models["full"], tmp_path / "split", overwrite=True, hessian_memory_gb=1e-9, **kw)
        assert one["matrices"] == split["matrices"]
        a, b = tensors_of(tmp_path / "one"), tensors_of(tmp_path / "split")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_element_granularity_checkpoint(models, tmp_path):
    out = tmp_path / "elem"
    report = repair(models, models["full"], out, granularity="element", compensation="none")
    assert report["format"] == "checkpoint"
    new, base, ft = tensors_of(out), tensors_of(models["base"]), tensors_of(models["full"])
    for m in report["matrices"]:
        k = m["name"] + ".weight"
        if not m["selected"]:
            assert torch.equal(new[k], ft[k])
            continue
        restored = new[k] == base[k]
        assert int(restored.sum()) >= m["restored_elements"] == m["shape"][0] * math.ceil(0.5 * m["shape"][1])
        assert torch.all((new[k] == ft[k]) | restored)
    obs = repair(models, models["lora"], tmp_path / "elem_obs", granularity="element", compensation="exact")
    assert obs["format"] == "checkpoint" and obs["finetune_kind"] == "lora"


def test_svd_adapter_from_full_finetune_reports_its_error(models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "svd"
    report = repair(models, models["full"], out, format="adapter", max_rank=8)
    ckpt = tmp_path / "ckpt"
    repair(models, models["full"], ckpt)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8 and not cfg["modules_to_save"]
    err = report["svd_relative_error"]
    assert 0 < err < 1
    base = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, out).merge_and_unload().state_dict()
    dense, w0 = tensors_of(ckpt), tensors_of(models["base"])
    names = [m["name"] + ".weight" for m in report["matrices"]]
    num = sum(float(((merged[k] - w0[k]) - (dense[k] - w0[k])).square().sum()) for k in names)
    den = sum(float((dense[k] - w0[k]).square().sum()) for k in names)
    assert math.sqrt(num / den) == pytest.approx(err, rel=1e-3)


def test_sequential_and_finetuned_hessian_inputs(models, tmp_path):
    seq = repair(models, models["full"], tmp_path / "seq", hessian_inputs="sequential", compensation="exact")
    fin = repair(models, models["full"], tmp_path / "fin", hessian_inputs="finetuned", compensation="exact",
                 fisher_model="finetuned")
    base = repair(models, models["full"], tmp_path / "base", compensation="exact")
    norms = lambda r: [m["compensation_norm"] for m in r["matrices"]]  # noqa: E731
    assert norms(seq) != norms(base) and norms(fin) != norms(base)
    # sequential with a LoRA: the exact adapter of each block feeds the next block's inputs
    seq_a = repair(models, models["lora"], tmp_path / "seq_a", hessian_inputs="sequential")
    seq_c = repair(models, models["lora"], tmp_path / "seq_c", hessian_inputs="sequential", format="checkpoint")
    assert norms(seq_a) == pytest.approx(norms(seq_c), rel=1e-4)  # float32 rounding of the patched blocks


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures(arch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = build_tiny_model(tmp_path / "base", arch=arch, hidden_size=64, seed=3)
    lora = random_lora(base, tmp_path / "lora", rank=8, seed=4, scale=0.2)
    hon, task = write_calibration(tmp_path, n=6, seed=1)
    rep = run_repair(base, lora, hon, task, tmp_path / "out", num_samples=6, max_length=40)
    assert rep["selected_matrices"] == math.ceil(0.4 * 14)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "out")
    out = model.generate(input_ids=torch.tensor([[1, 5, 9, 12]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    full = perturbed_copy(base, tmp_path / "full", seed=5)
    rep = run_repair(base, full, hon, task, tmp_path / "out_full", num_samples=6, max_length=40,
                     compensation="exact")
    assert rep["format"] == "checkpoint"
    AutoModelForCausalLM.from_pretrained(tmp_path / "out_full", dtype=torch.float32).generate(
        input_ids=torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False)


def test_same_seed_same_bytes(models, tmp_path):
    for kw in (dict(), dict(selection="random", seed=7, compensation="exact")):
        a = repair(models, models["lora"], tmp_path / "a", overwrite=True, **kw)
        b = repair(models, models["lora"], tmp_path / "b", overwrite=True, **kw)
        assert a["matrices"] == b["matrices"]
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    repair(models, models["full"], tmp_path / "c")
    repair(models, models["full"], tmp_path / "d")
    for f in sorted(p.name for p in (tmp_path / "c").glob("*.safetensors")):
        assert (tmp_path / "c" / f).read_bytes() == (tmp_path / "d" / f).read_bytes()


def test_cli_prints_summary_and_writes_atomically(models, tmp_path):
    from hcnr_deploy.cli import main

    out = tmp_path / "cli_out"
    result = CliRunner().invoke(main, ["repair", "--base", str(models["base"]), "--finetuned", str(models["lora"]),
                                       "--honesty-data", str(models["hon"]), "--task-data", str(models["task"]),
                                       "--out", str(out), "--num-samples", "4", "--max-length", "32"])
    assert result.exit_code == 0, result.output
    assert "edited fraction" in result.output and "Fisher" in result.output and "Hessian" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "recipe.yaml", "report.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    command = json.loads((out / "report.json").read_text())["settings"]["command"]
    assert command.startswith("hcnr-deploy repair --base") and "--num-samples 4 --max-length 32" in command
    help_text = CliRunner().invoke(main, ["repair", "--help"]).output
    for opt in ("--r-iw", "--r-cw", "--granularity", "--selection", "--compensation", "--task-weight",
                "--fisher-model", "--hessian-inputs", "--damp", "--seed", "--device", "--dtype", "--format",
                "--max-rank", "--overwrite", "--num-samples", "--max-length"):
        assert opt in help_text
