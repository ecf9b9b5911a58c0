"""The model card (README.md) of a repair output: what it is made of, how, and what was measured.

`model_card(report, sweep)` renders the text from the repair's report.json dict (and, when a sweep chose the
output, its measured figures); `write_model_card(folder, report, sweep)` writes it into the output folder with
the fine-tune's LICENSE file(s). The text is a function of its inputs only: same report, same bytes.

Front matter follows the Hugging Face model-card metadata: `base_model` (as the user gave it), `library_name`
(`peft` for an adapter, `transformers` for a checkpoint), `license` (the fine-tune's, else the base's), `tags`.

`sweep`, when given (section 5b of DESIGN.md):

    {"chosen": {"name": ..., "f1": ..., "rf_delta": ..., "domain_accuracy": ...,
                "per_benchmark": {"selfaware": {"f1": ..., "rf_delta": ...}, ...}},
     "ft":   {same keys},  "base": {same keys},
     "recovery_ratio": ...,            # (F1 - F1_ft) / (F1_base - F1_ft)
     "max_domain_drop": ..., "reason": ...}          # optional

Missing figures print as "n/a".
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from eval_harness.atomic import write_text_atomic

CARD_FILE = "README.md"
LICENSE_KEYS = ("license", "license_name", "license_link")  # the card metadata that names a license
LICENSE_FILE_RE = re.compile(r"^(LICEN[CS]E|COPYING)([.\-_].*)?$", re.IGNORECASE)
METHODS = {
    "hcnr": "HCNR (Honesty-Critical Neurons Restoration, \"Fine-Tuned LLMs Know They Don't Know\"): the input "
            "columns that matter most for honesty and least for the task are restored to the base model "
            "(Eqs. 4-7), the change compensated through the honesty data's Hessian (Eqs. 8-10)",
    "regmean": "RegMean between the base on honesty inputs and the fine-tune on task inputs, over every matrix",
    "scale": "weight interpolation W0 + A (Ws - W0) between the base and the fine-tune",
    "lines": "depth-dependent weight interpolation W0 + (A + B l / (L - 1)) (Ws - W0) for block l of L (LiNeS)",
    "sft": "further supervised fine-tuning on the calibration examples",
}
# settings shown elsewhere in the card (paths, the command) or that do not describe the result
_NOT_SETTINGS = ("base", "finetuned", "out", "command", "overwrite", "honesty_data", "task_data")


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _yaml_str(s: str) -> str:
    return json.dumps(str(s), ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def read_front_matter(folder: Path) -> dict:
    """The YAML front matter of `folder`/README.md ({} when there is none or it does not parse)."""
    import yaml

    card = Path(folder) / CARD_FILE
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not m:
        return {}
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def license_files(folder: Path) -> list[Path]:
    try:
        return sorted(f for f in Path(folder).iterdir() if f.is_file() and LICENSE_FILE_RE.match(f.name))
    except OSError:
        return []


def find_license(report: dict) -> tuple[dict, str | None, Path | None]:
    """(license metadata, whose it is, folder to copy LICENSE files from): the fine-tune's, else the base's."""
    for role in ("finetuned", "base"):
        folder = report.get(role)
        if not folder or not Path(folder).is_dir():
            continue
        meta = read_front_matter(Path(folder))
        lic = {k: meta[k] for k in LICENSE_KEYS if meta.get(k)}
        if lic or license_files(Path(folder)):
            return lic, role, Path(folder)
    return {}, None, None


def _front_matter(report: dict, lic) -> list[str]:
    settings = report.get("settings", {})
    method = settings.get("method", "hcnr")
    adapter = report.get("format") == "adapter"
    lines = ["---", f"base_model: {_yaml_str(settings.get('base', report.get('base')))}",
             f"library_name: {'peft' if adapter else 'transformers'}"]
    for key, value in lic.items():
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"- {_yaml_str(x)}" for x in value]
        else:
            lines.append(f"{key}: {_yaml_str(value)}")
    tags = ["hcnr-deploy", "honesty", f"repair-{method}"] + (["lora"] if adapter else [])
    lines += ["pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    return lines


def _made_of(report: dict) -> list[str]:
    s = report.get("settings", {})
    method = s.get("method", "hcnr")
    kind = {"lora": "a PEFT LoRA adapter", "full": "a full fine-tune"}.get(report.get("finetune_kind"), "a fine-tune")
    what = ("a PEFT LoRA adapter on the base model" if report.get("format") == "adapter"
            else "a full model checkpoint")
    if "svd_relative_error" in report:
        what += f" (truncated SVD, relative error {_fmt(report['svd_relative_error'])})"
    lines = ["## How it was made", "",
             f"- Base model: `{s.get('base', report.get('base'))}`",
             f"- Fine-tune: `{s.get('finetuned', report.get('finetuned'))}` ({kind} of the base)",
             f"- This folder: {what}",
             f"- Method: `{method}`: {METHODS.get(method, 'see the settings below')}"]
    if "edited_fraction" in report:
        frac = f"- Edited fraction: {100 * report['edited_fraction']:.2f}% of the eligible weights"
        if "restored_weights" in report and "eligible_weights" in report:
            frac += f" ({report['restored_weights']} of {report['eligible_weights']}"
            if "selected_matrices" in report and "eligible_matrices" in report:
                frac += f"; {report['selected_matrices']} of {report['eligible_matrices']} matrices"
            frac += ")"
        lines.append(frac)
    n = report.get("num_samples") or {}
    if n:
        lines.append(f"- Calibration: {n.get('honesty', 'n/a')} honesty + {n.get('task', 'n/a')} task examples")
    lines += ["", "Settings:", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in s.items() if k not in _NOT_SETTINGS]
    timings = report.get("timings_s") or {}
    if timings:
        lines += ["", "Wall time of the repair (s): " + ", ".join(f"{k} {_fmt(v)}" for k, v in timings.items())]
    if s.get("command"):
        lines += ["", "Command:", "", "```", s["command"], "```"]
    versions = report.get("versions") or {}
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)]
    return lines + [""]


def _figures(sweep: dict) -> list[str]:
    rows = [("base", sweep.get("base") or {}), ("fine-tune", sweep.get("ft") or {}),
            (f"this model ({sweep.get('chosen', {}).get('name', 'chosen')})", sweep.get("chosen") or {})]
    benches: list[str] = []
    for _, fig in rows:
        for b in fig.get("per_benchmark") or {}:
            if b not in benches:
                benches.append(b)
    head = ["model", "honesty F1", "RF Delta", "domain accuracy"] + [f"{b} F1 / RF Delta" for b in benches]
    lines = ["## Measured (hcnr-deploy sweep)", "",
             "On held-out questions, disjoint from the calibration data. F1: unanswerable = positive, refusal = "
             "prediction; RF Delta: refusal rate on unanswerable minus on answerable.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, fig in rows:
        per = fig.get("per_benchmark") or {}
        cells = [label, _fmt(fig.get("f1")), _fmt(fig.get("rf_delta")), _fmt(fig.get("domain_accuracy"))]
        cells += [f"{_fmt((per.get(b) or {}).get('f1'))} / {_fmt((per.get(b) or {}).get('rf_delta'))}"
                  for b in benches]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"- Honesty recovery ratio (F1 - F1_ft) / (F1_base - F1_ft): {_fmt(sweep.get('recovery_ratio'))}"]
    if sweep.get("max_domain_drop") is not None:
        lines.append(f"- Chosen among the candidates that beat the fine-tune's honesty with 95% paired confidence "
                     f"and keep domain accuracy non-inferior to its at the {_fmt(sweep['max_domain_drop'])} margin.")
    if sweep.get("reason"):
        lines.append(f"- Reason: {sweep['reason']}")
    return lines + [""]


def _usage(report: dict) -> list[str]:
    base = report.get("settings", {}).get("base", report.get("base"))
    here = "path/to/this/folder"
    if report.get("format") == "adapter":
        code = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {here!r})"]
        serve = f"hcnr-deploy serve --base {base} --adapter repaired={here}"
    else:
        code = ["from transformers import AutoModelForCausalLM", "",
                f"model = AutoModelForCausalLM.from_pretrained({here!r})"]
        serve = f"hcnr-deploy serve --base {base} --checkpoint repaired={here}"
    return ["## Use", "", "```python", *code, "```", "", "```bash", serve, "```", ""]


def _license_text(lic, source: str | None, files: list[Path]) -> list[str]:
    lines = ["## License", ""]
    if source is None:
        return lines + ["Neither the fine-tune's nor the base model's README.md states a license; set one before "
                        "publishing.", ""]
    whose = "the fine-tune" if source == "finetuned" else "the base model (the fine-tune states none)"
    if lic.get("license"):
        shown = ", ".join(map(str, lic["license"])) if isinstance(lic["license"], list) else str(lic["license"])
        extra = "".join(f" ({lic[k]})" for k in ("license_name", "license_link") if lic.get(k))
        lines.append(f"`{shown}`{extra}, carried from {whose}.")
    else:
        lines.append(f"No license named in the card of {whose}; see its license file.")
    if files:
        lines.append(f"License file(s) copied from it: {', '.join(f.name for f in files)}.")
    return lines + [""]


def model_card(report: dict, sweep: dict | None = None) -> str:
    """The README.md text of a repair output (deterministic: a function of `report` and `sweep` only)."""
    lic, source, folder = find_license(report)
    s = report.get("settings", {})
    title = Path(str(report.get("output") or "repaired")).name
    ft = s.get("finetuned", report.get("finetuned"))
    lines = _front_matter(report, lic)
    lines += [f"# {title}", "",
              f"An honesty repair by hcnr-deploy (`{s.get('method', 'hcnr')}`) of the fine-tune `{ft}`, edited "
              f"towards its base model `{s.get('base', report.get('base'))}` to bring back the base's \"I don't "
              f"know\" to questions it cannot answer.", ""]
    if sweep is None:
        lines += ["Not measured by a sweep: score it with `hcnr-deploy eval` before you ship it.", ""]
    lines += _made_of(report)
    if sweep is not None:
        lines += _figures(sweep)
    lines += _usage(report)
    lines += _license_text(lic, source, license_files(folder) if folder else [])
    return "\n".join(lines).rstrip("\n") + "\n"


def write_model_card(folder: Path, report: dict, sweep: dict | None = None) -> Path:
    """Write README.md (the card) into `folder` and copy the license file(s) it names; return the card's path."""
    folder = Path(folder)
    text = model_card(report, sweep)
    _, _, source = find_license(report)
    for f in license_files(source) if source else []:
        if not (folder / f.name).exists():
            shutil.copyfile(f, folder / f.name)
    return write_text_atomic(folder / CARD_FILE, text)
