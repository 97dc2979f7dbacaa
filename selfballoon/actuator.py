"""Carrying decisions out: the balloon driver's ``target_kb`` and the guest's xenstore area.

A guest may not write its ``memory/target``, so its view for dom0 tools goes under its own
``data/selfballoon/`` through an injected :class:`Publisher`.  Without a balloon driver the
actuator is report-only: it publishes what it would set and writes nothing.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from xentmem.errors import XentmemError
from xentmem.roots import Roots
from xentmem_selfballoon.inputs import (
    InputError,
    balloon_target_path,
    has_balloon_driver,
    parse_kb,
    read_text,
)
from xentmem_selfballoon.policy import BalloonDecision, pages2kb
from xentmem_selfballoon.shrink import ShrinkDecision

log = logging.getLogger(__name__)

#: Relative xenstore paths resolve under the guest's own ``/local/domain/<domid>``.
PUBLISH_DIR = "data/selfballoon"


class ActuatorError(XentmemError):
    """Writing the balloon target failed; the tick counts as failed."""


class Publisher(Protocol):
    """Where the guest's view goes (a xenstore client in the daemon, a dict in tests)."""

    def write(self, path: str, value: str) -> None: ...

    def close(self) -> None:
        """Drop the connection while no worker runs; the next write opens it again."""
        ...


class FrontswapControl(Protocol):
    """The part of the shim's frontswap the loops use."""

    def curr_pages(self) -> int: ...

    def shrink(self, target_pages: int) -> object: ...


@dataclass(frozen=True)
class Applied:
    """What :meth:`BalloonActuator.apply` did."""

    target_kb: int  # the target in balloon terms (written, or what would have been)
    written: bool  # False in report-only mode
    published: bool


class BalloonActuator:
    """Writes balloon targets (or only reports them) and publishes the guest's view."""

    def __init__(
        self,
        roots: Roots,
        *,
        publisher: Publisher | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self._roots = roots
        self._publisher = publisher
        self._log = logger or log
        self._report_only_logged = False
        self._last_written_kb: int | None = None
        self.publish_errors = 0
        self.drifts = 0

    @property
    def target_path(self) -> Path:
        return balloon_target_path(self._roots)

    @property
    def report_only(self) -> bool:
        """True while there is no balloon driver to write to (checked every call)."""
        return not has_balloon_driver(self._roots)

    @property
    def last_written_kb(self) -> int | None:
        return self._last_written_kb

    def apply(self, decision: BalloonDecision) -> Applied:
        """Write ``decision.target_kb`` (unless report-only), then publish the guest's view."""
        target_kb = decision.target_kb
        if target_kb < 0:
            raise ActuatorError(f"refusing a negative balloon target ({target_kb} KiB)")
        written = False
        if self.report_only:
            if not self._report_only_logged:
                self._log.warning(
                    "selfballoon: no balloon driver (%s missing): report-only mode, targets "
                    "are computed and published but never written", self.target_path)
                self._report_only_logged = True
        else:
            if self._report_only_logged:
                self._log.info("selfballoon: balloon driver found, writing targets")
                self._report_only_logged = False
            self._check_drift()
            self._write_target(target_kb)
            written = True
        published = self._publish(decision, report_only=not written)
        return Applied(target_kb=target_kb, written=written, published=published)

    def _check_drift(self) -> None:
        """Note when someone else (``xl mem-set`` via ``memory/target``) moved the target.

        The kernel's worker overwrote it every tick regardless; so do we, but we say so.
        """
        if self._last_written_kb is None:
            return
        try:
            untrusted_text = read_text(self.target_path)
            now_kb = parse_kb(untrusted_text, "target_kb")
        except InputError as exc:
            self._log.warning("selfballoon: cannot read back target_kb: %s", exc)
            return
        if now_kb != self._last_written_kb:
            self.drifts += 1
            self._log.warning(
                "selfballoon: target_kb is %d, not the %d we wrote (set by someone else); "
                "overwriting", now_kb, self._last_written_kb)

    def _write_target(self, target_kb: int) -> None:
        path = self.target_path
        data = f"{target_kb}\n".encode("ascii")
        try:
            # No O_CREAT: if the driver went away, fail instead of creating a file.
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        except OSError as exc:
            raise ActuatorError(f"cannot open {path}: {os.strerror(exc.errno or errno.EIO)}") \
                from None
        try:
            if os.write(fd, data) != len(data):
                raise ActuatorError(f"short write to {path}")
        except OSError as exc:
            raise ActuatorError(f"cannot write {path}: {os.strerror(exc.errno or errno.EIO)}") \
                from None
        finally:
            os.close(fd)
        self._last_written_kb = target_kb

    def _publish(self, decision: BalloonDecision, *, report_only: bool) -> bool:
        if self._publisher is None:
            return False
        values = {
            "goal_kb": decision.goal_kb,
            "target_kb": decision.target_kb,
            "committed_kb": pages2kb(decision.committed_pages),
            "frontswap_pages": decision.frontswap_pages,
            "mode": "report-only" if report_only else "active",
        }
        try:
            for key, value in values.items():
                self._publisher.write(f"{PUBLISH_DIR}/{key}", str(value))
        except Exception as exc:
            # Whatever the injected client raises (pyxs has its own errors): the target is
            # already set, and a xenstore hiccup must not fail the tick.
            self.publish_errors += 1
            self._log.error("selfballoon: publishing to xenstore failed: %s", exc)
            return False
        return True


class ShrinkActuator:
    """Passes a shrink decision to the shim's ``frontswap.shrink``."""

    def __init__(self, frontswap: FrontswapControl) -> None:
        self._frontswap = frontswap

    def apply(self, decision: ShrinkDecision) -> int | None:
        """Shrink if the decision says so; returns the pages moved when the shim reports it."""
        if decision.target_pages is None:
            return None
        moved = self._frontswap.shrink(decision.target_pages)
        return moved if isinstance(moved, int) else None
