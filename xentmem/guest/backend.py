"""The interface every tmem backend implements: the hypercall's operations, in Python.

A backend is a plugin.  It is found through the ``xentmem.backends`` entry-point group (see
:mod:`xentmem.guest.registry`), declares its module params as a :class:`~xentmem.params.ParamSet`,
and answers the six guest operations with Xen's return convention: 1 = done/found,
0 = not found, a negative errno on error.  The frontends hold a reference to the loaded
backend and never look behind this interface, so ``zcache`` (a local lz4 store), ``xen`` (the
operations over xenstore to a host service) or a third party's store are interchangeable.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Optional

from xentmem.clock import Clock, SystemClock
from xentmem.errors import ParamError
from xentmem.params import ParamSet
from xentmem.roots import Roots
from xentmem.tmem.abi import Oid, PoolUuid, TmemControl

GetResult = tuple[int, Optional[bytes]]


class Backend(ABC):
    """Base class of a tmem backend (``struct cleancache_ops`` + ``frontswap_ops`` in one)."""

    #: The name users type (``load zcache``) and the entry-point name.
    name: ClassVar[str] = ""
    #: One line for ``xentmem backends``.
    summary: ClassVar[str] = ""
    #: The backend's own module params (the shim's flags are declared by the shim).
    params: ClassVar[ParamSet] = ParamSet()

    def __init__(
        self,
        values: Mapping[str, Any],
        *,
        roots: Roots | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.values: dict[str, Any] = dict(values)
        self.roots = roots or Roots()
        self.clock = clock or SystemClock()

    # -- life cycle (xenbus verbs) --------------------------------------------------------

    @classmethod
    def probe(cls, roots: Roots) -> None:
        """Raise :class:`~xentmem.errors.BackendUnsupported` if this backend cannot run here."""

    @classmethod
    def kept_pages_waiting(cls, roots: Roots) -> bool:
        """True when a process killed earlier left pages of this backend in ``roots`` (its
        run directory) that only a load of this backend with frontswap takes back (zcache's
        page arena and pool table: ``docs/zcache.md``, "Restart").  None by default."""
        return False

    def connect(self) -> None:
        """Bring the backend up (a handshake, an allocation).  Called once, before any op."""

    def remove(self) -> None:
        """Tear down: every pool is gone afterwards.  Called once, after the last op."""

    def describe(self) -> dict[str, Any]:
        """What ``status`` shows about the backend beyond its counters."""
        return {"name": self.name}

    # -- the tmem operations (Xen return convention) --------------------------------------

    @abstractmethod
    def new_pool(self, uuid: PoolUuid, flags: int) -> int:
        """TMEM_NEW_POOL: the pool id (>= 0) or a negative errno."""

    @abstractmethod
    def destroy_pool(self, pool_id: int) -> int:
        """TMEM_DESTROY_POOL: 1 if destroyed, 0 for a bad or empty slot."""

    @abstractmethod
    def put_page(self, pool_id: int, oid: Oid, index: int, page: bytes) -> int:
        """TMEM_PUT_PAGE: 1 if stored; negative errno (a failed dup put drops the old copy)."""

    @abstractmethod
    def get_page(self, pool_id: int, oid: Oid, index: int) -> GetResult:
        """TMEM_GET_PAGE: ``(1, page)`` if found, ``(0, None)`` if not, ``(-errno, None)``."""

    @abstractmethod
    def flush_page(self, pool_id: int, oid: Oid, index: int) -> int:
        """TMEM_FLUSH_PAGE: 1 if flushed, 0 if it was not there."""

    @abstractmethod
    def flush_object(self, pool_id: int, oid: Oid) -> int:
        """TMEM_FLUSH_OBJECT: 1 if anything was flushed, 0 otherwise."""

    def control(self, subop: TmemControl, arg: Any = None) -> Any:
        """TMEM_CONTROL: privileged sub-ops; a guest-side backend says -ENOSYS."""
        return -errno.ENOSYS

    def concurrency(self) -> int:
        """How many callers' page ops gain from being under way at once: more than one where
        the backend carries several in one message (``xen``), so callers with many pages
        (an NBD request) hand them over side by side."""
        return 1

    # -- params and counters ----------------------------------------------------------------

    def set_param(self, name: str, value: Any) -> Any:
        """Change a run-time-writable param; validated first, refused if read-only."""
        param = self.params.lookup(name, owner=self.name)
        if not param.writable:
            raise ParamError(f"{name}: read-only once {self.name} is loaded; unload and load again")
        typed = param.coerce(value)
        self.apply_param(name, typed)
        self.values[name] = typed
        return typed

    def apply_param(self, name: str, value: Any) -> None:
        """Hook for a writable param to take effect; the value is already validated."""

    def stats(self) -> dict[str, int]:
        """The counters that are always on (the daemon needs them)."""
        return {}

    def detailed_stats(self) -> dict[str, int]:
        """Optional, detailed counters; empty when the backend keeps none or they are off."""
        return {}

    def pools(self) -> list[dict[str, Any]]:
        """One dict per live pool, for ``xentmem pools``."""
        return []
