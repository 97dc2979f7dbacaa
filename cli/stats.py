"""``xentmem stats``: the frontends' counters and the backend's required and detailed ones."""

from __future__ import annotations

from typing import Any

import click

from xentmem_cli import render
from xentmem_cli.app import App, json_option

#: The key of the backend's optional counters in the daemon's ``stats`` answer.
DETAILED_KEY = "backend_detailed"


@click.command()
@click.option("--detailed/--required", default=True, show_default=True,
              help="Include the backend's detailed counters, or only the required ones.")
@json_option
@click.pass_obj
def stats(app: App, *, detailed: bool, as_json: bool) -> None:
    """Show the counters: cleancache, frontswap, the backend's required and detailed ones."""
    data: dict[str, Any] = app.call("stats")
    if not detailed:
        data = {key: value for key, value in data.items() if key != DETAILED_KEY}
    app.emit(data, as_json=as_json, render=render.tree)
