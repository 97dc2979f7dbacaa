"""A small chart of the last balloon decisions for a terminal: one column per decision.

``xentmem balloon`` draws it instead of the history table when stdout is a terminal.  Pure
text, no dependency: each series is a letter (goal ``G``, target ``T``, current ``C``, floor
``F``, frontswap ``S``), drawn in that order of precedence where two share a cell, coloured
when the terminal takes colour.  The y axis is in MiB.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

from xentmem_cli.balloon_record import series_of

PAGES_PER_MIB = 256
DEFAULT_HEIGHT = 8
DEFAULT_WIDTH = 60

#: (letter, label, where in a record, colour): the first listed wins a shared cell.
SERIES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("T", "target", ("balloon", "target_pages"), "red"),
    ("C", "current", ("balloon", "cur_pages"), "green"),
    ("G", "goal", ("balloon", "goal_pages"), "blue"),
    ("F", "floor", ("balloon", "floor_pages"), "magenta"),
    ("S", "frontswap", ("balloon", "frontswap_pages"), "yellow"),
)

Style = Callable[[str, str], str]


def plain(text: str, colour: str) -> str:
    return text


def chart(
    history: Sequence[dict[str, Any]],
    *,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
    style: Style = plain,
) -> str:
    """The decisions of ``history`` (oldest first; the last ``width`` of them) as a chart."""
    records = [r for r in history if isinstance(r.get("balloon"), dict)][-width:]
    if not records:
        return "(no balloon decision yet)"
    columns = {letter: [_mib(v) for v in series_of(records, path)]
               for letter, _, path, _ in SERIES}
    values = [v for column in columns.values() for v in column if v is not None]
    low, high = min(values), max(values)
    span = high - low or 1.0
    grid = [[" "] * len(records) for _ in range(height)]
    for letter, _, _, _ in reversed(SERIES):  # the first listed is drawn last, on top
        for x, value in enumerate(columns[letter]):
            if value is not None:
                row = round((value - low) / span * (height - 1))
                grid[height - 1 - row][x] = letter
    colours = {letter: colour for letter, _, _, colour in SERIES}
    label_width = max(len(f"{high:.0f}"), len(f"{low:.0f}"))
    lines = []
    for i, cells in enumerate(grid):
        level = high - span * i / (height - 1) if height > 1 else high
        label = f"{level:.0f}" if i in (0, height - 1) else ""
        body = "".join(style(c, colours[c]) if c != " " else c for c in cells).rstrip()
        axis = "┤" if label else "│"
        lines.append(f"{label.rjust(label_width)} {axis}{body}")
    lines.append(" " * label_width + " └" + "─" * len(records))
    first, last = records[0], records[-1]
    seconds = float(last.get("time") or 0) - float(first.get("time") or 0)
    lines.append(" " * (label_width + 2)
                 + f"MiB; seq {first.get('seq')}..{last.get('seq')}, {seconds:.0f} s")
    lines.append(" " * (label_width + 2) + "  ".join(
        f"{style(letter, colour)} {label}" for letter, label, _, colour in SERIES))
    return "\n".join(lines)


def _mib(pages: Any) -> float | None:
    return pages / PAGES_PER_MIB if isinstance(pages, (int, float)) else None
