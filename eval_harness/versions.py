"""The versions a run records (results.json, report.json, frontier.json, probe.json, reproduction.json)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


def versions(packages, *, python: bool = True, keep_missing: bool = True) -> dict:
    """{"python": its version (when `python`), package: installed version} for each of `packages`, in order; a
    package that is not installed maps to None, or is left out with keep_missing=False."""
    out = {"python": platform.python_version()} if python else {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            if keep_missing:
                out[name] = None
    return out
