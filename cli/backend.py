"""``xentmem backends | load | unload | reload``: which store provides tmem's memory.

``load BACKEND name=value ...`` is ``modprobe BACKEND name=value ...``: the words are module
params (the shim's flags such as ``frontswap=0`` included), checked by the daemon all
together before anything changes.  ``load auto`` picks ``xen`` on a Xen guest whose host
serves tmem, else ``zcache``, and says why.
"""

from __future__ import annotations

from typing import Any

import click
from click.shell_completion import CompletionItem

from xentmem.errors import ParamError
from xentmem.guest import registry
from xentmem.params import parse_assignments
from xentmem_cli import render
from xentmem_cli.app import App, json_option

AUTO = "auto"


def complete_backend(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """``auto`` and the backends installed here (the entry points the daemon also reads)."""
    names = [AUTO, *registry.available()]
    return [CompletionItem(name) for name in names if name.startswith(incomplete)]


def parse_param_words(
    ctx: click.Context, param: click.Parameter, words: tuple[str, ...]
) -> dict[str, str]:
    """``("capacity=64M", "frontswap=0")`` -> a dict, or a usage error naming the bad word."""
    try:
        return parse_assignments(words)
    except ParamError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.command()
@json_option
@click.pass_obj
def backends(app: App, *, as_json: bool) -> None:
    """List the backends installed, and which one is loaded."""
    records: list[dict[str, Any]] = app.call("backends")
    app.emit(records, as_json=as_json,
             render=lambda rows: render.table(rows, ("name", "loaded", "summary")))


@click.command()
@click.argument("backend", metavar="BACKEND", shell_complete=complete_backend)
@click.argument("assignments", nargs=-1, metavar="[NAME=VALUE]...",
                callback=parse_param_words)
@json_option
@click.pass_obj
def load(app: App, *, backend: str, assignments: dict[str, str], as_json: bool) -> None:
    """Load BACKEND (zcache, xen, auto, ...) with module params NAME=VALUE.

    \b
    Examples:
      xentmem load zcache capacity=64M
      xentmem load auto frontswap=0
    """
    args: dict[str, Any] = {"name": backend}
    if assignments:
        args["params"] = assignments
    app.expect_long_op()
    result = app.call("backend.load", **args)
    app.emit(result, as_json=as_json, render=render.tree)


@click.command()
@json_option
@click.pass_obj
def unload(app: App, *, as_json: bool) -> None:
    """Unload the backend: swap pages go back to their backing stores first.

    Refused (and nothing changes) if a page could not be brought back.  Waits up to 300 s
    (--timeout to change it): every swap page in tmem is copied back first.
    """
    app.expect_long_op()
    result = app.call("backend.unload")
    app.emit(result, as_json=as_json, render=render.tree)


@click.command()
@json_option
@click.pass_obj
def reload(app: App, *, as_json: bool) -> None:
    """Re-read the config file and apply what may change at run time (as SIGHUP does)."""
    result = app.call("config.reload")
    app.emit(result, as_json=as_json, render=render.tree)
