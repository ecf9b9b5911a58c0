"""A command called through the Python API (`from hcnr_deploy import repair, sweep, evaluate`) returns its result
and prints nothing."""

import click

API_CALL = "api_call"  # ctx.meta key: set when the Python API runs a command


def from_api(ctx: click.Context) -> bool:
    return bool(ctx.meta.get(API_CALL))
