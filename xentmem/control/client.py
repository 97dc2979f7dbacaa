"""Clients of the control sockets, for the CLIs and any program outside the daemons.

:class:`ControlConnection` is the one client of the protocol: one kept-alive connection,
calls from several threads serialised on it, every wait bounded by ``timeout``, every failure
a :class:`ControlError` with a stable ``code``, and a request resent only when that cannot
run it twice.  :class:`ControlClient` adds ``xentmemd``'s ops as methods, its page API
mirroring the shim's frontends so code moves from in-process to the socket by swapping the
object; ``xentmem-hostd``'s is :class:`xentmem.hostd.control.HostControlClient`.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any, TypeVar

from xentmem.control import protocol
from xentmem.control.protocol import (
    BUSY,
    MAX_RESPONSE_BYTES,
    PROTOCOL,
    TIMEOUT,
    UNAVAILABLE,
    ControlError,
    OpSpec,
    decode_response,
    encode_bytes,
    encode_file_key,
    encode_request,
)

_Self = TypeVar("_Self", bound="ControlConnection")
#: The first pause before asking a busy daemon again; it doubles (with jitter, so a burst of
#: clients spreads out) up to :data:`BUSY_PAUSE_MAX_S`, for as long as the client's timeout.
BUSY_PAUSE_S = 0.02
BUSY_PAUSE_MAX_S = 0.5
FileKey = Any  # int (inode), bytes (file handle) or a 3-tuple of u64 words (oid)


def default_socket_path() -> str:
    """``$XENTMEM_SOCKET`` if set, else ``/run/xentmem/control.sock``."""
    return os.environ.get("XENTMEM_SOCKET") or protocol.DEFAULT_SOCKET_PATH


class ControlConnection:
    """A connection to one daemon's control socket.  Use as a context manager, or call
    :meth:`close`.

    ``ops`` is the daemon's op table (it says which ops change nothing and so may be resent);
    ``daemon`` names the daemon in error messages.
    """

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float = 10.0, *,
                 ops: Mapping[str, OpSpec], daemon: str) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout
        self.ops = ops
        self.daemon = daemon
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    # -- connection -----------------------------------------------------------------------------

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._buffer = b""

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except socket.timeout:
            sock.close()
            raise ControlError(TIMEOUT, f"{self.socket_path}: connect timed out after "
                                        f"{self.timeout:g}s") from None
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EAGAIN:  # a live daemon whose listen queue is full
                raise ControlError(BUSY, f"{self.daemon} at {self.socket_path} has more "
                                         "connections waiting than it queues",
                                   connection=True) from None
            reason = exc.strerror or str(exc)
            raise ControlError(UNAVAILABLE, f"cannot reach {self.daemon} at {self.socket_path}: "
                                            f"{reason} (is the daemon running?)") from None
        self._sock = sock
        return sock

    def _read_line(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_RESPONSE_BYTES:
                raise ControlError(PROTOCOL, f"answer longer than {MAX_RESPONSE_BYTES} bytes")
            chunk = sock.recv(256 * 1024)
            if not chunk:
                raise ControlError(UNAVAILABLE, f"{self.daemon} closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _salvage(self, sock: socket.socket) -> bytes | None:
        """A line the daemon sent before it closed the connection, if one is waiting."""
        try:
            sock.setblocking(False)
            while b"\n" not in self._buffer and len(self._buffer) <= MAX_RESPONSE_BYTES:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                self._buffer += chunk
        except OSError:
            pass
        if b"\n" not in self._buffer:
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    # -- requests -------------------------------------------------------------------------------

    def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its ``result``; a ControlError for an error reply.

        Arguments must be JSON-ready (the convenience methods base64 pages for you).  A
        connection that failed mid-request is closed, so the next call reconnects.

        A kept-alive connection the daemon closed while idle is retried once on a fresh one,
        but only when that cannot run a request twice: when the request never got through
        (``sendall`` failed, or the daemon closed with it unread: a reset), or when the op
        changes nothing.  A state-changing request that
        the daemon received whole and then dropped without an answer may have run, so it is
        reported, never resent.

        A daemon that is ``busy`` (all its connections taken, or its listen queue full) ran
        nothing: the request is tried again after a growing pause until ``timeout`` is spent;
        then the error is ``busy``, never ``unavailable``.
        """
        with self._lock:
            deadline = time.monotonic() + self.timeout
            pause = BUSY_PAUSE_S
            while True:
                try:
                    return self._call(op, args)
                except ControlError as exc:
                    if exc.code != BUSY or not exc.connection:
                        raise
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ControlError(BUSY, f"{exc.message} (still busy after "
                                                 f"{self.timeout:g}s)") from None
                time.sleep(min(left, pause * random.uniform(0.5, 1.5)))
                pause = min(2 * pause, BUSY_PAUSE_MAX_S)

    def _call(self, op: str, args: Mapping[str, Any]) -> Any:
        """One try of :meth:`call`, the lock held."""
        request_id = next(self._ids)
        line = encode_request(op, args, request_id)
        spec = self.ops.get(op)
        replayable = spec is not None and not spec.mutates
        for attempt in (1, 2):
            fresh = self._sock is None
            sock = self._connect()
            try:
                sock.sendall(line)
            except socket.timeout:
                self._drop()
                raise ControlError(TIMEOUT, f"{self.daemon} did not take {op!r} within "
                                            f"{self.timeout:g}s") from None
            except OSError as exc:
                said = self._salvage(sock)
                self._drop()
                if said is not None:  # the daemon explained before closing (busy)
                    return decode_response(said, request_id)
                # The request never got through whole, so it cannot have run: retry once
                # on a fresh connection if this one was an old, kept-alive one.
                if fresh or attempt == 2:
                    raise ControlError(UNAVAILABLE, f"{self.daemon} dropped the "
                                                    f"connection: {exc}") from None
                continue
            try:
                return decode_response(self._read_line(sock), request_id)
            except socket.timeout:
                self._drop()
                raise ControlError(TIMEOUT, f"no answer to {op!r} from {self.daemon} within "
                                            f"{self.timeout:g}s") from None
            except ControlError as exc:
                if exc.connection and exc.code == BUSY:
                    self._drop()  # the daemon closes it after saying so
                if exc.code not in (UNAVAILABLE, PROTOCOL):
                    raise
                partial = bool(self._buffer)
                self._drop()
                if exc.code == PROTOCOL:
                    raise
                if not fresh and attempt == 1 and replayable and not partial:
                    continue
                raise self._lost_answer(op, replayable, str(exc)) from None
            except OSError as exc:  # a reset while reading the answer
                partial = bool(self._buffer)
                self._drop()
                # A Unix socket reports a reset only when the daemon closed it with bytes
                # still unread, that is with this request not read whole: it did not run.
                # (A daemon closing an idle connection just as the request arrives.)
                unread = isinstance(exc, ConnectionResetError)
                if not fresh and attempt == 1 and (replayable or unread) and not partial:
                    continue
                raise self._lost_answer(op, replayable, str(exc)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _lost_answer(self, op: str, replayable: bool, reason: str) -> ControlError:
        """The connection went after the daemon had the whole request."""
        if replayable:
            return ControlError(UNAVAILABLE, f"{self.daemon} dropped the connection: {reason}")
        return ControlError(UNAVAILABLE, f"{self.daemon} dropped the connection before "
                                         f"answering {op!r} ({reason}); it may have run: "
                                         "check its state before trying again")



class ControlClient(ControlConnection):
    """A client of ``xentmemd``: its ops as methods, the page API as two attributes."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None,
                 timeout: float = 10.0) -> None:
        super().__init__(socket_path or default_socket_path(), timeout, ops=protocol.OPS,
                         daemon="xentmemd")
        self.cleancache = CleancacheClient(self)
        self.frontswap = FrontswapClient(self)

    # -- the daemon -----------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return self.call("hello")

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def params_list(self) -> list[dict[str, Any]]:
        return self.call("params.list")

    def param_get(self, name: str) -> dict[str, Any]:
        return self.call("params.get", name=name)

    def param_set(self, name: str, value: Any) -> dict[str, Any]:
        """Set a backend param or a selfballoon knob; ``value`` typed or as sysfs text."""
        return self.call("params.set", name=name, value=value)

    def backends(self) -> list[dict[str, Any]]:
        return self.call("backends")

    def load(self, name: str = "auto", params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"name": name}
        if params:
            args["params"] = dict(params)
        return self.call("backend.load", **args)

    def unload(self) -> dict[str, Any]:
        return self.call("backend.unload")

    def pools(self) -> dict[str, Any]:
        return self.call("pools")

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def balloon(self, limit: int | None = None) -> dict[str, Any]:
        return self.call("balloon") if limit is None else self.call("balloon", limit=limit)

    def metrics(self) -> str:
        """The Prometheus text, ready to serve or write to a textfile."""
        return self.call("metrics")["text"]

    def reload(self) -> dict[str, Any]:
        return self.call("config.reload")


class CleancacheClient:
    """The cleancache page API over the socket, named as in
    :class:`~xentmem.guest.frontends.Cleancache`."""

    def __init__(self, client: ControlClient) -> None:
        self._client = client

    def init_fs(self) -> int:
        return self._client.call("cleancache.init_fs")["pool_id"]

    def init_shared_fs(self, uuid: Any) -> int:
        return self._client.call("cleancache.init_shared_fs", uuid=str(uuid))["pool_id"]

    def put_page(self, pool_id: int, key: FileKey, index: int, page: bytes) -> bool:
        return self._client.call("cleancache.put_page", pool_id=pool_id,
                                 key=encode_file_key(key), index=index,
                                 data=encode_bytes(page))["stored"]

    def get_page(self, pool_id: int, key: FileKey, index: int) -> bytes | None:
        data = self._client.call("cleancache.get_page", pool_id=pool_id,
                                 key=encode_file_key(key), index=index)["data"]
        return None if data is None else protocol.decode_bytes(data)

    def invalidate_page(self, pool_id: int, key: FileKey, index: int) -> None:
        self._client.call("cleancache.invalidate_page", pool_id=pool_id,
                          key=encode_file_key(key), index=index)

    def invalidate_inode(self, pool_id: int, key: FileKey) -> None:
        self._client.call("cleancache.invalidate_inode", pool_id=pool_id,
                          key=encode_file_key(key))

    def invalidate_fs(self, pool_id: int) -> None:
        self._client.call("cleancache.invalidate_fs", pool_id=pool_id)


class FrontswapClient:
    """The frontswap page API over the socket, named as :class:`~xentmem.guest.frontends.Frontswap`.

    ``init`` differs from the in-process one: the daemon creates the backing store itself
    (memory, or a file in its run directory), so the caller gives a size, not a store.
    """

    def __init__(self, client: ControlClient) -> None:
        self._client = client

    def init(self, pages: int, backing: str = "memory", swap_type: int | None = None) -> int:
        """Create a swap area; returns its swap type."""
        args: dict[str, Any] = {"pages": pages, "backing": backing}
        if swap_type is not None:
            args["type"] = swap_type
        return self._client.call("frontswap.init", **args)["type"]

    def store(self, swap_type: int, offset: int, page: bytes) -> int:
        """0 if tmem took the page, -1 if it went to the backing store (the kernel's answer)."""
        return self._client.call("frontswap.store", type=swap_type, offset=offset,
                                 data=encode_bytes(page))["rc"]

    def load(self, swap_type: int, offset: int) -> bytes | None:
        data = self._client.call("frontswap.load", type=swap_type, offset=offset)["data"]
        return None if data is None else protocol.decode_bytes(data)

    def invalidate_page(self, swap_type: int, offset: int) -> None:
        self._client.call("frontswap.invalidate_page", type=swap_type, offset=offset)

    def invalidate_area(self, swap_type: int) -> None:
        self._client.call("frontswap.invalidate_area", type=swap_type)

    def shrink(self, target_pages: int) -> int:
        return self._client.call("frontswap.shrink", target_pages=target_pages)["moved"]

    def curr_pages(self) -> int:
        return self._client.call("frontswap.curr_pages")["pages"]
