"""The host service's control interface: what ``xl tmem-*`` did, as JSON lines on a Unix socket.

One request per line, one answer per line, in order, on the same connection::

    {"v": 1, "id": 3, "op": "set", "args": {"domid": 5, "weight": 2}}
    {"v": 1, "id": 3, "ok": true, "result": {...}}
    {"v": 1, "id": 3, "ok": false, "error": {"code": "bad_args", "message": "..."}}

Ops (``domid`` is a domain id or ``"all"``, xl's ``-a``):

==============  =========================================  =================================
op              args                                       xl
==============  =========================================  =================================
``list``        ``domid`` (optional: every client)         ``tmem-list -l``
``freeze``      ``domid``                                  ``tmem-freeze``
``thaw``        ``domid``                                  ``tmem-thaw``
``set``         ``domid``, ``weight`` and/or ``compress``  ``tmem-set -w / -p``
``shared-auth`` ``domid``, ``uuid``, ``auth`` (bool)       ``tmem-shared-auth -u -A``
``freeable``    none                                       ``tmem-freeable``
==============  =========================================  =================================

``shared-auth`` for ``"all"`` switches the host-wide check itself (Xen's ``shared_auth``): with
``auth`` false any guest may join any shared pool, as before Xen 4.9.

:class:`ControlServer` is driven by the service's loop (no threads); :class:`HostControlClient`
is what the ``xentmem-hostd`` CLI uses.  Requests are untrusted and checked here: a bad request
gets an error answer and changes nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import uuid as uuid_mod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xentmem.errors import XentmemError
from xentmem.tmem.abi import PoolUuid

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DEFAULT_SOCKET = "/run/xentmem-hostd/control.sock"
MAX_LINE_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 16 * 1024 * 1024
#: How long the service spends sending one answer before it drops a client that does not read.
SEND_TIMEOUT_S = 2.0

BAD_REQUEST = "bad_request"
BAD_ARGS = "bad_args"
UNKNOWN_OP = "unknown_op"
NOT_FOUND = "not_found"
UNAVAILABLE = "unavailable"
TIMEOUT = "timeout"
INTERNAL = "internal"


class ControlError(XentmemError):
    """A control request failed; ``code`` is stable, ``message`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Target:
    """A domain id, or every client (``all``)."""

    domid: int | None

    @property
    def all(self) -> bool:
        return self.domid is None


def parse_target(untrusted: Any) -> Target:
    if untrusted == "all":
        return Target(None)
    if (
        isinstance(untrusted, bool)
        or not isinstance(untrusted, int)
        or not 0 <= untrusted <= 0x7FEF
    ):
        raise ControlError(BAD_ARGS, f'domid must be 0..32751 or "all", got {untrusted!r}')
    return Target(untrusted)


def parse_pool_uuid(untrusted: Any) -> PoolUuid:
    if not isinstance(untrusted, str):
        raise ControlError(BAD_ARGS, "uuid must be a string")
    try:
        return PoolUuid.from_uuid(uuid_mod.UUID(untrusted))
    except ValueError:
        raise ControlError(BAD_ARGS, f"{untrusted[:40]!r} is not a uuid") from None


def parse_bool(untrusted: Any, what: str) -> bool:
    if isinstance(untrusted, bool):
        return untrusted
    if untrusted in (0, 1):
        return bool(untrusted)
    raise ControlError(BAD_ARGS, f"{what} must be true/false or 0/1, got {untrusted!r}")


def encode_request(op: str, args: Mapping[str, Any], request_id: int) -> bytes:
    return (
        json.dumps(
            {"v": PROTOCOL_VERSION, "id": request_id, "op": op, "args": dict(args)},
            separators=(",", ":"),
        )
        + "\n"
    ).encode()


def decode_request(untrusted_line: bytes) -> tuple[Any, str, dict[str, Any]]:
    try:
        untrusted = json.loads(untrusted_line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ControlError(BAD_REQUEST, "a request is one JSON object per line") from None
    if not isinstance(untrusted, dict):
        raise ControlError(BAD_REQUEST, "a request is a JSON object")
    if untrusted.get("v") != PROTOCOL_VERSION:
        raise ControlError(BAD_REQUEST, f"protocol version must be {PROTOCOL_VERSION}")
    op, args = untrusted.get("op"), untrusted.get("args", {})
    if not isinstance(op, str) or not isinstance(args, dict):
        raise ControlError(BAD_REQUEST, "op must be a string and args an object")
    return untrusted.get("id"), op, args


def encode_answer(request_id: Any, result: Any = None, error: ControlError | None = None) -> bytes:
    if error is not None:
        body = {
            "v": PROTOCOL_VERSION,
            "id": request_id,
            "ok": False,
            "error": {"code": error.code, "message": error.message},
        }
    else:
        body = {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}
    return (json.dumps(body, separators=(",", ":"), default=str) + "\n").encode()


Handler = Callable[[str, dict[str, Any]], Any]


class _Peer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""


class ControlServer:
    """A listening socket whose clients the service's loop serves between xenstore events."""

    def __init__(self, path: str | os.PathLike[str], handler: Handler) -> None:
        self.path = Path(path)
        self.handler = handler
        self._listener: socket.socket | None = None
        self._peers: dict[int, _Peer] = {}

    def open(self) -> ControlServer:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        listener.listen(16)
        listener.setblocking(False)
        self._listener = listener
        return self

    def close(self) -> None:
        for peer in list(self._peers.values()):
            peer.sock.close()
        self._peers.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def filenos(self) -> list[int]:
        fds = [] if self._listener is None else [self._listener.fileno()]
        return fds + list(self._peers)

    def ready(self, fd: int) -> None:
        """Called by the loop when ``fd`` (one of :meth:`filenos`) is readable."""
        if self._listener is not None and fd == self._listener.fileno():
            with contextlib.suppress(BlockingIOError, InterruptedError):
                sock, _ = self._listener.accept()
                sock.settimeout(SEND_TIMEOUT_S)
                self._peers[sock.fileno()] = _Peer(sock)
            return
        peer = self._peers.get(fd)
        if peer is None:
            return
        try:
            data = peer.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        peer.buffer += data
        while b"\n" in peer.buffer:
            line, _, peer.buffer = peer.buffer.partition(b"\n")
            if not self._answer(peer, line):
                self._drop(fd)
                return
        if len(peer.buffer) > MAX_LINE_BYTES:
            self._send(
                peer,
                encode_answer(
                    None,
                    error=ControlError(BAD_REQUEST, f"request longer than {MAX_LINE_BYTES} bytes"),
                ),
            )
            self._drop(fd)

    def _answer(self, peer: _Peer, untrusted_line: bytes) -> bool:
        request_id: Any = None
        try:
            request_id, op, args = decode_request(untrusted_line)
            answer = encode_answer(request_id, self.handler(op, args))
        except ControlError as exc:
            answer = encode_answer(request_id, error=exc)
        except Exception as exc:  # a control request must never take the service down
            log.exception("control request failed")
            answer = encode_answer(request_id, error=ControlError(INTERNAL, str(exc)))
        return self._send(peer, answer)

    @staticmethod
    def _send(peer: _Peer, data: bytes) -> bool:
        try:
            peer.sock.sendall(data)
        except OSError:
            return False
        return True

    def _drop(self, fd: int) -> None:
        peer = self._peers.pop(fd, None)
        if peer is not None:
            peer.sock.close()


class HostControlClient:
    """The CLI's side: one connection, every wait bounded by ``timeout``."""

    def __init__(self, path: str | os.PathLike[str] | None = None, timeout: float = 5.0) -> None:
        self.path = (
            os.fspath(path) if path else (os.environ.get("XENTMEM_HOSTD_SOCKET") or DEFAULT_SOCKET)
        )
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> HostControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(self, op: str, **args: Any) -> Any:
        request_id = next(self._ids)
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                self._sock = sock
            self._sock.sendall(encode_request(op, args, request_id))
            while b"\n" not in self._buffer:
                if len(self._buffer) > MAX_ANSWER_BYTES:
                    raise ControlError(BAD_REQUEST, "answer too long")
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise ControlError(UNAVAILABLE, "xentmem-hostd closed the connection")
                self._buffer += chunk
        except socket.timeout:
            self.close()
            raise ControlError(
                TIMEOUT, f"no answer from xentmem-hostd at {self.path} within {self.timeout:g}s"
            ) from None
        except OSError as exc:
            self.close()
            raise ControlError(
                UNAVAILABLE, f"cannot reach xentmem-hostd at {self.path}: {exc.strerror or exc}"
            ) from None
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            untrusted = json.loads(line)
        except ValueError:
            raise ControlError(BAD_REQUEST, "xentmem-hostd answered something not JSON") from None
        if not isinstance(untrusted, dict) or untrusted.get("id") != request_id:
            raise ControlError(BAD_REQUEST, "answer does not match the request")
        if not untrusted.get("ok"):
            error = untrusted.get("error") or {}
            raise ControlError(str(error.get("code", INTERNAL)), str(error.get("message", "")))
        return untrusted.get("result")
