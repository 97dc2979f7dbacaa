"""The daemon's balloon loops: the selfballoon service, publishing to the guest's xenstore."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xentmem.clock import Clock
from xentmem.guestd.publish import xenstore_publisher
from xentmem.roots import Roots
from xentmem_selfballoon.knobs import KnobStore
from xentmem_selfballoon.service import SelfballoonService


def make_balloon(roots: Roots, clock: Clock, knobs: Mapping[str, Any]) -> SelfballoonService:
    """The service with the configured knobs; its publisher when there is a xenstore."""
    return SelfballoonService(knobs=KnobStore(dict(knobs)), clock=clock, roots=roots,
                              publisher=xenstore_publisher(roots, clock))
