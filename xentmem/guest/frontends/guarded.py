"""Backend calls whose failure a frontend absorbs instead of passing on.

A backend should answer with Xen's return codes, but one that raises (a transport error in
``xen``, a bug in a third party's store) must not make a frontend lose a swap page or keep a
stale clean page.  The frontends route such calls through :meth:`Guarded.quietly`, which logs
the error, counts it, and returns ``None`` so the caller can take the safe path.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger(__name__)


class Guarded:
    """Mixin: ``backend_errors`` and :meth:`quietly`."""

    backend_errors: int = 0

    def quietly(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, or None (logged and counted) if it raised."""
        try:
            return call(*args)
        except Exception:  # the caller takes the safe path on None
            self.backend_errors += 1
            log.exception("%s: backend %s failed", type(self).__name__, what)
            return None
