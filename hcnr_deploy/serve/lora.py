"""LoRA adapters as vLLM serves them: the ranks it accepts, the flags derived from the adapters, the checks that an
adapter folder can be served on its base, and how much an adapter changes the weights (the smoke check's verdict)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eval_harness.errors import UserError
from hcnr_deploy.hubmodel import local_model_dir

# vLLM accepts these values of --max-lora-rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Modules we never ask vLLM to target: LoRA on lm_head crashes prompt logprobs in batches (bug A).
EXCLUDED_LORA_MODULES = ("lm_head",)
# Below this relative weight change (max ||s B A|| / ||W0|| over an adapter's matrices) an applied adapter may reply
# exactly like its base. Measured with transformers + PEFT on the tiny test model (hidden 128): bfloat16 moved no
# logprob at a change of 6e-6 and moved them by 0.016 at 6e-5; float32 moved them by more than 1e-5 from 6e-6 up.
TINY_WEIGHT_CHANGE = 1e-4


@dataclass
class LoraSettings:
    max_lora_rank: int
    max_loras: int
    target_modules: list[str]

    def args(self) -> list[str]:
        return ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras),
                "--lora-target-modules", *self.target_modules]


def round_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that is >= rank."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise UserError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]}); "
                    f"merge the adapter into a full checkpoint and serve it with --checkpoint.")


def adapter_rank(config: dict) -> int:
    """The largest rank in a PEFT adapter config (r and any rank_pattern overrides)."""
    return max([int(config.get("r", 8)), *[int(v) for v in (config.get("rank_pattern") or {}).values()]])


def adapter_modules(module_paths: list[str]) -> set[str]:
    """Module suffixes (q_proj, down_proj, ...) from full module paths (model.layers.0.self_attn.q_proj)."""
    return {m.rsplit(".", 1)[-1] for m in module_paths}


def derive_lora_settings(adapters: dict[str, tuple[dict, list[str]]]) -> LoraSettings:
    """vLLM's LoRA flags from {name: (adapter_config, adapted module paths)}: all adapters resident."""
    rank = max(adapter_rank(cfg) for cfg, _ in adapters.values())
    modules: set[str] = set()
    for _, paths in adapters.values():
        modules |= adapter_modules(paths)
    modules -= set(EXCLUDED_LORA_MODULES)
    if not modules:
        raise UserError("the adapters adapt no module vLLM can serve (only lm_head); merge them into a checkpoint "
                        "and use --checkpoint.")
    return LoraSettings(round_lora_rank(rank), max(1, len(adapters)), sorted(modules))


def _rename_option(err: UserError, name: str) -> UserError:
    return UserError(err.format_message().replace("--finetuned ", f"--adapter {name}="))


def validate_adapter(name: str, path: Path, base) -> tuple[dict, list[str]]:
    """Check that `path` is a LoRA adapter vLLM can serve on `base` (an io.checkpoint.Checkpoint)."""
    from hcnr_deploy.io.finetune import FineTune, LoraAdapter

    if not path.is_dir():
        raise UserError(f"--adapter {name}={path}: folder not found; pass a PEFT LoRA adapter folder "
                        f"(adapter_config.json + adapter_model.safetensors).")
    if not (path / "adapter_config.json").is_file():
        hint = " It is a full model: serve it with --checkpoint." if (path / "config.json").is_file() else ""
        raise UserError(f"--adapter {name}={path} has no adapter_config.json: not a PEFT LoRA adapter.{hint}")
    try:
        lora = FineTune(path.resolve(), base).lora if base is not None else LoraAdapter(path.resolve())
    except UserError as e:
        raise _rename_option(e, name) from None
    return lora.config, lora.modules()


def adapter_weight_change(adapter: Path, base: Path) -> float:
    """How much the adapter changes the weights vLLM serves: max over its matrices of ||s B A||_F / ||W0||_F
    (0.0 when every delta is zero, e.g. the base's own weights written as an adapter; lm_head is not served)."""
    from hcnr_deploy.equations.lora import lora_delta_norm
    from hcnr_deploy.io.checkpoint import Checkpoint
    from hcnr_deploy.io.finetune import LoraAdapter

    lora = LoraAdapter(Path(adapter))
    served = [m for m in lora.modules() if m.rsplit(".", 1)[-1] not in EXCLUDED_LORA_MODULES]
    deltas = {m: lora_delta_norm(*lora.factors(m), lora.scaling(m)) for m in served}
    if not any(deltas.values()):
        return 0.0
    ckpt = Checkpoint(local_model_dir(base), "--base")
    return max(d / max(float(ckpt.get(m + ".weight", check=False).double().norm()), 1e-30)
               for m, d in deltas.items() if d)


