"""The daemon's one seam to the self-balloon service (package ``xentmem_selfballoon``).

Everything the daemon asks of the balloon loops goes through :class:`BalloonHooks`: the
listener to hang on the shim (the loops start lazily with a backend and stop before it goes),
the knobs (declared params, read, set all-or-nothing), the figures and decision history for
``status``/``balloon``/metrics, and a bounded stop for shutdown.  :func:`make_balloon` wires
the real :class:`~xentmem_selfballoon.service.SelfballoonService`, with a xenstore publisher
for the guest's view when there is a xenstore (:mod:`.publish`); if that package is missing
the daemon runs without loops (:class:`NoBalloon`) and says so, rather than not starting.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from xentmem.clock import Clock
from xentmem.guestd.publish import XenstorePublisher, xenstore_publisher
from xentmem.params import ParamSet
from xentmem.roots import Roots

log = logging.getLogger(__name__)

DEFAULT_HISTORY_LIMIT = 20


class BalloonHooks(Protocol):
    """What the daemon needs from the self-balloon service."""

    available: bool
    #: The shim listener (``backend_loaded`` / ``backend_unloading``), or None.
    listener: Any
    knob_params: ParamSet

    def describe_knobs(self) -> list[dict[str, Any]]: ...

    def get_knob(self, name: str) -> Any: ...

    def update_knobs(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Set knobs all-or-nothing (ParamError changes nothing); the typed values set."""
        ...

    def status(self, limit: int = DEFAULT_HISTORY_LIMIT) -> dict[str, Any]: ...

    def figures(self) -> dict[str, Any]:
        """Numbers for metrics: running, report_only, the last decision, loop counters."""
        ...

    def stop(self, timeout_s: float) -> bool: ...


class NoBalloon:
    """No self-balloon package installed: no knobs, no loops, and a reason to show."""

    available = False
    listener = None
    knob_params = ParamSet()

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def describe_knobs(self) -> list[dict[str, Any]]:
        return []

    def get_knob(self, name: str) -> Any:
        return self.knob_params.lookup(name, owner="selfballoon")

    def update_knobs(self, values: Mapping[str, Any]) -> dict[str, Any]:
        for name in values:
            self.knob_params.lookup(name, owner="selfballoon")
        return {}

    def status(self, limit: int = DEFAULT_HISTORY_LIMIT) -> dict[str, Any]:
        return {"available": False, "running": False, "not_running_because": self.reason,
                "figures": {}, "history": []}

    def figures(self) -> dict[str, Any]:
        return {"running": False}

    def stop(self, timeout_s: float) -> bool:
        return True


class SelfballoonHooks:
    """The real service behind :class:`BalloonHooks`."""

    available = True

    def __init__(self, service: Any, publisher: XenstorePublisher | None = None) -> None:
        self._service = service
        self._publisher = publisher
        self.listener = service
        self.knob_params = service.knobs.params

    def describe_knobs(self) -> list[dict[str, Any]]:
        return self._service.knobs.describe()

    def get_knob(self, name: str) -> Any:
        return self._service.knobs.get(name)

    def update_knobs(self, values: Mapping[str, Any]) -> dict[str, Any]:
        snapshot = self._service.knobs.update(dict(values))
        return {name: getattr(snapshot, name) for name in values}

    def status(self, limit: int = DEFAULT_HISTORY_LIMIT) -> dict[str, Any]:
        status = dict(self._service.status())
        history = status.pop("history", [])
        last = status.get("last") or {}
        status.update({
            "available": True,
            "figures": _figures_of(last),
            "history": history[-limit:] if limit > 0 else [],
        })
        return status

    def figures(self) -> dict[str, Any]:
        status = self._service.status()
        figures = _figures_of(status.get("last") or {})
        figures.update({
            "running": bool(status.get("running")),
            "report_only": status.get("report_only"),
            "counters": dict(status.get("counters") or {}),
        })
        return figures

    def stop(self, timeout_s: float) -> bool:
        stopped = bool(self._service.stop(timeout_s))
        if self._publisher is not None:
            self._publisher.close()  # reopened by the next write, should the loops restart
        return stopped


def _figures_of(last: Mapping[str, Any]) -> dict[str, Any]:
    """The balloon figures of the last tick record (empty before the first tick)."""
    decision = last.get("balloon") or {}
    figures = {k: decision[k] for k in ("cur_pages", "committed_pages", "goal_pages",
                                         "floor_pages", "floor_rule", "target_pages",
                                         "frontswap_pages", "reserved_mb", "target_kb")
               if k in decision}
    if last:
        figures["written"] = bool(last.get("written"))
        figures["time"] = last.get("time")
    return figures


def make_balloon(roots: Roots, clock: Clock, knobs: Mapping[str, Any]) -> BalloonHooks:
    """The self-balloon service with the configured knobs, or :class:`NoBalloon`."""
    try:
        from xentmem_selfballoon.knobs import KnobStore
        from xentmem_selfballoon.service import SelfballoonService
    except ImportError as exc:
        reason = f"the selfballoon package is not installed ({exc})"
        log.warning("selfballoon: %s; running without the balloon loops", reason)
        return NoBalloon(reason)
    publisher = xenstore_publisher(roots, clock)
    service = SelfballoonService(knobs=KnobStore(dict(knobs)), clock=clock, roots=roots,
                                 publisher=publisher)
    return SelfballoonHooks(service, publisher)


def knob_params() -> ParamSet:
    """The knobs' declarations (for checking a config before anything starts)."""
    try:
        from xentmem_selfballoon.knobs import SELFBALLOON_PARAMS
    except ImportError:
        return ParamSet()
    return SELFBALLOON_PARAMS
