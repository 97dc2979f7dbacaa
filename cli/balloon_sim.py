"""A trace run through the simulator under the kernel policy and under the pressure guard.

The one CLI module that imports ``xentmem_selfballoon`` (docs/architecture.md): the real
loop runs against the model guest of ``simulate.py`` in this process, on a simulated clock,
so ``xentmem balloon plot`` can show what the guard would change without a daemon.  A trace
is one of the simulator's own or the committed memory of a recording.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Callable

from xentmem_cli.balloon_plot import Model, Panel
from xentmem_cli.balloon_record import Recording
from xentmem_selfballoon.knobs import KnobStore
from xentmem_selfballoon.simulate import (
    GuestSpec,
    ReplayResult,
    Trace,
    burst_trace,
    ramp_trace,
    replay,
    steady_trace,
)

TRACES: dict[str, Callable[[], Trace]] = {
    "steady": steady_trace,
    "ramp": ramp_trace,
    "bursts": burst_trace,
}
#: The two policies compared: (name, the knob that tells them apart).
POLICIES: tuple[tuple[str, dict[str, str]], ...] = (
    ("kernel policy", {"pressure_guard": "0"}),
    ("pressure guard", {"pressure_guard": "1"}),
)


def check_knobs(values: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs a simulation runs with, as a knob store shows them; ParamError if refused."""
    store = KnobStore(values)
    # ``show`` would add the automatic reserve in force: the simulation measures its own.
    return {name: "auto" if store.get(name) is None else store.show(name)
            for name in store.params}


def trace_of(recording: Recording) -> Trace:
    """The committed memory of a recording, from 0 s; ValueError with fewer than 2 points."""
    points: dict[float, int] = {}
    decisions = recording.decisions()
    if len(decisions) < 2:
        raise ValueError(f"{recording.name} has {len(decisions)} balloon decision(s); "
                         f"a trace needs at least 2")
    start = float(decisions[0]["time"])
    for record in decisions:
        committed = record["balloon"].get("committed_pages")
        if isinstance(committed, int) and committed >= 0:
            points[round(float(record["time"]) - start, 3)] = committed
    ordered = tuple(sorted(points.items()))
    if len(ordered) < 2 or ordered[0][0] != 0:
        raise ValueError(f"{recording.name} has no usable committed memory to replay")
    return Trace(recording.name, ordered)


def spec_for(recording: Recording | None) -> GuestSpec:
    """The simulator's 2 GiB guest, grown to the recorded guest's size when that is larger."""
    spec = GuestSpec()
    if recording is None:
        return spec
    sizes = [r["balloon"].get("cur_pages") for r in recording.decisions()]
    largest = max((s for s in sizes if isinstance(s, int)), default=0)
    static_max = largest + spec.kernel_reserved_pages
    return replace(spec, static_max_pages=static_max) if static_max > spec.static_max_pages \
        else spec


def simulate(trace: Trace, knobs: Mapping[str, Any],
             spec: GuestSpec | None = None) -> list[Panel]:
    """One panel per policy: the loop's records and the model guest, over the whole trace."""
    panels = []
    for name, override in POLICIES:
        result = replay(trace, {**knobs, **override}, policy=name, spec=spec, keep=True)
        panels.append(Panel(f"{name}: {_figures(result)}",
                            [r.as_dict() for r in result.history], _model(result)))
    return panels


def _figures(result: ReplayResult) -> str:
    m = result.metrics
    return (f"stall {m.stall_s:.0f} s, OOM risk {m.risk_s:.0f} s, "
            f"{m.returned_avg_mib:.0f} MiB returned on average")


def _model(result: ReplayResult) -> Model:
    model = Model()
    for sample in result.samples:
        model.times.append(sample.time_s)
        model.committed_pages.append(sample.committed_pages)
        model.totalram_pages.append(sample.totalram_pages)
        model.stall_fraction.append(sample.stall_fraction)
    return model
