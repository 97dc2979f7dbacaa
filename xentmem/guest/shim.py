"""The tmem shim: the two frontends and at most one loaded backend, like ``drivers/xen/tmem.c``.

A load validates the shim's flags (tmem.c's module params) and the backend's params before
anything changes, then registers the backend with the frontends, which replay the pools
recorded before it.  An unload, which the kernel never had, repatriates persistent pages
first.  Listeners (the balloon service) hear ``backend_loaded`` and ``backend_unloading``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol

from xentmem.clock import Clock, SystemClock
from xentmem.errors import BackendError, NoBackend, ParamError, UnloadRefused
from xentmem.guest import registry
from xentmem.guest.backend import Backend
from xentmem.guest.cmdline import BootParams, read_cmdline
from xentmem.guest.frontends import Cleancache, Frontswap
from xentmem.params import Param, ParamSet
from xentmem.roots import Roots

log = logging.getLogger(__name__)

SHIM_PARAMS = ParamSet(
    Param("cleancache", bool, True, "register the cleancache frontend (clean file pages)"),
    Param("frontswap", bool, True, "register the frontswap frontend (swap pages)"),
    # tmem.c's ``selfballooning``; named apart from the balloon knob it sets at each load.
    Param("selfballooning_at_load", bool, True,
          "the selfballooning knob's value at each load: self-ballooning on or off (never "
          "in dom0; off without frontswap)"),
    Param("selfshrinking", bool, True,
          "the frontswap_selfshrinking knob's value at each load (off without frontswap)"),
    Param("frontswap_writethrough", bool, False,
          "also write every stored swap page to its backing store (the backend may drop pages)"),
    Param("frontswap_exclusive_gets", bool, False,
          "a successful frontswap load moves the page out of tmem (no second copy)"),
)


#: A load that only gives back the swap pages a backend kept across a kill
#: (:meth:`Shim.give_back_kept_pages`): frontswap alone, no balloon loop, no copies.
GIVE_BACK_FLAGS: Mapping[str, Any] = MappingProxyType({
    "frontswap": True, "cleancache": False, "selfballooning_at_load": False,
    "selfshrinking": False, "frontswap_writethrough": False, "frontswap_exclusive_gets": False,
})


def loaded_flags(values: Mapping[str, Any]) -> dict[str, Any]:
    """The shim's flags as a load sets them: without frontswap, no balloon loops
    (``xen_tmem_init``: "no point driving pages to swap").  The one place of that rule."""
    flags = {name: values[name] for name in SHIM_PARAMS}
    if not flags["frontswap"]:
        flags["selfballooning_at_load"] = flags["selfshrinking"] = False
    return flags


class ShimListener(Protocol):
    def backend_loaded(self, shim: Shim) -> None: ...

    def backend_unloading(self, shim: Shim) -> None: ...


class Shim:
    """The frontends plus the active backend; the daemon's composition point for tmem."""

    def __init__(
        self,
        *,
        roots: Roots | None = None,
        clock: Clock | None = None,
        boot: BootParams | None = None,
    ) -> None:
        self.roots = roots or Roots()
        self.clock = clock or SystemClock()
        self.cleancache = Cleancache()
        self.frontswap = Frontswap()
        self._boot = boot
        self._backend: Backend | None = None
        self._flags: Mapping[str, Any] = MappingProxyType(SHIM_PARAMS.defaults())
        self._listeners: list[ShimListener] = []
        self._lock = threading.RLock()

    # -- state ----------------------------------------------------------------------------------

    @property
    def backend(self) -> Backend | None:
        return self._backend

    @property
    def flags(self) -> Mapping[str, Any]:
        """The shim's flags as loaded (defaults while nothing is loaded)."""
        return self._flags

    @property
    def boot(self) -> BootParams:
        """The kernel command line's tmem words, read once; warnings are logged then."""
        if self._boot is None:
            self._boot = read_cmdline(self.roots.cmdline)
            for warning in self._boot.warnings:
                log.warning("%s", warning)
        return self._boot

    def add_listener(self, listener: ShimListener) -> None:
        self._listeners.append(listener)
        if self._backend is not None:
            self._notify("backend_loaded", listener)

    def remove_listener(self, listener: ShimListener) -> None:
        self._listeners.remove(listener)

    # -- params ---------------------------------------------------------------------------------

    @staticmethod
    def param_set(backend_cls: type[Backend]) -> ParamSet:
        """The shim's flags plus the backend's params: the full set a load accepts."""
        clash = set(SHIM_PARAMS) & set(backend_cls.params)
        if clash:
            raise BackendError(f"backend {backend_cls.name!r} redeclares shim params: "
                               + ", ".join(sorted(clash)))
        return SHIM_PARAMS + backend_cls.params

    def resolve_params(
        self, backend_cls: type[Backend], explicit: Mapping[str, Any] | None = None
    ) -> Mapping[str, Any]:
        """Defaults < kernel command line (deprecated) < explicit params, all validated."""
        full = self.param_set(backend_cls)
        layered = full.validate({}, owner=backend_cls.name)
        for name, value in self.boot.params.items():
            if name not in full:
                continue
            try:  # each word on its own: one bad word must not block every load
                layered = full.validate({name: value}, owner=backend_cls.name, base=layered)
            except ParamError as exc:
                log.warning("kernel command line: %s; ignored", exc)
        return full.validate(dict(explicit or {}), owner=backend_cls.name, base=layered)

    # -- load / unload --------------------------------------------------------------------------

    def load(
        self, backend: str | type[Backend], params: Mapping[str, Any] | None = None, *,
        quiet: bool = False,
    ) -> Backend:
        """Load a backend (by entry-point name, or a class) with module params.

        Nothing changes if anything is refused: params are all validated, the backend probed
        and connected before the frontends see it.  ``quiet``: no listener hears of it.
        """
        with self._lock:
            if self._backend is not None:
                raise BackendError(f"backend {self._backend.name!r} is already loaded; "
                                   "unload it first")
            cls = registry.backend_class(backend) if isinstance(backend, str) else backend
            name = cls.name
            values = self.resolve_params(cls, params)
            flags = loaded_flags(values)
            backend_values = {k: v for k, v in values.items() if k not in SHIM_PARAMS}
            cls.probe(self.roots)
            instance = cls(backend_values, roots=self.roots, clock=self.clock)
            try:
                instance.connect()
            except Exception:
                self._remove_quietly(instance)
                raise
            try:
                if flags["frontswap"]:
                    self.frontswap.register_ops(
                        instance,
                        writethrough=flags["frontswap_writethrough"],
                        exclusive_gets=flags["frontswap_exclusive_gets"],
                    )
                    log.info("xentmem: frontswap enabled, RAM provided by %s", name)
                if flags["cleancache"]:
                    self.cleancache.register_ops(instance)
                    log.info("xentmem: cleancache enabled, RAM provided by %s", name)
            except Exception:
                self._rollback(instance)
                raise
            self._flags = MappingProxyType(flags)
            self._backend = instance
            for listener in [] if quiet else list(self._listeners):
                self._notify("backend_loaded", listener)
            return instance

    def give_back_kept_pages(self, backend: type[Backend],
                             params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The swap pages ``backend`` kept across the kill of an earlier process, back in
        their swap areas: it is loaded with frontswap alone (:data:`GIVE_BACK_FLAGS` over
        ``params``), so frontswap takes the pages back for the areas re-attached, then
        unloaded, which repatriates them to the areas' backing stores and removes what the
        backend kept (zcache: its arena and pool table).  No listener hears of either.

        Returns what the unload did.  If the repatriation is refused (:class:`UnloadRefused`)
        the backend stays loaded with the pages, as after any refused unload.
        """
        with self._lock:
            self.load(backend, {**(params or {}), **GIVE_BACK_FLAGS}, quiet=True)
            return self.unload(quiet=True)

    def _rollback(self, backend: Backend) -> None:
        """Undo a load that failed half way: no page was stored through it yet."""
        for frontend in (self.cleancache, self.frontswap):
            if frontend.ops is backend:
                try:
                    frontend.unregister_ops()
                except UnloadRefused:  # pragma: no cover - nothing was stored yet
                    log.exception("rollback of %s failed", type(frontend).__name__)
        self._remove_quietly(backend)

    @staticmethod
    def _remove_quietly(backend: Backend) -> None:
        """Tear a backend down where its failure must not stop the caller (logged)."""
        try:
            backend.remove()
        except Exception:
            log.exception("backend %s: remove() failed", backend.name)

    def unload(self, *, quiet: bool = False) -> dict[str, Any]:
        """Stop the loops, repatriate swap pages, drop ephemeral pools, remove the backend.

        Raises :class:`UnloadRefused` (backend still loaded, loops restarted) when persistent
        pages cannot all be repatriated.  ``quiet``: no listener hears of it.
        """
        with self._lock:
            backend = self._backend
            if backend is None:
                raise NoBackend("no backend is loaded")
            listeners = [] if quiet else list(self._listeners)
            for listener in listeners:
                self._notify("backend_unloading", listener)
            try:
                repatriated = self.frontswap.unregister_ops()
            except UnloadRefused:
                log.error("unload of %s refused; it stays loaded", backend.name)
                for listener in listeners:
                    self._notify("backend_loaded", listener)
                raise
            dropped = self.cleancache.unregister_ops()
            self._remove_quietly(backend)  # every page is safe by now; a failure here is logged
            self._backend = None
            self._flags = MappingProxyType(SHIM_PARAMS.defaults())
            log.info("xentmem: %s unloaded (%d swap pages repatriated, %d pools dropped)",
                     backend.name, repatriated, dropped)
            return {"backend": backend.name, "repatriated": repatriated, "pools_dropped": dropped}

    def set_param(self, name: str, value: Any) -> Any:
        """Change a run-time-writable backend param; the shim's own flags are read-only."""
        with self._lock:
            if name in SHIM_PARAMS:
                raise ParamError(f"{name}: read-only once loaded (a module param, 0444); "
                                 f"`xentmem unload`, then `xentmem load BACKEND {name}=VALUE`")
            if self._backend is None:
                raise NoBackend("no backend is loaded")
            return self._backend.set_param(name, value)

    def params(self) -> dict[str, Any]:
        """Current values of the shim flags and the backend's params."""
        with self._lock:
            values = dict(self._flags)
            if self._backend is not None:
                values.update(self._backend.values)
            return values

    def _notify(self, event: str, listener: ShimListener) -> None:
        try:
            getattr(listener, event)(self)
        except Exception:  # a listener must not break load/unload
            log.exception("shim listener %r failed on %s", listener, event)

    # -- reporting ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            backend = self._backend
            return {
                "backend": backend.describe() if backend is not None else None,
                "flags": dict(self._flags),
                "cleancache": self.cleancache.describe(),
                "frontswap": self.frontswap.describe(),
            }

    def stats(self) -> dict[str, Any]:
        with self._lock:
            backend = self._backend
            return {
                "cleancache": self.cleancache.stats(),
                "frontswap": self.frontswap.stats(),
                "backend": backend.stats() if backend is not None else {},
                "backend_detailed": backend.detailed_stats() if backend is not None else {},
            }
