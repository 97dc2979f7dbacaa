"""``xentmem status``: the daemon at a glance (backend and why, flags, frontends, balloon)."""

from __future__ import annotations

from typing import Any

import click

from xentmem_cli import render
from xentmem_cli.app import App, json_option

#: Parts of ``status["balloon"]`` the text leaves to ``xentmem balloon`` (--json keeps them).
BALLOON_DETAIL = ("history", "last")


def status_text(data: dict[str, Any]) -> str:
    """The whole status, except the balloon's decision log, which has its own command."""
    shown = dict(data)
    balloon = shown.get("balloon")
    if isinstance(balloon, dict):
        shown["balloon"] = {k: v for k, v in balloon.items() if k not in BALLOON_DETAIL}
        if any(balloon.get(k) for k in BALLOON_DETAIL):
            shown["balloon"]["decisions"] = "see `xentmem balloon`"
    return render.tree(shown)


@click.command()
@json_option
@click.pass_obj
def status(app: App, *, as_json: bool) -> None:
    """Show the daemon, its backend (and why it was chosen), the flags and the frontends.

    The balloon's recent decisions are left to `xentmem balloon`; --json includes them.
    """
    data = app.call("status")
    app.emit(data, as_json=as_json, render=status_text)
