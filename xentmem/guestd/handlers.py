"""Control ops -> :class:`~xentmem.guestd.core.Daemon` calls, and errors -> error replies.

:func:`handle_line` is the whole request path after the socket: decode and check the line
against the protocol's op table, refuse state changes while stopping, run the op, and turn
any failure into a :class:`~xentmem.control.protocol.ControlError` with a stable code.  A
request that fails has changed nothing: the checks run before the op, and the operations
underneath validate before they change anything.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Callable

from xentmem import __version__
from xentmem.control import protocol
from xentmem.control.protocol import ControlError, Request, encode_bytes
from xentmem.control.server import respond
from xentmem.errors import (
    AbiError,
    BackendError,
    BackendUnsupported,
    ConfigError,
    DaemonStopping,
    NoBackend,
    ParamError,
    UnknownBackend,
    UnknownParam,
    UnloadRefused,
    XentmemError,
)
from xentmem.guestd.core import DEFAULT_HISTORY_LIMIT, Daemon, UnknownName
from xentmem.guestd.mainthread import DaemonBusy
from xentmem.tmem.abi import Oid, PoolUuid

log = logging.getLogger(__name__)

Handler = Callable[[Daemon, Mapping[str, Any]], Any]


def _file_key(untrusted: Any) -> Any:
    """The wire key (already shaped by the protocol) as the cleancache frontend takes it."""
    if isinstance(untrusted, tuple):
        return Oid.checked(*untrusted)
    return untrusted


def _cc_put(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    stored = daemon.cleancache_put_page(args["pool_id"], _file_key(args["key"]), args["index"],
                                        args["data"])
    return {"stored": stored}


def _cc_get(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    data = daemon.cleancache_get_page(args["pool_id"], _file_key(args["key"]), args["index"])
    return {"data": None if data is None else encode_bytes(data)}


def _cc_invalidate_page(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    daemon.cleancache_invalidate_page(args["pool_id"], _file_key(args["key"]), args["index"])
    return {}


def _cc_invalidate_inode(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    daemon.cleancache_invalidate_inode(args["pool_id"], _file_key(args["key"]))
    return {}


def _cc_invalidate_fs(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    daemon.cleancache_invalidate_fs(args["pool_id"])
    return {}


def _cc_init_shared(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    try:
        uuid = PoolUuid.from_uuid(args["uuid"])
    except ValueError:
        raise AbiError(f"uuid: {args['uuid']!r} is not a uuid") from None
    return {"pool_id": daemon.cleancache_init_shared_fs(uuid)}


def _fs_store(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    rc = daemon.frontswap_store(args["type"], args["offset"], args["data"])
    return {"rc": rc, "in_tmem": rc == 0}


def _fs_load(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    data = daemon.frontswap_load(args["type"], args["offset"])
    return {"data": None if data is None else encode_bytes(data)}


def _fs_invalidate_page(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    daemon.frontswap_invalidate_page(args["type"], args["offset"])
    return {}


def _fs_invalidate_area(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    daemon.frontswap_invalidate_area(args["type"])
    return {}


def _hello(daemon: Daemon, args: Mapping[str, Any]) -> Any:
    return {"protocol": protocol.PROTOCOL_VERSION, "daemon_version": __version__,
            "ops": sorted(HANDLERS)}


HANDLERS: dict[str, Handler] = {
    "hello": _hello,
    "status": lambda d, a: d.status(),
    "params.list": lambda d, a: d.params_list(),
    "params.get": lambda d, a: d.param_get(a["name"]),
    "params.set": lambda d, a: d.param_set(a["name"], a["value"]),
    "backends": lambda d, a: d.backends(),
    "backend.load": lambda d, a: d.load(a["name"], a.get("params")),
    "backend.unload": lambda d, a: d.unload(),
    "pools": lambda d, a: d.pools(),
    "stats": lambda d, a: d.stats(),
    "balloon": lambda d, a: d.balloon_status(a.get("limit", DEFAULT_HISTORY_LIMIT)),
    "metrics": lambda d, a: {"content_type": protocol.METRICS_CONTENT_TYPE,
                             "text": d.metrics_text()},
    "config.reload": lambda d, a: d.reload_from_client(),
    "cleancache.init_fs": lambda d, a: {"pool_id": d.cleancache_init_fs()},
    "cleancache.init_shared_fs": _cc_init_shared,
    "cleancache.put_page": _cc_put,
    "cleancache.get_page": _cc_get,
    "cleancache.invalidate_page": _cc_invalidate_page,
    "cleancache.invalidate_inode": _cc_invalidate_inode,
    "cleancache.invalidate_fs": _cc_invalidate_fs,
    "frontswap.init": lambda d, a: d.frontswap_init(a["pages"], a.get("backing", "memory"),
                                                    a.get("type")),
    "frontswap.store": _fs_store,
    "frontswap.load": _fs_load,
    "frontswap.invalidate_page": _fs_invalidate_page,
    "frontswap.invalidate_area": _fs_invalidate_area,
    "frontswap.shrink": lambda d, a: {"moved": d.frontswap_shrink(a["target_pages"])},
    "frontswap.curr_pages": lambda d, a: {"pages": d.frontswap_curr_pages()},
    "nbd.add": lambda d, a: d.nbd_add(a["pages"], a.get("backing", "file"), a.get("name"),
                                      a.get("device"), a.get("path")),
    "nbd.remove": lambda d, a: d.nbd_remove(a["name"]),
    "nbd.list": lambda d, a: d.nbd_list(),
}

if set(HANDLERS) != set(protocol.OPS):  # pragma: no cover - a declaration bug
    raise RuntimeError("control handlers and protocol ops differ: "
                       + ", ".join(sorted(set(HANDLERS) ^ set(protocol.OPS))))


def error_for(exc: BaseException, op: str) -> ControlError:
    """The error reply for a failure (unexpected ones are logged with their traceback)."""
    if isinstance(exc, ControlError):
        return exc
    if isinstance(exc, UnknownName):
        return ControlError(protocol.NOT_FOUND, str(exc))
    if isinstance(exc, DaemonBusy):
        return ControlError(protocol.BUSY, str(exc))
    if isinstance(exc, DaemonStopping):
        return ControlError(protocol.SHUTTING_DOWN, str(exc))
    if isinstance(exc, UnloadRefused):
        return ControlError(protocol.UNLOAD_REFUSED, str(exc))
    if isinstance(exc, (UnknownBackend, UnknownParam)):
        return ControlError(protocol.NOT_FOUND, str(exc))
    if isinstance(exc, (ParamError, AbiError, ConfigError)):
        return ControlError(protocol.BAD_VALUE, str(exc))
    if isinstance(exc, NoBackend):
        return ControlError(protocol.NO_BACKEND, str(exc))
    if isinstance(exc, (BackendError, BackendUnsupported, XentmemError)):
        return ControlError(protocol.BACKEND_ERROR, str(exc))
    log.error("control op %s failed unexpectedly", op, exc_info=exc)
    return ControlError(protocol.INTERNAL, f"{op}: internal error: {type(exc).__name__}: {exc}")


def run(daemon: Daemon, request: Request) -> Any:
    """Run a checked request; raises ControlError for every failure."""
    spec = protocol.OPS[request.op]
    if not daemon.begin(spec.mutates):
        raise ControlError(protocol.SHUTTING_DOWN, f"{request.op}: xentmemd is stopping")
    try:
        return HANDLERS[request.op](daemon, request.args)
    except Exception as exc:
        raise error_for(exc, request.op) from exc
    finally:
        daemon.end()


def handle_line(daemon: Daemon, untrusted_line: bytes) -> bytes:
    """One request line in, one response line out; never raises."""
    return respond(untrusted_line, protocol.OPS, lambda request: run(daemon, request))
