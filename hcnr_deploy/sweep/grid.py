"""The sweep's candidate grid: `--grid` text -> candidates (base, ft, then every grid point), each named for its
repair method and options. Every value is typed and checked by the options models (RepairOptions, GuardOptions):
the grid declares only which options a method sweeps and their short names."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from eval_harness.errors import UserError

REFERENCES = ("base", "ft")

# grid method -> (repair method, fixed repair options, {parameter: short name in candidate names})
METHODS = {
    "hcnr": ("hcnr", {}, {"r_cw": "rcw", "r_iw": "riw", "task_weight": "mu", "compensation": "", "damp": "damp"}),
    "random": ("hcnr", {"selection": "random"}, {"r_cw": "rcw", "r_iw": "riw", "compensation": ""}),
    "regmean": ("regmean", {}, {"task_weight": "mu", "damp": "damp"}),
    "taskaware": ("hcnr", {"compensation": "task-aware"}, {"task_weight": "mu", "r_cw": "rcw", "r_iw": "riw",
                                                         "damp": "damp"}),
    "scale": ("scale", {}, {"alpha": "a"}),
    "lines": ("lines", {}, {"alpha": "a", "beta": "b"}),
    "sft": ("sft", {}, {"steps": "s", "lr": "lr"}),
    # not a weight edit: the honesty guard (hcnr_deploy/guard), scored from ft's answers (guard/family.py)
    "guard": ("guard", {}, {"false_refusal": "fr", "block": "b"}),
}
ALIASES = {"mu": "task_weight", "a": "alpha", "b": "beta", "fr": "false_refusal", "rcw": "r_cw", "riw": "r_iw", "r-cw": "r_cw",
           "r-iw": "r_iw", "task-weight": "task_weight"}
# lines: two depth profiles (shallow blocks nearer the base, b > 0; deep blocks nearer the base, b < 0), each at
# the mean factors 0.5 and 0.7 of scale-a0.4..0.8, so the plot tells whether the profile beats flat scaling
DEFAULT_GRID = ("hcnr:r_cw=0.1,0.2,0.4,0.6,0.8; random:r_cw=0.4; taskaware:task_weight=0.1,1,10; "
                "regmean:task_weight=0.3,1,3,10; scale:alpha=0.2,0.4,0.6,0.8; lines:alpha=0.2,0.4:beta=0.6; "
                "lines:alpha=0.8,1:beta=-0.6; sft:steps=16,32,64; guard:false_refusal=0.02,0.05,0.1")
GRID_HELP = ("METHOD:PARAM=V1,V2[:PARAM=...]; ... Methods: hcnr (r_cw, r_iw, task_weight, compensation, damp), "
             "random (HCNR with random column selection: r_cw, r_iw, compensation), taskaware (HCNR with "
             "--compensation task-aware: task_weight, alias mu, r_cw, r_iw, damp), regmean (task_weight, alias mu), "
             "scale (alpha, alias a), lines (alpha, beta, aliases a, b: W0 + (a + b l / (L - 1)) D in block l of "
             "L), sft (steps, lr), guard (false_refusal, alias fr; block: auto or an index; the honesty guard, scored "
             "from ft's answers). Several PARAMs of one method give every combination; "
             "a method without parameters (e.g. 'hcnr') is its repair defaults. base and ft are always in.")


@dataclass(frozen=True)
class Candidate:
    """One point of the sweep: its served name, grid method, repair method and options."""

    name: str
    family: str                       # grid method: base, ft, hcnr, random, taskaware, regmean, scale, lines, sft
    method: str                       # the repair method (`repair --method`); the family for base / ft
    params: dict = field(default_factory=dict, hash=False)  # options given to the repair (beyond the fixed ones)

    @property
    def repair_kwargs(self) -> dict:
        return {**METHODS[self.family][1], **self.params} if self.family in METHODS else {}


def _fmt_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def candidate_name(family: str, params: dict) -> str:
    """`hcnr-rcw0.4`, `random-rcw0.4`, `regmean-mu3`, `scale-a0.6`, `sft-s32`, `hcnr-rcw0.2-exact`."""
    specs = METHODS[family][2]
    parts = [family] + [f"{specs[k]}{_fmt_value(v)}" for k, v in params.items()]
    return "-".join(parts)


def _options_class(family: str):
    """The options model that types and checks `family`'s values (one source: the grid repeats none of it)."""
    if family == "guard":
        from hcnr_deploy.guard.options import GuardOptions

        return GuardOptions
    from hcnr_deploy.options import RepairOptions

    return RepairOptions


def param_type(family: str, key: str) -> type:
    """The type the options model declares for `key` (float, int or str; `str | None` reads as str)."""
    declared = {f.name: f.type for f in dataclasses.fields(_options_class(family))}[key]
    name = declared if isinstance(declared, str) else declared.__name__
    return {"float": float, "int": int}.get(name.split("|")[0].strip(), str)


def _parse_value(family, key, text):
    """One grid value, converted to its type and checked by the options model (RepairOptions: one source)."""
    from hcnr_deploy.options import check_value

    typ = param_type(family, key)
    try:
        v = typ(text)
    except ValueError:
        raise UserError(f"--grid {family}:{key}={text!r}: not a valid {typ.__name__}") from None
    if family == "guard":
        try:
            _options_class(family)(**{key: v})
        except UserError as e:
            raise UserError(f"--grid {family}:{key}={text}: {e.message}") from None
        return v
    problem = check_value(key, v)
    if problem is not None:
        raise UserError(f"--grid {family}:{key}={text}: {problem}")
    return v


def _check_combination(entry: str, family: str, params: dict):
    """A grid point the repair would refuse (e.g. lines' alpha + beta < 0) is an error before any work."""
    from hcnr_deploy.options import RepairOptions

    if family == "guard":  # not a repair: its values were checked by GuardOptions in _parse_value
        return
    try:
        RepairOptions(method=METHODS[family][0], **{**METHODS[family][1], **params})
    except UserError as e:
        raise UserError(f"--grid {entry!r}: {e.format_message()}") from None


def parse_grid(spec: str | None) -> list[Candidate]:
    """`--grid` text -> candidates (base and ft first, then the grid in its order, duplicates dropped).

    `hcnr:r_cw=0.1,0.4; regmean:task_weight=1,3; scale:alpha=0.5` -> base, ft, hcnr-rcw0.1, hcnr-rcw0.4,
    regmean-mu1, regmean-mu3, scale-a0.5."""
    spec = DEFAULT_GRID if spec is None else spec
    out = [Candidate("base", "base", "base"), Candidate("ft", "ft", "ft")]
    seen = set(REFERENCES)
    for entry in (e.strip() for e in spec.split(";")):
        if not entry or entry in REFERENCES:
            continue
        family, *groups = [g.strip() for g in entry.split(":")]
        family = family.lower()
        if family not in METHODS:
            raise UserError(f"--grid {entry!r}: unknown method {family!r}; choose from {', '.join(METHODS)} "
                            f"(format: {GRID_HELP.split(' Methods')[0]})")
        specs = METHODS[family][2]
        axes = []
        for g in groups:
            key, sep, values = g.partition("=")
            key = ALIASES.get(key.strip().lower(), key.strip().lower())
            if not sep or not values.strip():
                raise UserError(f"--grid {entry!r}: expected PARAM=V1,V2 after '{family}:', got {g!r}")
            if key not in specs:
                raise UserError(f"--grid {entry!r}: {family} has no parameter {key!r}; it takes "
                                f"{', '.join(specs)}")
            if any(k == key for k, _ in axes):
                raise UserError(f"--grid {entry!r}: parameter {key} is given twice")
            vals = [_parse_value(family, key, v.strip()) for v in values.split(",") if v.strip()]
            axes.append((key, vals))
        for combo in itertools.product(*[vals for _, vals in axes]):
            params = dict(zip([k for k, _ in axes], combo))
            _check_combination(entry, family, params)
            name = candidate_name(family, params)
            if name not in seen:
                seen.add(name)
                out.append(Candidate(name, family, METHODS[family][0], params))
    return out

