"""Reproduce the paper's experiment on this machine: Tables 1-3, the recovery ratio, the trade-off figure.

    python benchmarks/reproduce.py --model smollm2 --data-dir ../shared/data --seeds 0,1,2 --limit 700

The code is the package benchmarks/reproduction (its docstring and --help describe every option); this script
runs it (as does `python -m benchmarks.reproduction` from the repository root).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reproduction.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
