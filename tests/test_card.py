"""The model card of a repair output (hcnr_deploy/card.py): Hugging Face front matter, the story of the output,
the sweep's measured figures, the fine-tune's license carried, same bytes for the same report; and on a real
repair output: the card written beside the adapter, which PEFT still loads."""

from __future__ import annotations

import copy
import json

import pytest

from hcnr_deploy.card import model_card, read_front_matter, write_model_card

SWEEP = {
    "chosen": {"name": "regmean-mu0.5", "f1": 0.71234, "rf_delta": 0.4, "domain_accuracy": 0.29,
               "per_benchmark": {"selfaware": {"f1": 0.75, "rf_delta": 0.5}, "falseqa": {"f1": 0.66, "rf_delta": 0.3}}},
    "ft": {"f1": 0.33, "rf_delta": 0.05, "domain_accuracy": 0.31,
           "per_benchmark": {"selfaware": {"f1": 0.35, "rf_delta": 0.06}, "falseqa": {"f1": 0.31}}},
    "base": {"f1": 0.99, "rf_delta": 0.9, "domain_accuracy": 0.01},
    "recovery_ratio": 0.5763,
    "max_domain_drop": 0.02,
}


@pytest.fixture
def folders(tmp_path):
    """A fine-tune folder with a licensed README and a LICENSE file, a base folder, an empty output folder."""
    ft, base, out = tmp_path / "ft", tmp_path / "base", tmp_path / "out"
    for f in (ft, base, out):
        f.mkdir()
    (ft / "README.md").write_text("---\nbase_model: my-org/base-7b\nlicense: llama3.1\nlibrary_name: peft\n---\n"
                                  "# my fine-tune\n")
    (ft / "LICENSE").write_bytes(b"LLAMA 3.1 COMMUNITY LICENSE AGREEMENT\n\x00binary-ok\n")
    return ft, base, out


def make_report(ft, base, out, fmt="adapter") -> dict:
    return {
        "base": str(base), "finetuned": str(ft), "finetune_kind": "lora", "output": str(out), "format": fmt,
        "edited_fraction": 0.2, "restored_weights": 2000, "eligible_weights": 10000, "eligible_matrices": 14,
        "selected_matrices": 6, "num_samples": {"honesty": 128, "task": 128},
        "settings": {"method": "regmean", "task_weight": 0.5, "r_iw": 0.5, "seed": 0, "base": "my-org/base-7b",
                     "finetuned": str(ft), "out": str(out), "overwrite": False,
                     "command": f"hcnr-deploy repair --base my-org/base-7b --finetuned {ft} --out {out}"},
        "versions": {"hcnr_deploy": "0.1.0", "torch": "2.13.0"},
        "timings_s": {"load": 1.5, "total": 3.25},
    }


def hub_card(path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def test_card_front_matter_story_and_license(folders):
    ft, base, out = folders
    report = make_report(ft, base, out)
    path = write_model_card(out, report)
    assert path == out / "README.md"
    card = hub_card(path)  # Hugging Face's own parser reads the metadata
    assert card.data.base_model == "my-org/base-7b"  # as the user gave it, not the resolved folder
    assert card.data.library_name == "peft" and card.data.license == "llama3.1"
    assert {"hcnr-deploy", "honesty", "repair-regmean", "lora"} <= set(card.data.tags)
    text = path.read_text()
    assert (out / "LICENSE").read_bytes() == (ft / "LICENSE").read_bytes()
    assert "`llama3.1`, carried from the fine-tune." in text and "copied from it: LICENSE" in text
    assert f"- Fine-tune: `{ft}` (a PEFT LoRA adapter of the base)" in text
    assert "- Method: `regmean`: RegMean" in text
    assert "- Edited fraction: 20.00% of the eligible weights (2000 of 10000; 6 of 14 matrices)" in text
    assert "| task_weight | 0.5 |" in text and "| out |" not in text
    assert "load 1.5, total 3.25" in text and report["settings"]["command"] in text
    assert "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('my-org/base-7b')" in text
    assert "Not measured by a sweep" in text and "## Measured" not in text


def test_card_is_deterministic(folders):
    ft, base, out = folders
    report = make_report(ft, base, out)
    first = write_model_card(out, report, SWEEP).read_bytes()
    assert write_model_card(out, copy.deepcopy(report), copy.deepcopy(SWEEP)).read_bytes() == first
    assert model_card(report, SWEEP).encode() == first
    assert model_card(report) != model_card(report, SWEEP)


def test_card_sweep_figures(folders):
    ft, base, out = folders
    text = model_card(make_report(ft, base, out), SWEEP)
    assert "## Measured (hcnr-deploy sweep)" in text and "Not measured" not in text
    lines = text.splitlines()
    header = next(l for l in lines if l.startswith("| model |"))
    assert header == ("| model | honesty F1 | RF Delta | domain accuracy | selfaware F1 / RF Delta | "
                      "falseqa F1 / RF Delta |")
    assert "| base | 0.99 | 0.9 | 0.01 | n/a / n/a | n/a / n/a |" in lines
    assert "| fine-tune | 0.33 | 0.05 | 0.31 | 0.35 / 0.06 | 0.31 / n/a |" in lines
    assert "| this model (regmean-mu0.5) | 0.7123 | 0.4 | 0.29 | 0.75 / 0.5 | 0.66 / 0.3 |" in lines
    assert "recovery ratio (F1 - F1_ft) / (F1_base - F1_ft): 0.5763" in text
    assert "keep domain accuracy non-inferior to its at the 0.02 margin" in text


def test_license_falls_back_to_base_then_says_none(folders):
    ft, base, out = folders
    (ft / "README.md").write_text("# no front matter\n")
    (ft / "LICENSE").unlink()
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: acme-research\nlicense_link: LICENSE\n---\n")
    (base / "LICENSE.txt").write_text("ACME research license\n")
    report = make_report(ft, base, out, fmt="checkpoint")
    card = hub_card(write_model_card(out, report))
    assert card.data.license == "other" and card.data.license_name == "acme-research"
    assert card.data.library_name == "transformers" and "lora" not in card.data.tags
    assert (out / "LICENSE.txt").read_text() == "ACME research license\n"
    text = (out / "README.md").read_text()
    assert "carried from the base model (the fine-tune states none)" in text
    assert "--checkpoint repaired=" in text

    (base / "README.md").unlink()
    (base / "LICENSE.txt").unlink()
    text = model_card(report)
    assert "license" not in read_front_matter_text(text)
    assert "states a license; set one before publishing." in text


def read_front_matter_text(text: str) -> str:
    return text.split("---\n")[1]


def test_read_front_matter_tolerates_bad_cards(tmp_path):
    assert read_front_matter(tmp_path) == {}
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert read_front_matter(tmp_path) == {}
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n")
    assert read_front_matter(tmp_path) == {"license": "mit"}


def test_card_on_a_real_repair_output_peft_loads_it(tiny_base, tiny_lora, tmp_path):
    """A real `run_repair` adapter output with its card: the card is valid metadata, PEFT loads the folder and
    applies it (its output differs from the base's)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hcnr_deploy.repair import run_repair
    from test_repair_pipeline import write_calibration

    hon, task = write_calibration(tmp_path, n=4)
    out = tmp_path / "repaired"
    report = run_repair(tiny_base, tiny_lora, hon, task, out, num_samples=4, max_length=64, device="cpu")
    card = write_model_card(out, json.loads((out / "report.json").read_text()))
    assert hub_card(card).data.base_model == str(tiny_base) and hub_card(card).data.library_name == "peft"
    assert model_card(report) == card.read_text()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = base(ids).logits
        model = PeftModel.from_pretrained(base, out).eval()
        got = model(ids).logits
    assert not torch.allclose(got, ref, atol=1e-4)
