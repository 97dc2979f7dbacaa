"""``xentmem balloon plot``: goal, target, current size, floor and frontswap over time, drawn.

One column per run (a recording; or a simulated trace under the kernel policy and under the
pressure guard, side by side), memory above in MiB, the guest's memory stall below in
percent, time in seconds, the knob values in the title.  matplotlib is an optional extra
(``pip install 'xentmem[plot]'``); it is imported only here, when a plot is drawn, and
without pyplot's global state.  Each series keeps one colour (:data:`COLOURS`), so a test can
find it in the image.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xentmem.files import write_atomically
from xentmem_cli.balloon_record import series_of

PAGES_PER_MIB = 256
#: The balloon's current size follows the target closely: drawn wide, under the target.
CURRENT_WIDTH = 4.0
#: Characters of knob values per title line, per column of the figure.
TITLE_CHARS_PER_COLUMN = 100
FORMATS = ("png", "svg")
#: Pixels per inch of a PNG: a one-column figure is 700 x 660 pixels.
DEFAULT_DPI = 100
INSTALL_HINT = "pip install 'xentmem[plot]'"

#: Series -> colour (matplotlib's tab10, as hex so tests can look for the exact pixels).
COLOURS = {
    "committed": "#8c564b",
    "goal": "#1f77b4",
    "target": "#d62728",
    "current": "#2ca02c",
    "floor": "#9467bd",
    "frontswap": "#ff7f0e",
    "stall": "#e377c2",
}
#: Series drawn from a decision record: name -> where in it.
DECISION_SERIES: dict[str, tuple[str, ...]] = {
    "goal": ("balloon", "goal_pages"),
    "target": ("balloon", "target_pages"),
    "current": ("balloon", "cur_pages"),
    "floor": ("balloon", "floor_pages"),
    "frontswap": ("balloon", "frontswap_pages"),
    "committed": ("balloon", "committed_pages"),
}
#: The knobs shown in the title, with short names (the prefix every one has is dropped).
TITLE_KNOBS = (
    ("selfballoon_interval", "interval", "s"),
    ("selfballoon_downhysteresis", "downhysteresis", ""),
    ("selfballoon_uphysteresis", "uphysteresis", ""),
    ("selfballoon_min_usable_mb", "min_usable_mb", ""),
    ("selfballoon_reserved_mb", "reserved_mb", ""),
    ("frontswap_hysteresis", "frontswap_hysteresis", ""),
    ("frontswap_inertia", "frontswap_inertia", ""),
    ("pressure_guard_stall_us_per_s", "guard stall", " us/s"),
    ("pressure_guard_poll_ms", "guard poll", " ms"),
)


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed: the message says how to get it."""


@dataclass
class Model:
    """What a simulation knows beyond the loop's records, sampled after every wait."""

    times: list[float] = field(default_factory=list)
    committed_pages: list[int] = field(default_factory=list)
    totalram_pages: list[int] = field(default_factory=list)
    stall_fraction: list[float] = field(default_factory=list)


@dataclass
class Panel:
    """One column of the figure: a run's decision records and, simulated, its model."""

    title: str
    records: list[dict[str, Any]]
    model: Model | None = None
    start: float = 0.0  # the time that is 0 s on the axis


def knobs_line(knobs: Mapping[str, Any]) -> str:
    """The knob values for a title: ``interval=5s downhysteresis=8 ...``."""
    parts = [f"{short}={knobs[name]}{unit}".replace(" ", "\u00a0")
             for name, short, unit in TITLE_KNOBS if knobs.get(name) is not None]
    return " ".join(parts)


def _mib(values: Sequence[Any]) -> list[float]:
    return [v / PAGES_PER_MIB if isinstance(v, (int, float)) else float("nan") for v in values]


def _figure_modules() -> tuple[Any, Any]:
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise PlotUnavailable(f"plotting needs matplotlib, which is not installed "
                              f"({exc}); install it with {INSTALL_HINT}") from None
    return Figure, MaxNLocator


def draw(panels: Sequence[Panel], title: str, knobs: Mapping[str, Any], *,
         dpi: int = DEFAULT_DPI) -> Any:
    """The figure (a matplotlib ``Figure``) of ``panels``; raises :class:`PlotUnavailable`."""
    Figure, MaxNLocator = _figure_modules()
    n = len(panels)
    fig = Figure(figsize=(6.4 * n + 0.6, 6.6), dpi=dpi, layout="constrained")
    grid = fig.add_gridspec(2, n, height_ratios=(3, 1))
    memory_axes: list[Any] = []
    for col, panel in enumerate(panels):
        share = memory_axes[0] if memory_axes else None
        ax = fig.add_subplot(grid[0, col], sharey=share)
        stall_ax = fig.add_subplot(grid[1, col], sharex=ax)
        memory_axes.append(ax)
        _draw_panel(ax, stall_ax, panel)
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel("MiB" if col == 0 else "")
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelbottom=False)
        stall_ax.set_ylim(0, 100)
        stall_ax.set_ylabel("stall (%)" if col == 0 else "")
        stall_ax.set_xlabel("time (s)")
        stall_ax.grid(True, alpha=0.3)
    memory_axes[0].set_ylim(bottom=0)
    legend: dict[str, Any] = {}  # every series of every column, once (a column may lack one)
    for ax in memory_axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    memory_axes[0].legend(list(legend.values()), list(legend), loc="upper left", fontsize=8,
                          ncol=2, framealpha=0.9)
    knob_lines = textwrap.wrap(knobs_line(knobs), TITLE_CHARS_PER_COLUMN * n,
                               break_on_hyphens=False)
    fig.suptitle("\n".join([title, *knob_lines]), fontsize=10)
    return fig


def _draw_panel(ax: Any, stall_ax: Any, panel: Panel) -> None:
    records = [r for r in panel.records if isinstance(r.get("balloon"), dict)]
    t = [float(r["time"]) - panel.start for r in records]
    model = panel.model
    if model is not None:
        mt = [x - panel.start for x in model.times]
        ax.plot(mt, _mib(model.committed_pages), color=COLOURS["committed"], lw=1.2,
                ls="--", label="committed")
        ax.plot(mt, _mib(model.totalram_pages), color=COLOURS["current"], lw=CURRENT_WIDTH,
                label="current")
        stall = [f * 100 for f in model.stall_fraction]
        stall_ax.fill_between(mt, stall, step="post", color=COLOURS["stall"], alpha=0.3, lw=0)
        stall_ax.plot(mt, stall, color=COLOURS["stall"], lw=1.5, drawstyle="steps-post",
                      label="stall")
    else:
        ax.plot(t, _mib(series_of(records, DECISION_SERIES["committed"])),
                color=COLOURS["committed"], lw=1.2, ls="--", label="committed")
        ax.plot(t, _mib(series_of(records, DECISION_SERIES["current"])),
                color=COLOURS["current"], lw=CURRENT_WIDTH, label="current")
        stall = [p.get("stall_us_per_s") / 1e4 if isinstance(p, dict) and p.get("known")
                 else float("nan") for p in series_of(records, ("pressure",))]
        stall_ax.plot(t, stall, color=COLOURS["stall"], lw=2, drawstyle="steps-post",
                      label="stall")
    for name in ("goal", "target", "floor", "frontswap"):
        style = "steps-post" if name == "target" else "default"
        ax.plot(t, _mib(series_of(records, DECISION_SERIES[name])), color=COLOURS[name],
                lw=1.5, drawstyle=style, label=name, ls=":" if name == "floor" else "-")
    guarded = [(x, r["balloon"]["target_pages"]) for x, r in zip(t, records)
               if r["balloon"].get("guarded")]
    if guarded:
        ax.plot([x for x, _ in guarded], _mib([p for _, p in guarded]), ls="none",
                marker="^", ms=5, color=COLOURS["target"], label="guard acted")


def save(fig: Any, path: Path, fmt: str) -> int:
    """Write the figure to ``path`` at once (a reader never sees half a file); its size."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt)
    data = buffer.getvalue()
    write_atomically(path, data)
    return len(data)


def format_of(path: Path, given: str | None) -> str:
    """The image format: as given, else the file's suffix; ValueError if neither is known."""
    fmt = (given or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"cannot tell the image format of {str(path)!r}: "
                         f"name it .png or .svg, or give --format")
    return fmt
