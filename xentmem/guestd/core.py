"""What ``xentmemd`` holds and does: the shim (frontends + backend), the balloon loops, the
swap areas of the page API, and the configuration in force.

Every control op ends in one method of :class:`Daemon`, so the socket layer only translates
and tests drive the daemon in process.  Methods return plain JSON-ready data and raise the
project's errors; a refused change leaves everything as it was (docs/guestd.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

from xentmem import __version__
from xentmem.clock import Clock
from xentmem.control.server import ServerError, group_id
from xentmem.errors import (
    AbiError,
    BackendError,
    ConfigError,
    DaemonStopping,
    NoBackend,
    ParamError,
    XentmemError,
)
from xentmem.guest import registry
from xentmem.guest.backend import Backend
from xentmem.guest.frontends.keys import FileKey
from xentmem.guest.shim import SHIM_PARAMS, Shim
from xentmem.guestd.choice import BackendChoice, Resolve, choose_backend
from xentmem.guestd.config import (
    DAEMON_PARAMS,
    DAEMON_SECTION,
    FROM_AUTO,
    FROM_DEFAULT,
    FROM_KERNEL,
    FROM_LOAD,
    FROM_RUN_TIME,
    KNOB_SECTION,
    TMEM_SECTION,
    BackendNames,
    Config,
    ConfigSchema,
)
from xentmem.guestd.config import (
    load as load_config,
)
from xentmem.guestd.mainthread import DaemonBusy
from xentmem.guestd.metrics import collect, render
from xentmem.guestd.nbd.exports import TABLE as NBD_EXPORTS_TABLE
from xentmem.guestd.nbd.exports import Exports, recorded_files
from xentmem.guestd.record import SHUTDOWN_FILE, START_FAILED, RunRecord
from xentmem.guestd.record import STOPPED as RUN_STOPPED
from xentmem.guestd.swap import DEFAULT_STATE_DIR, SwapAreas, boot_id, lost_at_exit
from xentmem.roots import Roots
from xentmem.tmem.abi import PoolUuid
from xentmem_selfballoon.service import LOAD_FLAGS, SelfballoonService

log = logging.getLogger(__name__)

STARTING, RUNNING, STOPPING, STOPPED = "starting", "running", "stopping", "stopped"
#: How long shutdown waits for requests already running to finish.
DRAIN_TIMEOUT_S = 10.0
LOOP_STOP_TIMEOUT_S = 10.0
#: How many balloon decisions ``balloon`` returns unless told.
DEFAULT_HISTORY_LIMIT = 20


class UnknownName(XentmemError, LookupError):
    """A param, backend, pool or swap type that does not exist (``not_found`` on the wire)."""


class Daemon:
    """The daemon's state and operations (no sockets, no signals: see :mod:`.app`)."""

    def __init__(
        self,
        *,
        roots: Roots,
        clock: Clock,
        config: Config,
        balloon: SelfballoonService,
        config_path: Path | None = None,
        overrides: tuple[str, ...] = (),
        config_missing_ok: bool = False,
        resolve: Resolve = registry.backend_class,
        on_settings: Callable[[Mapping[str, Any]], None] | None = None,
        state_dir: Path | None = None,
        backend_names: BackendNames | None = registry.available,
        check_control_group: Callable[[str], None] | None = None,
    ) -> None:
        self.roots = roots
        self.clock = clock
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.config_missing_ok = config_missing_ok
        self.balloon = balloon
        self.resolve = resolve
        self.backend_names = backend_names
        self.on_settings = on_settings
        #: Whether the control socket can be given to a group (the application owns the
        #: socket); ServerError if not.  A reload checks it before it changes anything.
        self.check_control_group = check_control_group
        self.shim = Shim(roots=roots, clock=clock)
        self.shim.add_listener(balloon)  # the loops start and stop with the backend
        #: File-backed swap areas and the shutdown record outlive the daemon: they go to the
        #: state directory (systemd removes the run directory when the service stops).
        self.state_dir = state_dir or roots.under(DEFAULT_STATE_DIR)
        self.swap = SwapAreas(self.shim.frontswap, self.state_dir / "swap", boot_id(roots))
        #: NBD exports of swap areas; the application serves them (docs/nbd.md).
        self.nbd = Exports(self.shim.frontswap, self.swap,
                           table=self.state_dir / "swap" / NBD_EXPORTS_TABLE)
        #: This run's entry in ``<state_dir>/shutdown.json`` (docs/swap-areas.md).
        self.record = RunRecord(self.state_dir)
        self.choice: BackendChoice | None = None
        #: (section, name) -> what changed a param since the config set it (params set, a
        #: load request's params under ("load", name)); see :meth:`_origin`.
        self._changed_by: dict[tuple[str, str], str] = {}
        self.state = STARTING
        self.started_at = clock.monotonic()
        self._lock = threading.RLock()
        self._work = threading.Condition()
        self._in_flight = 0
        #: How a ``config.reload`` from a client runs: None here (in this thread); the
        #: application hands it to its main thread, which owns the schedule it changes.
        self.reload_runner: Callable[[], dict[str, Any]] | None = None

    # -- schema -----------------------------------------------------------------------------------

    def schema(self) -> ConfigSchema:
        return ConfigSchema(self.balloon.knobs.params, lambda name: self.resolve(name).params,
                            self.backend_names)

    # -- request accounting (so shutdown can drain) ------------------------------------------------

    def begin(self, mutates: bool) -> bool:
        """Count a request in; False if it changes state and the daemon is stopping."""
        with self._work:
            if mutates and self.state in (STOPPING, STOPPED):
                return False
            self._in_flight += 1
            return True

    def end(self) -> None:
        with self._work:
            self._in_flight -= 1
            self._work.notify_all()

    def _drain(self, timeout_s: float) -> bool:
        with self._work:
            return self._work.wait_for(lambda: self._in_flight == 0, timeout_s)

    def _refuse_if_stopping(self, what: str) -> None:
        """With ``_lock`` held: a change counted in before the stop began, but which got
        the lock only once it had (the drain timed out, or it waited behind the stop's
        unload), must not run on a stopping or stopped daemon."""
        if self.state in (STOPPING, STOPPED):
            raise DaemonStopping(f"{what}: xentmemd is stopping")

    # -- backend ----------------------------------------------------------------------------------

    def load(self, name: str | None = None, params: Mapping[str, Any] | None = None
             ) -> dict[str, Any]:
        """Load ``name`` (default: the configured backend) with config params under ``params``."""
        with self._lock:
            self._refuse_if_stopping("backend.load")
            requested = name or self.config.backend
            origin = FROM_LOAD if name else (self.config.origin(DAEMON_SECTION, "backend")
                                             or FROM_DEFAULT)
            choice = choose_backend(requested, self.roots, self.resolve, origin)
            if self.shim.backend is not None:
                raise BackendError(f"backend {self.shim.backend.name!r} is already loaded; "
                                   "unload it first")
            explicit = self.config.load_params(choice.chosen)
            explicit.update(params or {})
            log.info("backend %s chosen (%s): %s", choice.chosen, choice.requested, choice.reason)
            self._give_back_kept_pages(choice, explicit)
            self.shim.load(choice.backend_class, explicit)
            self.choice = choice
            # This load set the flags and the backend's params afresh; the two job knobs too.
            self._changed_by = {k: v for k, v in self._changed_by.items()
                                if k[0] == "selfballoon" and k[1] not in LOAD_FLAGS}
            for key in params or {}:
                self._changed_by[("load", key)] = FROM_LOAD
            log.info("backend %s loaded with %s", choice.chosen,
                     ", ".join(f"{k}={v}" for k, v in sorted(self.shim.params().items())))
            return {"backend": choice.chosen, "params": self.shim.params(),
                    "choice": choice.describe()}

    def _give_back_kept_pages(self, choice: BackendChoice, explicit: Mapping[str, Any]) -> None:
        """Before ``choice`` loads: the swap pages a backend kept across the kill of an
        earlier daemon (zcache's arena) come back only through a load of that backend with
        frontswap.  If this load is not one (``auto`` now finds the Xen tmem host, or
        frontswap is off), that backend is first loaded for that alone and unloaded, which
        puts the pages in their swap areas (``docs/zcache.md``, "Restart"); without it they
        would be left unread (or deleted with the arena) and the next stop would say clean.

        If they cannot be given back, BackendError and ``choice`` is not loaded: the pages
        stay where they are (in the arena, or in the backend left loaded by a refused
        repatriation), never dropped.
        """
        # The load's own params are checked first: a load refused anyway gives nothing back.
        frontswap = self.shim.resolve_params(choice.backend_class, explicit)["frontswap"]
        names = self.backend_names() if self.backend_names is not None else registry.available()
        for name in names:
            try:
                cls = self.resolve(name)
            except (XentmemError, LookupError):  # not installed here, or broken: not asked
                continue
            if not cls.kept_pages_waiting(self.roots):
                continue
            if cls is choice.backend_class and frontswap:
                continue  # this load takes them back itself
            kept_params = explicit if cls is choice.backend_class \
                else self.config.load_params(name)
            log.warning("%s kept swap pages across the kill of an earlier xentmemd; %s is "
                        "to be loaded%s, which would leave them behind: %s is loaded with "
                        "frontswap first, to give them back to their swap areas", name,
                        choice.chosen, "" if frontswap else " without frontswap", name)
            try:
                result = self.shim.give_back_kept_pages(cls, kept_params)
            except XentmemError as exc:
                still = (f"{name} stays loaded with them" if self.shim.backend is not None
                         else f"they stay in {self.roots.run}")
                raise BackendError(
                    f"{name} kept swap pages across the kill of an earlier xentmemd and they "
                    f"could not be given back to their swap areas: {exc}; {choice.chosen} is "
                    f"not loaded and {still} (docs/zcache.md, \"Restart\")") from exc
            self.record.add(kept_pages_given_back={"backend": name,
                                                   "repatriated": result["repatriated"]})
            log.info("%d swap page(s) %s kept given back to their swap areas; %s unloaded",
                     result["repatriated"], name, name)

    def unload(self) -> dict[str, Any]:
        with self._lock:
            self._refuse_if_stopping("backend.unload")
            if self.shim.backend is None:
                raise NoBackend("no backend is loaded")
            result = self.shim.unload()
            self.choice = None
            return result

    def backends(self) -> list[dict[str, Any]]:
        loaded = self.shim.backend.name if self.shim.backend is not None else None
        out = []
        for name in registry.available():
            row: dict[str, Any] = {"name": name, "loaded": name == loaded}
            try:
                cls = self.resolve(name)
            except XentmemError as exc:
                row.update(summary="", error=str(exc), params=[])
            else:
                row.update(summary=cls.summary, params=[p.describe() for p in cls.params.values()])
            out.append(row)
        return out

    # -- params -----------------------------------------------------------------------------------

    def params_list(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        flags = self.shim.flags
        for name, param in SHIM_PARAMS.items():
            row = param.describe()
            row.update(section="tmem", value=flags[name], writable=False)
            row["from"] = self._origin("tmem", TMEM_SECTION, name, row)
            rows.append(row)
        backend = self.shim.backend
        if backend is not None:
            for name, param in backend.params.items():
                row = param.describe()
                row.update(section="backend", backend=backend.name,
                           value=backend.values.get(name))
                row["from"] = self._origin("backend", backend.name, name, row)
                rows.append(row)
        for row in self.balloon.knobs.describe():
            row = {**row, "section": "selfballoon"}
            row["from"] = self._origin("selfballoon", KNOB_SECTION, name=row["name"], row=row)
            rows.append(row)
        return rows

    def _origin(self, section: str, config_section: str, name: str,
                row: Mapping[str, Any]) -> str:
        """Where a param's value came from: params set, the load request, the config's
        ``file:line`` or the command line, the kernel command line, else auto or default."""
        changed = self._changed_by.get((section, name))
        if changed is None and section != "selfballoon":
            changed = self._changed_by.get(("load", name))
        if changed is not None:
            return changed
        if section == "selfballoon" and name in LOAD_FLAGS and self.shim.backend is not None:
            return f"tmem flag {LOAD_FLAGS[name]}"
        configured = self.config.origin(config_section, name)
        if configured is not None:
            return configured
        if section == "tmem" and self.shim.backend is not None and name in self.shim.boot.params:
            return FROM_KERNEL
        if row.get("value") is None and row.get("default") is None:
            return FROM_AUTO
        return FROM_DEFAULT

    def _locate(self, name: str) -> tuple[str, str]:
        """``[section.]name`` -> (section, name).  An unqualified name that two sections
        declare (a backend's param named as a knob) means the one that can change
        at run time: the backend's param, else the knob, else the shim flag."""
        section, dot, key = name.rpartition(".")
        backend = self.shim.backend
        if dot:
            if backend is not None and section == backend.name:
                section = "backend"
            if section not in ("tmem", "backend", "selfballoon"):
                raise UnknownName(f"unknown param section {section!r} in {name!r}; sections: "
                                  "tmem, backend (or the backend's name), selfballoon")
            return section, key
        if backend is not None and key in backend.params:
            return "backend", key
        if key in self.balloon.knobs.params:
            return "selfballoon", key
        if key in SHIM_PARAMS:
            return "tmem", key
        raise UnknownName(self._unknown_param(name))

    def param_get(self, name: str) -> dict[str, Any]:
        section, key = self._locate(name)
        for row in self.params_list():
            if row["name"] == key and row["section"] == section:
                return row
        raise UnknownName(self._unknown_param(name))

    def _unknown_param(self, name: str) -> str:
        where = "" if self.shim.backend is not None else " (no backend is loaded)"
        return f"unknown param {name!r}{where}; see `xentmem params list`"

    def param_set(self, name: str, value: Any) -> dict[str, Any]:
        """Set a backend param or a knob; a shim flag is refused (read-only module param)."""
        with self._lock:
            self._refuse_if_stopping("params.set")
            section, key = self._locate(name)
            backend = self.shim.backend
            if section == "tmem":  # a shim flag is read-only; anything else is not the shim's
                if key in SHIM_PARAMS:
                    self.shim.set_param(key, value)  # raises: read-only module param
                raise UnknownName(self._unknown_param(name))
            if section == "backend":
                if backend is None or key not in backend.params:
                    raise UnknownName(self._unknown_param(name))
                previous = backend.values.get(key)
                typed = self.shim.set_param(key, value)
                self._changed_by[("backend", key)] = FROM_RUN_TIME
                log.info("param %s: %r -> %r", key, previous, typed)
                return {"name": key, "section": "backend", "value": typed, "previous": previous}
            knobs = self.balloon.knobs
            if key not in knobs.params:
                raise UnknownName(self._unknown_param(name))
            previous = knobs.get(key)
            previous_shown = knobs.show(key)
            typed = getattr(knobs.update({key: value}), key)
            self._changed_by[("selfballoon", key)] = FROM_RUN_TIME
            log.info("knob %s: %r -> %r", key, previous, typed)
            return {"name": key, "section": "selfballoon", "value": typed, "previous": previous,
                    "shown": knobs.show(key), "previous_shown": previous_shown}

    # -- reporting --------------------------------------------------------------------------------

    def uptime_s(self) -> float:
        return max(0.0, self.clock.monotonic() - self.started_at)

    def status(self) -> dict[str, Any]:
        shim = self.shim.status()
        return {
            "pid": os.getpid(),
            "version": __version__,
            "state": self.state,
            "uptime_s": round(self.uptime_s(), 3),
            "config": str(self.config.path) if self.config.path else None,
            "run_dir": str(self.roots.run),
            "root": str(self.roots.root),
            "backend": shim["backend"],
            "backend_choice": self.choice.describe() if self.choice else None,
            "flags": shim["flags"],
            "cleancache": shim["cleancache"],
            "frontswap": shim["frontswap"],
            "balloon": self.balloon_status(limit=1),
        }

    def pools(self) -> dict[str, Any]:
        backend = self.shim.backend
        cleancache = []
        for fs in self.shim.cleancache.describe()["filesystems"]:
            row = dict(fs)
            row["pool_id"] = row.pop("fake_id")
            cleancache.append(row)
        return {
            "backend": backend.name if backend is not None else None,
            "cleancache": cleancache,
            "frontswap": self.shim.frontswap.describe(),
            "backend_pools": backend.pools() if backend is not None else [],
        }

    def stats(self) -> dict[str, Any]:
        return self.shim.stats()

    def metrics_text(self) -> str:
        backend = self.shim.backend
        return render(collect(
            backend=backend.name if backend is not None else None,
            stats=self.shim.stats(),
            balloon=self.balloon.figures(),
            swap_areas=self.shim.frontswap.describe()["swap_types"],
            uptime_s=self.uptime_s(),
            nbd_exports=self.nbd.describe(),
        ))

    def summary_line(self) -> str:
        """One line for systemd's STATUS= and the log."""
        backend = self.shim.backend
        if backend is None:
            return "no backend loaded"
        loops = "balloon loop running" if self.balloon.running else "balloon loop off"
        return (f"backend {backend.name}; {self.shim.frontswap.curr_pages()} swap pages in tmem; "
                f"{loops}")

    def balloon_status(self, limit: int = DEFAULT_HISTORY_LIMIT) -> dict[str, Any]:
        """The balloon figures, knobs and the last ``limit`` decisions (``xentmem balloon``)."""
        # ``available`` is always true (the loops ship with the daemon); protocol 1 has it.
        return {"available": True, **self.balloon.status(limit=limit)}

    # -- pages: cleancache and frontswap for clients of the socket ---------------------------------
    # No lock of ours: the frontends lock for themselves, and this is the hot path.

    def _filesystem(self, pool_id: int) -> None:
        """Refuse a pool id no ``init_fs`` returned (``not_found``, not a bad value)."""
        try:
            self.shim.cleancache.real_pool_id(pool_id)
        except AbiError:
            raise UnknownName(f"no cleancache filesystem with pool id {pool_id}") from None

    def _swap_type(self, swap_type: int) -> None:
        """Refuse a type no area has, and an NBD export's: its pages are the export's
        client's (a page written there would be read as that client's swap)."""
        if swap_type not in self.shim.frontswap.swap_types():
            raise UnknownName(f"swap type {swap_type} is not initialised (frontswap.init first)")
        owner = self.swap.owner_of(swap_type)
        if owner is not None:
            raise AbiError(f"swap type {swap_type} belongs to NBD export {owner!r}; "
                           "use nbd.remove")

    def cleancache_init_fs(self) -> int:
        return self.shim.cleancache.init_fs()

    def cleancache_init_shared_fs(self, uuid: PoolUuid) -> int:
        return self.shim.cleancache.init_shared_fs(uuid)

    def cleancache_put_page(self, pool_id: int, key: FileKey, index: int, data: bytes) -> bool:
        self._filesystem(pool_id)
        return self.shim.cleancache.put_page(pool_id, key, index, data)

    def cleancache_get_page(self, pool_id: int, key: FileKey, index: int) -> bytes | None:
        self._filesystem(pool_id)
        return self.shim.cleancache.get_page(pool_id, key, index)

    def cleancache_invalidate_page(self, pool_id: int, key: FileKey, index: int) -> None:
        self._filesystem(pool_id)
        self.shim.cleancache.invalidate_page(pool_id, key, index)

    def cleancache_invalidate_inode(self, pool_id: int, key: FileKey) -> None:
        self._filesystem(pool_id)
        self.shim.cleancache.invalidate_inode(pool_id, key)

    def cleancache_invalidate_fs(self, pool_id: int) -> None:
        self._filesystem(pool_id)
        self.shim.cleancache.invalidate_fs(pool_id)

    def frontswap_init(self, pages: int, backing: str = "memory",
                       swap_type: int | None = None) -> dict[str, Any]:
        """``swapon``: a new swap area; its type and backing."""
        return self.swap.create(pages, backing, swap_type)

    def frontswap_store(self, swap_type: int, offset: int, data: bytes) -> int:
        """0 if the page went to tmem, else the kernel's -1 (it goes to the swap area)."""
        self._swap_type(swap_type)
        return self.shim.frontswap.store(swap_type, offset, data)

    def frontswap_load(self, swap_type: int, offset: int) -> bytes | None:
        self._swap_type(swap_type)
        return self.shim.frontswap.load(swap_type, offset)

    def frontswap_invalidate_page(self, swap_type: int, offset: int) -> None:
        self._swap_type(swap_type)
        self.shim.frontswap.invalidate_page(swap_type, offset)

    def frontswap_invalidate_area(self, swap_type: int) -> None:
        """``swapoff``: the area is forgotten, its file (if any) removed; an NBD export's
        area is refused (checked again under the areas' lock)."""
        self._swap_type(swap_type)
        self.swap.forget(swap_type)

    def frontswap_shrink(self, target_pages: int) -> int:
        """Bring swap pages back from tmem until at most ``target_pages`` are left; how many."""
        return self.shim.frontswap.shrink(target_pages)

    def frontswap_curr_pages(self) -> int:
        return self.shim.frontswap.curr_pages()

    # -- NBD exports ----------------------------------------------------------------------------

    def nbd_add(self, pages: int, backing: str = "file", name: str | None = None,
                device: str | None = None, path: str | None = None) -> dict[str, Any]:
        """A new swap area exported over NBD; its description and where it is served."""
        export = self.nbd.add(pages, backing, name, device=device, path=path)
        server = self.nbd.server
        export["socket"] = server.addresses if server is not None else []
        return export

    def nbd_remove(self, name: str) -> dict[str, Any]:
        try:
            return self.nbd.remove(name)
        except KeyError:
            raise UnknownName(f"no NBD export {name!r}") from None

    def nbd_list(self) -> dict[str, Any]:
        server = self.nbd.server
        return {**(server.describe() if server is not None
                   else {"listening": [], "connections": 0}),
                "exports": self.nbd.describe(),
                "swap_at_start_mib": self.config.daemon["nbd_swap_mib"],
                "swap_at_start_backing": self.config.daemon["nbd_swap_backing"]}

    # -- configuration ----------------------------------------------------------------------------

    def reload_from_client(self) -> dict[str, Any]:
        """``config.reload`` over the socket: through :attr:`reload_runner` when there is one."""
        if self.reload_runner is not None:
            return self.reload_runner()
        return self.reload_config()

    def reload_config(self, *, lock_wait_s: float | None = None) -> dict[str, Any]:
        """Re-read the config; apply what may change now, name what needs an unload/load.

        The new file is checked whole first (ConfigError: nothing changes).  What changed in
        the file since it was last read is applied: run-time-writable backend params, knobs and
        the daemon's own settings.  Values set over the socket for keys the file did not
        change are kept.  If applying a backend param fails, those applied are rolled back.

        ``lock_wait_s`` bounds the wait for the configuration lock (an unload may hold it
        for minutes); :class:`DaemonBusy` if it is not free by then.  None waits.
        """
        with self.holding_config(lock_wait_s):
            return self._reload_config_locked()

    @contextlib.contextmanager
    def holding_config(self, wait_s: float | None = None) -> Iterator[None]:
        """Hold the configuration lock (load, unload, params, reload take it); a wait of
        ``wait_s`` at most (None: as long as it takes), else :class:`DaemonBusy`."""
        if not self._lock.acquire(timeout=-1 if wait_s is None else wait_s):
            raise DaemonBusy("the configuration is held by a load, unload or param change")
        try:
            yield
        finally:
            self._lock.release()

    def _reload_config_locked(self) -> dict[str, Any]:
        self._refuse_if_stopping("config.reload")
        if self.config_path is None:
            raise ConfigError("the daemon was started without a config file path")
        new = load_config(self.config_path, self.schema(), self.overrides,
                          missing_ok=self.config_missing_ok)
        old = self.config
        settings = {k for k in DAEMON_PARAMS if k != "backend"
                    and old.daemon.get(k) != new.daemon.get(k)}
        # Everything that can refuse is checked before anything changes.
        group = new.daemon.get("control_group")
        if "control_group" in settings and group:
            try:
                group_id(group)
                if self.check_control_group is not None:
                    self.check_control_group(group)
            except (ServerError, OSError) as exc:
                raise ConfigError(f"{self.config_path}: control_group: {exc}") from None
        knobs = self.balloon.knobs
        knob_set, knob_dropped = _knob_changes(old.knobs, new.knobs)
        try:
            knobs.check(knob_set, reset=knob_dropped)
        except ParamError as exc:
            raise ConfigError(f"{self.config_path}: [selfballoon] {exc}") from None
        applied: list[str] = []
        needs_reload: list[str] = []
        if new.backend != old.backend:
            needs_reload.append("daemon.backend")
        self._apply_backend_changes(old, new, applied, needs_reload)  # all, or none
        if knob_set or knob_dropped:  # one change; a dropped knob goes back to its default
            knobs.update(knob_set, reset=knob_dropped)
        applied.extend(f"selfballoon.{k}" for k in sorted([*knob_set, *knob_dropped]))
        for name in applied:  # the file's line is in force again
            section, _, key = name.partition(".")
            self._changed_by.pop((section if section == KNOB_SECTION else "backend", key), None)
        self.config = new
        if settings and self.on_settings is not None:
            self.on_settings(new.daemon)
        applied.extend(f"daemon.{k}" for k in sorted(settings))
        for key in needs_reload:
            log.warning("config: %s changed; it takes effect at the next load "
                        "(xentmem unload && xentmem load)", key)
        log.info("config reloaded from %s: %s", self.config_path,
                 ", ".join(applied) if applied else "nothing to apply")
        return {"config": str(self.config_path), "applied": applied,
                "needs_reload": needs_reload}

    def _apply_backend_changes(self, old: Config, new: Config, applied: list[str],
                               needs_reload: list[str]) -> None:
        backend = self.shim.backend
        if backend is None:
            return
        cls: type[Backend] = type(backend)
        before = old.load_params(backend.name)
        after = new.load_params(backend.name)
        target = self.shim.resolve_params(cls, after)  # defaults < boot < file < -o
        changed = [k for k in set(before) | set(after) if before.get(k, _MISSING) !=
                   after.get(k, _MISSING)]
        writable: dict[str, Any] = {}
        for key in sorted(changed):
            param = cls.params.get(key)
            if key in SHIM_PARAMS or param is None or not param.writable:
                if key in SHIM_PARAMS and self.shim.flags.get(key) == target[key]:
                    continue
                if param is not None and backend.values.get(key) == target[key]:
                    continue
                needs_reload.append(f"{'tmem' if key in SHIM_PARAMS else backend.name}.{key}")
            elif backend.values.get(key) != target[key]:
                writable[key] = target[key]
        done: list[tuple[str, Any]] = []
        try:
            for key, value in writable.items():
                previous = backend.values.get(key)
                self.shim.set_param(key, value)
                done.append((key, previous))
        except ParamError as exc:
            for key, previous in reversed(done):
                self.shim.set_param(key, previous)
            raise ConfigError(f"{self.config_path}: [{backend.name}] {exc}") from None
        applied.extend(f"{backend.name}.{k}" for k in writable)

    # -- shutdown ---------------------------------------------------------------------------------

    def begin_run(self) -> list[dict[str, Any]]:
        """At start, with the state directory's lock held: mark the record ``running`` (a
        crash from now on shows as unclean), then re-attach the file swap areas an earlier
        run left and export again those it exported; what was found (and damaged) goes
        into the record."""
        crashed = [r for r in self.record.previous[:1] if r.get("state") == "crashed"]
        if crashed:
            # Said before the backend loads, so it cannot know what the backend kept: zcache's
            # page arena keeps the swap pages across a kill (the backend says how many when it
            # loads), so "gone" would be wrong there (seen in the real-Xen bed's log).
            log.error("the previous xentmemd (pid %s) did not stop: killed or crashed; its "
                      "memory areas' pages are gone, its pages in tmem too unless the backend "
                      "kept them across the restart (zcache's page arena does: see its line "
                      "when it loads)", crashed[0].get("pid"))
        self.record.begin()
        rows = self.nbd.read_table()
        found = self.swap.reattach(recorded_files(rows))
        if found:
            self.record.add(reattached=found)
        restored = self.nbd.restore(rows)  # the kernel's devices reconnect to them by name
        if restored:
            self.record.add(nbd_restored=restored)
        return found

    def shutdown(self, start_error: str | None = None,
                 nbd_held: set[str] | None = None) -> dict[str, Any]:
        """Stop the loops, unload (repatriating swap pages), flush the swap areas; in that
        order.  ``start_error``: the start failed (the record says ``start_failed``).
        ``nbd_held``: the NBD exports a device was connected to when the server stopped
        (:meth:`Exports.held`); the others are removed first, their areas and files with
        them (None: every export stays).

        Returns (and writes to ``<state_dir>/shutdown.json``) what happened; ``clean`` is False
        if any step failed (each is recorded under ``errors``) or any page can no longer be
        read (``lost_pages``): a swap page that could not be brought back, an area that could
        not be flushed, a damaged page, a record that could not be written.  A failing step
        never stops the ones after it.
        """
        with self._work:
            self.state = STOPPING
        self.swap.refuse_new("xentmemd is stopping")  # no area is made after the flush below
        if not self._drain(DRAIN_TIMEOUT_S):
            log.error("shutdown: requests still running after %.0fs; going on", DRAIN_TIMEOUT_S)
        summary: dict[str, Any] = {"clean": True, "backend": None, "repatriated": 0,
                                   "errors": []}

        def failed(step: str, exc: BaseException) -> None:
            summary["clean"] = False
            summary["errors"].append(f"{step}: {exc}")
            if isinstance(exc, (XentmemError, OSError)):
                log.error("shutdown: %s: %s", step, exc)
            else:
                log.error("shutdown: %s failed unexpectedly", step, exc_info=exc)

        if start_error is not None:
            failed("start", XentmemError(start_error))
        try:
            if not self.balloon.stop(LOOP_STOP_TIMEOUT_S):
                log.error("shutdown: the balloon loop did not stop in time")
        except Exception as exc:
            failed("stopping the balloon loop", exc)
        # The loops stay stopped even if the unload is refused (the shim tells its listeners
        # the backend is back, which would start them again for nobody to stop).
        with contextlib.suppress(ValueError):
            self.shim.remove_listener(self.balloon)
        if nbd_held is not None:
            try:
                summary["nbd_removed"] = self.nbd.remove_unheld(nbd_held)
            except Exception as exc:
                failed("removing the NBD exports no device holds", exc)
        areas: list[dict[str, Any]] = []
        with self._lock:
            backend = self.shim.backend
            if backend is not None:
                summary["backend"] = backend.name
                try:
                    result = self.shim.unload()
                    summary["repatriated"] = result["repatriated"]
                    summary["pools_dropped"] = result["pools_dropped"]
                except Exception as exc:
                    summary["error"] = str(exc)
                    failed("unload", exc)
            try:
                summary["frontswap_curr_pages"] = self.shim.frontswap.curr_pages()
                tmem_pages = {a["type"]: a["tmem_pages"]
                              for a in self.shim.frontswap.describe()["swap_types"]}
            except Exception as exc:
                failed("reading the swap areas", exc)
                tmem_pages = {}
            try:
                areas = self.swap.sync()
            except Exception as exc:
                failed("flushing the swap areas", exc)
            for area in areas:
                area["tmem_pages"] = tmem_pages.get(area["type"], 0)
                if "error" in area:
                    failed(f"swap area {area['type']}", OSError(area["error"]))
            summary["areas"] = areas
            # Every page no one can read after this exit: pages still in tmem (a refused
            # unload), those of memory areas, and in file areas the damaged ones and all of
            # an area that could not be flushed.  Shutdown is clean only if there are none.
            in_memory = int(summary.get("frontswap_curr_pages", 0)) + sum(
                lost_at_exit(a) for a in areas if a.get("kind") != "FileBacking")
            in_files = sum(lost_at_exit(a) for a in areas if a.get("kind") == "FileBacking")
            summary["lost_pages"] = in_memory + in_files
            if in_memory:
                failed("pages lost", XentmemError(
                    f"{in_memory} swap page(s) had no file to go to (memory-backed areas, or "
                    "left in tmem) and are dropped with the daemon"))
            if in_files:
                failed("pages lost", XentmemError(
                    f"{in_files} swap page(s) of file areas cannot be read back (damaged, or "
                    "in an area that could not be flushed)"))
            try:
                self.swap.close()
            except Exception as exc:
                failed("closing the swap areas", exc)
        self.state = STOPPED
        record = self.record.finish(summary, START_FAILED if start_error else RUN_STOPPED)
        try:
            self.record.save()
        except OSError as exc:
            failed(f"writing {SHUTDOWN_FILE}", exc)
            record["clean"] = False
            # The log is then the only place the facts are kept: all of them, on one line.
            log.error("shutdown record not saved; it was: %s",
                      json.dumps({k: v for k, v in record.items() if k != "previous"}))
        log.info("shutdown: %s, %d swap pages repatriated, %d lost, %d area(s) flushed",
                 "clean" if summary["clean"] else "NOT CLEAN", summary["repatriated"],
                 summary["lost_pages"], sum(1 for a in areas if "error" not in a))
        return record


_MISSING = object()


def _knob_changes(old: Mapping[str, Any],
                  new: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Knobs whose value differs between two configs: those the new one sets, and those it
    no longer names (they go back to their default)."""
    changed = [key for key in set(old) | set(new)
               if old.get(key, _MISSING) != new.get(key, _MISSING)]
    return {k: new[k] for k in changed if k in new}, sorted(k for k in changed if k not in new)
