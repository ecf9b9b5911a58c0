"""The scenario's recipes: everything that determines its data and models (the cache keys hash these fields), and
what the repair and the demo's choice take from a recipe."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hcnr_deploy.scenario import data as scen_data
from hcnr_deploy.scenario import realdata


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the scenario's models (the cache keys are hashes of these fields)."""

    model: str = "tiny"                 # tiny | smollm2
    size: scen_data.ScenarioSize = field(default_factory=lambda: scen_data.TINY_SIZE)
    seed: int = 0
    calib_draw: int = 0                 # > 0: same models, another draw of the repair's calibration examples
    # tiny model (trained from scratch: knowledge + refusals = the base)
    hidden: int = 128
    layers: int = 4
    vocab: int = 1024
    # base: tiny pretraining (full) or SmolLM2's refusal-aware LoRA (merged)
    base_steps: int = 300
    base_lr: float = 3e-3
    base_batch: int = 64
    base_rank: int = 16
    # ft: domain LoRA on base, answers only
    ft_steps: int = 300
    ft_lr: float = 1e-3
    ft_batch: int = 32
    ft_rank: int = 8
    # repair
    num_samples: int = 128
    r_iw: float = 0.5
    r_cw: float = 0.4
    selection: str = "hcnr"
    compensation: str = "obs"
    task_weight: float = 1.0
    # training baselines (scenario/baselines.py): refusal-data sizes (rows of rait_train.jsonl), passes over them
    baseline_sizes: tuple[int, ...] = (64, 160, 640)
    baseline_epochs: int = 4
    # eval
    max_tokens: int = 24
    # sweep (demo): candidates besides base and ft, hcnr_deploy.sweep's --grid format; None = the default grid
    grid: str | None = None
    # the choice's domain margin; None = the sweep's default (tiny and tiny-demo: 0.03)
    max_domain_drop: float | None = None

    def with_seed(self, seed: int) -> "Recipe":
        return replace(self, seed=seed)


RECIPES = {
    # the demo's default: tiny with 2.5x the domain (1000 domain questions, ft at the same 16 passes over its
    # data) and 16 candidates (every family, fewer points), so its 0.03 margin is resolvable within 15 minutes
    "tiny-demo": Recipe(size=scen_data.DEMO_SIZE, ft_steps=750, max_domain_drop=0.03,
                        grid="hcnr:r_cw=0.2,0.4,0.8; random:r_cw=0.4; taskaware:mu=1; regmean:mu=1,10; "
                             "scale:a=0.4,0.8; lines:a=0.4:b=0.6; lines:a=0.8:b=-0.6; sft:steps=16,64; "
                             "guard:fr=0.02,0.05,0.1"),
    # the scenario of benchmarks/results (reproduction.json, guard/tiny-seed*): 400 domain questions
    "tiny": Recipe(max_domain_drop=0.03),
    "ci": Recipe(size=scen_data.CI_SIZE, hidden=64, layers=2, vocab=512, base_steps=150, base_batch=32,
                 ft_steps=60, ft_lr=3e-3, ft_batch=16, num_samples=32, baseline_sizes=(16, 40, 160),
                 baseline_epochs=4,
                 grid="hcnr:r_cw=0.2,0.4; regmean:mu=3; scale:alpha=0.5; sft:steps=16"),
    "smollm2": Recipe(model="smollm2", size=scen_data.SMOLLM2_SIZE, base_steps=110, base_lr=5e-4, base_batch=16,
                      base_rank=16, ft_steps=100, ft_lr=5e-4, ft_batch=16, ft_rank=8, max_tokens=32),
    # SmolLM2 on the real benchmarks (realdata.py): R-Tuning base LoRA from the training part of SelfAware /
    # FalseQA / NEC / RefuNQ (2 answers per refusal), a gentle reading-comprehension fine-tune (fictional
    # towns' passages: the answer is in the prompt, so the domain does not collide with unanswerable questions)
    "smollm2-rc": Recipe(model="smollm2", size=realdata.RealSize(), base_steps=60, base_lr=3e-4, base_batch=16,
                         base_rank=16, ft_steps=40, ft_lr=3e-4, ft_batch=16, ft_rank=8, max_tokens=32,
                         baseline_sizes=(32, 64, 128), baseline_epochs=1),
}


def repair_options(recipe: Recipe, **overrides) -> dict:
    """The repair's options; its seed (random selection) is the recipe's seed plus the calibration draw."""
    opts = {k: getattr(recipe, k) for k in ("num_samples", "r_iw", "r_cw", "selection", "compensation",
                                            "task_weight")}
    opts["seed"] = recipe.seed + recipe.calib_draw
    opts.update(overrides)
    return opts


def demo_margin(recipe: Recipe) -> float:
    """The demo's --max-domain-drop: the recipe's, else the sweep's default."""
    from hcnr_deploy.sweep import choice as C

    return C.DEFAULT_MAX_DOMAIN_DROP if recipe.max_domain_drop is None else recipe.max_domain_drop
