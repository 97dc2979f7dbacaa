"""Turn the dicts the daemon answers with into text for a terminal.

Pure functions from data to a string: no click, no I/O, so a command builds one dict, prints
it as JSON with ``--json`` or through one of these, and the two can never disagree.

* :func:`scalar` spells one value (``None`` as ``-``, booleans as ``yes``/``no``, a list of
  plain values as ``a, b``).
* :func:`table` lays out a list of records as aligned columns under a header.
* :func:`tree` lays out a nested dict: its plain values as aligned ``key  value`` lines,
  then every nested dict or list of records as an indented section under its key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

INDENT = "  "
NONE_TEXT = "-"
EMPTY_TEXT = "(none)"


def scalar(value: Any) -> str:
    """One value as a table cell: compact, never multi-line."""
    if value is None:
        return NONE_TEXT
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)) and not any(
            isinstance(item, (Mapping, list, tuple)) for item in value):
        return ", ".join(scalar(item) for item in value) if value else EMPTY_TEXT
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    text = str(value)
    return " ".join(text.split()) if "\n" in text else text


def _is_records(value: Any) -> bool:
    """A non-empty list whose items are all dicts: shown as a table."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(item, Mapping) for item in value))


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key of every row, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    indent: str = "",
) -> str:
    """Aligned columns with an upper-case header; ``(none)`` for no rows."""
    if not rows:
        return indent + EMPTY_TEXT
    names = list(columns) if columns is not None else columns_of(rows)
    cells = [[scalar(row.get(name)) for name in names] for row in rows]
    header = [name.upper() for name in names]
    widths = [max(len(header[i]), *(len(line[i]) for line in cells)) for i in range(len(names))]

    def line(parts: Sequence[str]) -> str:
        padded = [part.ljust(width) for part, width in zip(parts, widths)]
        return (indent + "  ".join(padded)).rstrip()

    return "\n".join([line(header)] + [line(parts) for parts in cells])


def pairs(items: Sequence[tuple[str, Any]], *, indent: str = "") -> str:
    """``key  value`` lines with the values aligned."""
    if not items:
        return indent + EMPTY_TEXT
    width = max(len(key) for key, _ in items)
    return "\n".join(f"{indent}{key.ljust(width)}  {scalar(value)}".rstrip()
                     for key, value in items)


def tree(data: Mapping[str, Any], *, indent: str = "") -> str:
    """A nested dict: plain values first, then one indented section per nested value."""
    plain = [(str(k), v) for k, v in data.items()
             if not isinstance(v, Mapping) and not _is_records(v)]
    nested = [(str(k), v) for k, v in data.items()
              if isinstance(v, Mapping) or _is_records(v)]
    blocks: list[str] = []
    if plain:
        blocks.append(pairs(plain, indent=indent))
    for key, value in nested:
        inner = indent + INDENT
        if isinstance(value, Mapping):
            body = tree(value, indent=inner) if value else inner + EMPTY_TEXT
        else:
            body = table(value, indent=inner)
        blocks.append(f"{indent}{key}:\n{body}")
    if not blocks:
        return indent + EMPTY_TEXT
    return "\n".join(blocks)
