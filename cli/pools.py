"""``xentmem pools``: the pools behind cleancache and frontswap, with their counters."""

from __future__ import annotations

import click

from xentmem_cli import render
from xentmem_cli.app import App, json_option


@click.command()
@json_option
@click.pass_obj
def pools(app: App, *, as_json: bool) -> None:
    """List the cleancache pools, the frontswap swap areas and the backend's own pools."""
    data = app.call("pools")
    app.emit(data, as_json=as_json, render=render.tree)
