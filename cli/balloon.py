"""``xentmem balloon``: the self-balloon's goal, target and floor, and its last decisions.

``xentmem balloon record`` writes the live loop's decisions as JSON lines and ``xentmem
balloon plot`` draws a recording, or a trace simulated under the kernel policy and the
pressure guard side by side (docs/selfballoon.md, "Recording and plotting").
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, TextIO

import click

from xentmem.clock import Clock, SystemClock
from xentmem.console import EXIT_FAILURE, Seconds
from xentmem.errors import ParamError
from xentmem_cli import balloon_chart, balloon_plot, render
from xentmem_cli.app import App, json_option
from xentmem_cli.balloon_record import (
    DEFAULT_POLL_S,
    Recorder,
    Recording,
    RecordingError,
    knob_values,
    parse_recording,
)

DEFAULT_HISTORY = 20
#: Asked of the daemon by a recording: more than it keeps, so every record it has.
RECORD_FETCH_LIMIT = 1_000_000
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


def balloon_text(data: dict[str, Any], *, chart: bool = False,
                 style: balloon_chart.Style = balloon_chart.plain) -> str:
    """Figures, knobs and counters as a tree; the decisions as one table, oldest first, or
    (``chart``) as a small chart of the balloon's sizes.

    ``last`` is the newest decision again, so the text does not repeat it.
    """
    summary = {k: v for k, v in data.items() if k not in ("history", "last")}
    text = render.tree(summary)
    history = data.get("history") or []
    if history and chart:
        text += "\nhistory (oldest first):\n" + balloon_chart.chart(history, style=style)
    elif history:
        names = [name for name, _ in HISTORY_COLUMNS]
        table = render.table(history_rows(history), names, indent=render.INDENT)
        text += "\nhistory (oldest first):\n" + table
    return text


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


@click.group(invoke_without_command=True)
@click.option("-n", "--history", "limit", type=click.IntRange(min=0), default=DEFAULT_HISTORY,
              show_default=True, help="How many of the last decisions to show.")
@click.option("--chart/--table", "as_chart", default=None,
              help="The decisions as a small chart or a table  [default: a chart on a "
                   "terminal]")
@json_option
@click.pass_context
def balloon(ctx: click.Context, *, limit: int, as_chart: bool | None, as_json: bool) -> None:
    """Show the balloon figures (current, goal, target, floor) and the recent decisions.

    `record` writes the decisions as they are made, `plot` draws them (or a simulation).
    """
    if ctx.invoked_subcommand is not None:
        return
    app: App = ctx.obj
    data = app.call("balloon", limit=limit)
    chart = _stdout_is_terminal() if as_chart is None else as_chart

    def text(result: dict[str, Any]) -> str:
        return balloon_text(result, chart=chart,
                            style=lambda s, colour: click.style(s, fg=colour))

    app.emit(data, as_json=as_json, render=text)


# -- record ------------------------------------------------------------------------------------


@balloon.command()
@click.option("-c", "--count", type=click.IntRange(min=1), default=None,
              help="Stop after this many decisions.")
@click.option("-d", "--duration", type=Seconds(min=0.0), default=None,
              metavar="SECONDS", help="Stop after this long.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              show_default=True, help="The JSON-lines file to write ('-': stdout).")
@click.option("--poll", type=Seconds(min=0.01), default=DEFAULT_POLL_S,
              show_default=True, metavar="SECONDS",
              help="How often to ask the daemon for new decisions.")
@click.option("--backlog", is_flag=True,
              help="Begin with the decisions the daemon still keeps.")
@click.pass_obj
def record(app: App, *, count: int | None, duration: float | None, output: str, poll: float,
           backlog: bool) -> None:
    """Record the balloon loop's decisions and inputs as JSON lines, until a count or a
    duration (or Ctrl-C).

    Each decision is one line as the daemon keeps it; a `knobs` line comes first and again
    whenever a knob changes, a `gap` line says how many decisions were dropped unseen.
    """
    if count is None and duration is None:
        raise click.UsageError("say when to stop: --count N and/or --duration SECONDS")
    run_recording(app, count=count, duration=duration, output=output, poll=poll,
                  backlog=backlog)


def run_recording(app: App, *, count: int | None, duration: float | None, output: str,
                  poll: float, backlog: bool, clock: Clock | None = None,
                  stop: threading.Event | None = None) -> None:
    """The command's body, with the clock and the stop event injectable for tests."""
    def fetch() -> dict[str, Any]:
        return app.call("balloon", limit=RECORD_FETCH_LIMIT)

    first = fetch()  # before the file is opened: an unreachable daemon leaves nothing behind
    stream: TextIO
    if output == "-":
        stream = sys.stdout
    else:
        try:
            stream = open(output, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            app.abort(f"cannot write {output}: {exc.strerror or exc}")

    def write(line: str) -> None:
        stream.write(line)
        stream.flush()  # a recording cut short is still whole lines

    recorder = Recorder(fetch, write, clock or SystemClock(), count=count, duration_s=duration,
                        poll_s=poll, backlog=backlog)
    if not first.get("running"):
        app.status(f"note: the balloon loop is not running "
                   f"({first.get('not_running_because') or 'no reason given'}); "
                   "recording what it decides once it runs")
    try:
        recorder.run(stop or threading.Event(), first=first)
    except KeyboardInterrupt:
        app.status("interrupted")
    finally:
        if output != "-":
            stream.close()
    done = recorder.summary
    where = "stdout" if output == "-" else output
    extra = f", {done.missed} dropped by the daemon before they were read" if done.missed else ""
    app.status(f"recorded {done.decisions} decision(s) to {where}{extra}")


# -- plot --------------------------------------------------------------------------------------


def _knob_option(ctx: click.Context, param: click.Parameter,
                 value: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in value:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", ctx=ctx, param=param)
        out[name.strip()] = text.strip()
    return out


@balloon.command()
@click.argument("recording", required=False,
                type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The image to write (.png or .svg).")
@click.option("--format", "fmt", type=click.Choice(balloon_plot.FORMATS), default=None,
              help="The image format  [default: the output's suffix]")
@click.option("--simulate", "simulated", is_flag=True,
              help="Replay the recording's committed memory under the kernel policy and the "
                   "pressure guard, side by side.")
@click.option("--trace", type=click.Choice(["steady", "ramp", "bursts"]), default=None,
              help="Simulate one of the simulator's traces instead of a recording.")
@click.option("--knob", "knobs", multiple=True, callback=_knob_option, metavar="NAME=VALUE",
              help="A knob for the simulation (repeatable; default: the recording's, else "
                   "the defaults).")
@click.option("--dpi", type=click.IntRange(min=20, max=600), default=balloon_plot.DEFAULT_DPI,
              show_default=True, help="Pixels per inch of a PNG (a column is 7 x 6.6 inches).")
@click.pass_obj
def plot(app: App, *, recording: str | None, output: str, fmt: str | None, simulated: bool,
         trace: str | None, knobs: dict[str, str], dpi: int) -> None:
    """Draw a recording, or a simulation of a recorded or synthetic trace, as PNG or SVG.

    Goal, target, current size, floor, frontswap and committed memory in MiB, the memory
    stall below, time in seconds.  Needs matplotlib: pip install 'xentmem[plot]'.
    """
    if (recording is None) == (trace is None):
        raise click.UsageError("give a RECORDING or --trace NAME (one of them)")
    if knobs and not (simulated or trace):
        raise click.UsageError("--knob applies to a simulation (--simulate or --trace)")
    path = Path(output)
    try:
        fmt = balloon_plot.format_of(path, fmt)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    recorded = _read_recording(app, recording) if recording is not None else None
    try:
        if simulated or trace:
            panels, title, shown = _simulation(app, recorded, trace, knobs)
        else:
            assert recorded is not None
            panels, title, shown = _recorded(app, recorded)
        figure = balloon_plot.draw(panels, title, shown, dpi=dpi)
        size = balloon_plot.save(figure, path, fmt)
    except balloon_plot.PlotUnavailable as exc:
        app.abort(str(exc), EXIT_FAILURE)
    except OSError as exc:
        app.abort(f"cannot write {output}: {exc.strerror or exc}")
    app.status(f"wrote {output} ({size // 1024 or 1} KiB, {fmt})")


def _read_recording(app: App, name: str) -> Recording:
    try:
        if name == "-":
            return parse_recording(sys.stdin, "stdin")
        with open(name, encoding="utf-8") as stream:
            return parse_recording(stream, name)
    except RecordingError as exc:
        app.abort(str(exc))
    except (OSError, UnicodeDecodeError) as exc:
        app.abort(f"cannot read {name}: {getattr(exc, 'strerror', None) or exc}")


def _recorded(app: App, recorded: Recording) -> tuple[list[Any], str, dict[str, Any]]:
    decisions = recorded.decisions()
    if not decisions:
        app.abort(f"{recorded.name} holds no balloon decision to draw")
    start = float(decisions[0]["time"])
    panel = balloon_plot.Panel(f"recorded: {len(decisions)} decisions", recorded.records,
                               start=start)
    return [panel], f"xentmem self-balloon, {recorded.name}", recorded.knobs


def _simulation(app: App, recorded: Recording | None, trace_name: str | None,
                knobs: dict[str, str]) -> tuple[list[Any], str, dict[str, Any]]:
    # The simulator is imported only here: plain `xentmem` commands never load it.
    from xentmem_cli import balloon_sim

    values = {**(knob_values(recorded.knobs) if recorded else {}), **knobs}
    values.pop("pressure_guard", None)  # the two columns set it
    try:
        shown = balloon_sim.check_knobs(values)
    except ParamError as exc:
        raise click.BadParameter(str(exc), param_hint="--knob") from None
    try:
        trace = (balloon_sim.TRACES[trace_name]() if trace_name
                 else balloon_sim.trace_of(recorded))  # type: ignore[arg-type]
    except ValueError as exc:
        app.abort(str(exc))
    panels = balloon_sim.simulate(trace, values, balloon_sim.spec_for(recorded))
    source = f"trace {trace.name!r}" if trace_name else f"the committed memory of {trace.name}"
    title = (f"xentmem self-balloon, simulated: {source} ({trace.duration_s:.0f} s), "
             "kernel policy vs pressure guard")
    return panels, title, shown
