"""The repair: statistics once, candidate edits from them, artifacts out.

    load (engine/state.py: one model, switched base <-> fine-tune, optional block offload)
      -> statistics (engine/statistics.py: Fisher scores, Eq. 4; Grams / Hessians of module inputs)
      -> candidates (candidates.py: HCNR select, Eqs. 5-7, + compensate, Eqs. 9-10; regmean; scale)
      -> artifacts (report.py: checkpoint / exact LoRA / SVD adapter, report.json, README.md)

``RepairSession`` (session.py) keeps the statistics for any number of candidates; ``run_repair`` is
one session with one write (the CLI's ``hcnr-deploy repair``). The math is in equations/ (pure tensor
functions), the hooks, block streaming and passes in engine/.
"""
from hcnr_deploy.options import RepairOptions
from hcnr_deploy.repair.session import RepairSession, run_repair

__all__ = ["RepairOptions", "RepairSession", "run_repair"]

from hcnr_deploy.api import make_callable  # noqa: E402  (`from hcnr_deploy import repair; repair(base=...)`)

make_callable(__name__)
