"""What every console script of the project does the same way (all of them are click).

- Output: stdout is data only.  ``--json`` (:func:`json_option`) prints the same data the text
  shows as one compact JSON document on one line (:func:`emit`); notes for a human go to
  stderr (:func:`note`).
- Failure: :func:`abort`, one line ``PROG: error: MESSAGE`` on stderr, never a traceback.
- Exit codes, one table for ``xentmem``, ``xentmemd``, ``xentmem-hostd`` and the stand-in
  xenstored: :data:`EXIT_OK`, :data:`EXIT_FAILURE`, :data:`EXIT_USAGE`,
  :data:`EXIT_UNREACHABLE`, :data:`EXIT_CONFIG`; and ``xentmem run``'s
  :data:`EXIT_SIGNAL_BASE` + N.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, NoReturn

import click

#: Done.
EXIT_OK = 0
#: Refused or failed (a daemon said no, a start failed, a daemon stopped unclean).
EXIT_FAILURE = 1
#: Usage error: a bad option or argument (click's own code).
EXIT_USAGE = 2
#: The daemon to talk to cannot be reached (not running, wrong socket, no permission, silent).
EXIT_UNREACHABLE = 3
#: The configuration is refused (sysexits.h EX_CONFIG): a unit can say
#: ``RestartPreventExitStatus=78``, since restarting cannot help.
EXIT_CONFIG = 78
#: ``xentmem run`` only: xentmemd was killed by signal N, and ``run`` exits 128+N, as a shell
#: reports such a child, so a supervisor (or a script) can tell which signal it was.
EXIT_SIGNAL_BASE = 128

#: Every script's click context: ``-h`` as well as ``--help``, and a readable width.
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"],
                                    "max_content_width": 100}


class Seconds(click.FloatRange):
    """A duration in seconds for an option: a finite number within the range (click's
    ``FloatRange`` lets ``nan`` and ``inf`` through, which no timeout or sleep takes)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return seconds


def program_name() -> str:
    """The running script's name (its root command's), for the start of an error line."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return "xentmem"
    root = ctx.find_root()
    return root.command.name or root.info_name or "xentmem"


def abort(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """One line on stderr, then exit with ``code``: the only way a command fails."""
    click.echo(f"{program_name()}: error: {message}", err=True)
    raise click.exceptions.Exit(code)


def note(message: str) -> None:
    """Progress and notes for a human: stderr, so stdout stays pure data."""
    click.echo(message, err=True)


def to_json(data: Any) -> str:
    """The one JSON form of a result: compact, keys sorted, one line."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def emit(data: Any, *, as_json: bool, render: Callable[[Any], str]) -> None:
    """Print ``data`` to stdout: as one line of JSON, or through ``render`` as text."""
    if as_json:
        click.echo(to_json(data))
        return
    text = render(data)
    if text:
        click.echo(text)


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """``--json``: the same data the text shows, as one line of JSON (flag ``as_json``)."""
    return click.option(
        "--json", "as_json", is_flag=True,
        help="Print the result as one line of JSON (the same data the text shows).",
    )(function)
