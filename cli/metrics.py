"""``xentmem metrics``: the counters and balloon figures in Prometheus text format."""

from __future__ import annotations

from typing import Any

import click

from xentmem_cli.app import App, json_option


def exposition(data: dict[str, Any]) -> str:
    """The text itself, as a scrape or a node_exporter textfile would hold it."""
    return str(data.get("text", "")).rstrip("\n")


@click.command()
@json_option
@click.pass_obj
def metrics(app: App, *, as_json: bool) -> None:
    """Print the metrics in Prometheus text format (redirect into a textfile collector)."""
    data = app.call("metrics")
    app.emit(data, as_json=as_json, render=exposition)
