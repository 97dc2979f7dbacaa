"""Lazy start: the worker runs while a tmem backend is loaded and the flags allow it.

A listener of the shim, applying ``xen_selfballoon_init``'s rules on ``backend_loaded``
(nothing in dom0, nothing if both flags are off) and stopping the worker before the backend
goes.  What the daemon reads (knobs, status, figures) is here too.  The rules and where they
differ from the kernel: docs/selfballoon.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from xentmem.clock import Clock, SystemClock
from xentmem.roots import Roots
from xentmem_selfballoon.actuator import FrontswapControl, Publisher
from xentmem_selfballoon.inputs import InputError, is_control_domain, read_meminfo
from xentmem_selfballoon.knobs import KnobStore
from xentmem_selfballoon.loop import DEFAULT_HISTORY, SelfballoonLoop, TickRecord
from xentmem_selfballoon.policy import auto_reserved_mb

log = logging.getLogger(__name__)

#: Knob -> the shim's flag that sets it at each load (tmem.c passes its ``selfballooning``
#: and ``selfshrinking`` to ``xen_selfballoon_init``).  A config cannot set these knobs:
#: the flag is their load-time value.
LOAD_FLAGS = {"selfballooning": "selfballooning_at_load",
              "frontswap_selfshrinking": "selfshrinking"}

DEFAULT_JOIN_TIMEOUT_S = 5.0
_real_clock = SystemClock()


class ShimLike(Protocol):
    """What the service needs from ``xentmem.guest.shim.Shim``."""

    @property
    def flags(self) -> Mapping[str, Any]: ...

    @property
    def frontswap(self) -> FrontswapControl: ...

    @property
    def roots(self) -> Roots: ...


class SelfballoonService:
    """Starts and stops the self-balloon worker with the shim's backend."""

    def __init__(
        self,
        *,
        knobs: KnobStore | None = None,
        clock: Clock | None = None,
        publisher: Publisher | None = None,
        roots: Roots | None = None,
        history_len: int = DEFAULT_HISTORY,
        join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S,
        logger: logging.Logger | None = None,
    ) -> None:
        self._knobs = knobs or KnobStore()
        self._clock = clock or SystemClock()
        self._publisher = publisher
        self._roots = roots  # overrides shim.roots when given
        self._history_len = history_len
        self._join_timeout_s = join_timeout_s
        self._log = logger or log
        self._lock = threading.Lock()
        self._loop: SelfballoonLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._why_not: str | None = "no backend loaded"
        #: ``reserved_mb``'s automatic value, measured at the first start only.
        self._auto_reserved_mb: int | None = None
        #: Workers told to stop that were still in a tick when a new one started.
        self._retired: list[threading.Thread] = []

    # -- shim listener -----------------------------------------------------------------------------

    def backend_loaded(self, shim: ShimLike) -> None:
        """Start the worker if the flags allow it (``xen_selfballoon_init``)."""
        roots = self._roots or shim.roots
        flags = shim.flags
        balloon_on = bool(flags.get(LOAD_FLAGS["selfballooning"], False))
        shrink_on = bool(flags.get(LOAD_FLAGS["frontswap_selfshrinking"], False))
        reason = None
        try:
            if is_control_domain(roots):
                reason = "disabled for domain0"
        except InputError as exc:
            reason = f"cannot tell whether this is dom0: {exc}"
        if reason is None and not (balloon_on or shrink_on):
            reason = "selfballooning_at_load and selfshrinking flags are off"
            if not flags.get("frontswap", False):  # the shim's load switched both off
                reason += " (frontswap is off: no point driving pages to swap)"
        if reason is not None:
            self._refuse(reason)
            return
        self.start(roots=roots, frontswap=shim.frontswap, selfballooning=balloon_on,
                   selfshrinking=shrink_on)

    def backend_unloading(self, shim: ShimLike) -> None:
        """Stop the worker before the backend goes (a worker still in its tick says so)."""
        if self.stop():
            self._why_not = "no backend loaded"

    # -- start / stop ------------------------------------------------------------------------------

    def start(
        self,
        *,
        roots: Roots,
        frontswap: FrontswapControl | None,
        selfballooning: bool,
        selfshrinking: bool,
    ) -> bool:
        """Start the worker thread; False (and logged) if it could not start.

        ``selfballooning`` / ``selfshrinking`` say whether the shim's flags allow each job.
        """
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                if not self._stop.is_set():
                    self._log.info("selfballoon: already running")
                    return True
                self._retire_locked(self._thread)
            if self._auto_reserved_mb is None:
                # xen_selfballoon_init, once per boot: the RAM ballooned down since would
                # shrink the reserve at each load.
                try:
                    totalram = read_meminfo(roots).totalram_pages
                except InputError as exc:
                    self._refuse_locked(f"cannot measure RAM for reserved_mb: {exc}")
                    return False
                self._auto_reserved_mb = auto_reserved_mb(totalram)
                self._knobs.set_auto_reserved_mb(self._auto_reserved_mb)
            # xen_selfballoon_init(): each job's knob takes its flag's value at every load.
            self._knobs.update({"selfballooning": selfballooning,
                                "frontswap_selfshrinking": selfshrinking})
            loop = SelfballoonLoop(
                roots,
                self._knobs,
                clock=self._clock,
                frontswap=frontswap,
                publisher=self._publisher,
                history_len=self._history_len,
                logger=self._log,
            )
            stop = threading.Event()
            thread = threading.Thread(
                target=self._run, args=(loop, stop), name="xentmem-selfballoon", daemon=True
            )
            self._loop, self._stop, self._thread = loop, stop, thread
            self._why_not = None
            knobs = self._knobs.snapshot()
            if knobs.selfballooning:
                self._log.info("selfballoon: initializing selfballooning (reserved_mb %s)",
                               self._knobs.show("selfballoon_reserved_mb"))
            if knobs.frontswap_selfshrinking:
                self._log.info("selfballoon: initializing frontswap selfshrinking")
            thread.start()
            return True

    def _retire_locked(self, thread: threading.Thread) -> None:
        """A worker told to stop that has not yet: give it one bounded join, then let it
        finish its tick beside the new one (its stop event is set, so it ends after that
        tick).  Waiting for it without a bound would leave no loop at all if it never does."""
        thread.join(self._join_timeout_s)
        if thread.is_alive():
            self._log.warning("selfballoon: the previous worker is still finishing a tick; "
                              "starting a new one, the old one ends after that tick")
            self._retired.append(thread)
        self._thread = None

    def _run(self, loop: SelfballoonLoop, stop: threading.Event) -> None:
        try:
            loop.run(stop)
        except Exception:  # the loop catches per tick; this is a bug in the loop itself
            self._log.exception("selfballoon: worker died")
            self._why_not = "worker died (see log)"

    def stop(self, timeout_s: float | None = None) -> bool:
        """Stop and join the worker (and any retired one); True if every worker is gone.

        On a timeout the worker is kept, told to stop: :attr:`running` is False from now
        on, and a later :meth:`start` or :meth:`stop` joins it again.  The publisher's
        connection is closed either way (the next write opens it again).
        """
        try:
            return self._stop_workers(timeout_s)
        finally:
            if self._publisher is not None:
                self._publisher.close()

    def _stop_workers(self, timeout_s: float | None) -> bool:
        budget = self._join_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            self._stop.set()
            deadline = self._clock_now() + budget
            for old in list(self._retired):
                old.join(max(0.0, deadline - self._clock_now()))
                if not old.is_alive():
                    self._retired.remove(old)
            thread = self._thread
            if thread is None:
                return not self._retired
            thread.join(max(0.0, deadline - self._clock_now()))
            if thread.is_alive() or self._retired:
                self._why_not = "stopping: the worker has not finished its tick yet"
                self._log.error("selfballoon: worker did not stop within the timeout")
                return False
            self._thread = None
            self._why_not = "stopped"
            self._log.info("selfballoon: stopped")
            return True

    @staticmethod
    def _clock_now() -> float:
        """Real time for joins: the injected clock may be a fake one that never moves."""
        return _real_clock.monotonic()

    def _refuse(self, reason: str) -> None:
        with self._lock:
            self._refuse_locked(reason)

    def _refuse_locked(self, reason: str) -> None:
        self._why_not = reason
        self._log.info("selfballoon: not started: %s", reason)

    # -- what the daemon reads -------------------------------------------------------------

    @property
    def knobs(self) -> KnobStore:
        return self._knobs

    @property
    def running(self) -> bool:
        """A worker is alive and has not been told to stop."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stop.is_set()

    @property
    def loop(self) -> SelfballoonLoop | None:
        """The current (or last) worker, for its history and counters."""
        return self._loop

    def running_jobs(self) -> tuple[str, ...]:
        """The kernel's jobs that are on: ``selfballooning``, ``frontswap_selfshrinking``."""
        if not self.running:
            return ()
        knobs = self._knobs.snapshot()
        jobs = []
        if knobs.selfballooning:
            jobs.append("selfballooning")
        if knobs.frontswap_selfshrinking:
            jobs.append("frontswap_selfshrinking")
        return tuple(jobs)

    def history(self) -> tuple[TickRecord, ...]:
        loop = self._loop
        return loop.history() if loop is not None else ()

    def last(self) -> TickRecord | None:
        loop = self._loop
        return loop.last() if loop is not None else None

    def status(self, limit: int | None = None) -> dict[str, Any]:
        """A plain dict for ``xentmem balloon``: state, knobs, the balloon figures of the
        last tick and the last ``limit`` tick records (None: all that are kept)."""
        loop = self._loop
        last = self.last()
        history = [r.as_dict() for r in self.history()]
        if limit is not None:
            history = history[-limit:] if limit > 0 else []
        return {
            "running": self.running,
            "jobs": list(self.running_jobs()),
            "not_running_because": None if self.running else self._why_not,
            "report_only": loop.actuator.report_only if loop is not None else None,
            "knobs": {name: self._knobs.show(name) for name in self._knobs.params},
            "last": last.as_dict() if last is not None else None,
            "counters": loop.counters() if loop is not None else {},
            "figures": _figures_of(last),
            "history": history,
        }

    def figures(self) -> dict[str, Any]:
        """Numbers for metrics: running, report_only, the last decision, loop counters."""
        loop = self._loop
        figures = _figures_of(self.last())
        figures.update({
            "running": self.running,
            "report_only": loop.actuator.report_only if loop is not None else None,
            "counters": loop.counters() if loop is not None else {},
        })
        return figures


_FIGURES = ("cur_pages", "committed_pages", "goal_pages", "floor_pages", "floor_rule",
            "target_pages", "frontswap_pages", "reserved_mb", "target_kb")


def _figures_of(last: TickRecord | None) -> dict[str, Any]:
    """The balloon figures of a tick record (empty before the first tick)."""
    if last is None:
        return {}
    decision = last.balloon.as_dict() if last.balloon is not None else {}
    figures = {k: decision[k] for k in _FIGURES if k in decision}
    figures["written"] = last.written
    figures["time"] = last.time
    return figures
