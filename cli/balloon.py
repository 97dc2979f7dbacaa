"""``xentmem balloon``: the self-balloon's goal, target and floor, and its last decisions."""

from __future__ import annotations

from typing import Any

import click

from xentmem_cli import render
from xentmem_cli.app import App, json_option

DEFAULT_HISTORY = 20
#: The history table: (header, where in a decision record).  The rest is in --json.
HISTORY_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("seq", ("seq",)),
    ("time", ("time",)),
    ("kind", ("kind",)),
    ("cur_pages", ("balloon", "cur_pages")),
    ("goal_pages", ("balloon", "goal_pages")),
    ("floor_pages", ("balloon", "floor_pages")),
    ("target_kb", ("target_kb",)),
    ("written", ("written",)),
    ("shrink", ("shrink", "reason")),
    ("error", ("error",)),
)


def pick(record: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(record, dict):
            return None
        record = record.get(key)
    return record


def history_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{name: pick(record, path) for name, path in HISTORY_COLUMNS} for record in history]


def balloon_text(data: dict[str, Any]) -> str:
    """Figures, knobs and counters as a tree; the decisions as one table, oldest first.

    ``last`` is the newest decision again, so the text does not repeat it.
    """
    summary = {k: v for k, v in data.items() if k not in ("history", "last")}
    text = render.tree(summary)
    history = data.get("history") or []
    if history:
        names = [name for name, _ in HISTORY_COLUMNS]
        table = render.table(history_rows(history), names, indent=render.INDENT)
        text += "\nhistory (oldest first):\n" + table
    return text


@click.command()
@click.option("-n", "--history", "limit", type=click.IntRange(min=0), default=DEFAULT_HISTORY,
              show_default=True, help="How many of the last decisions to show.")
@json_option
@click.pass_obj
def balloon(app: App, *, limit: int, as_json: bool) -> None:
    """Show the balloon figures (current, goal, target, floor) and the recent decisions."""
    data = app.call("balloon", limit=limit)
    app.emit(data, as_json=as_json, render=balloon_text)
