"""``xentmem metrics``: the counters and balloon figures in Prometheus text format.

Printed to stdout, or with ``--textfile PATH`` written for node_exporter's textfile
collector, which reads every ``*.prom`` file of one directory (its
``--collector.textfile.directory``) at each scrape.  A shell redirection would let a scrape
read a half-written file, so the file is replaced atomically (a temporary file beside it,
then a rename: :func:`xentmem.files.write_atomically`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from xentmem.files import write_atomically
from xentmem_cli.app import App, json_option

#: The collector reads only files with this suffix (and so never our temporary file).
TEXTFILE_SUFFIX = ".prom"


def check_textfile(ctx: click.Context, param: click.Parameter,
                   value: Path | None) -> Path | None:
    if value is not None and value.suffix != TEXTFILE_SUFFIX:
        raise click.BadParameter(f"{value}: node_exporter's textfile collector reads only "
                                 f"*{TEXTFILE_SUFFIX} files; name it so")
    return value


def exposition(data: dict[str, Any]) -> str:
    """The text itself, as a scrape or a node_exporter textfile would hold it."""
    return str(data.get("text", "")).rstrip("\n")


@click.command()
@click.option("--textfile", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
              callback=check_textfile,
              help="Write the metrics to PATH atomically (temporary file, then rename), for "
                   "node_exporter's textfile collector: PATH is a *.prom file in its "
                   "--collector.textfile.directory.")
@json_option
@click.pass_obj
def metrics(app: App, *, textfile: Path | None, as_json: bool) -> None:
    """Print the metrics in Prometheus text format, or write them to a textfile.

    For a periodic textfile, the daemon's own `metrics_textfile` setting does the same
    every `metrics_interval` seconds.
    """
    data = app.call("metrics")
    if textfile is None:
        app.emit(data, as_json=as_json, render=exposition)
        return
    if not textfile.parent.is_dir():
        app.abort(f"{textfile.parent}: no such directory (node_exporter's textfile collector "
                  "directory, e.g. /var/lib/prometheus/node-exporter, must exist)")
    try:
        write_atomically(textfile, (exposition(data) + "\n").encode())
    except OSError as exc:
        app.abort(f"cannot write {textfile}: {exc.strerror or exc}")
    app.status(f"metrics written to {textfile}")
