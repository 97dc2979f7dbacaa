"""Many xenstore connections over one guest ring, as Linux's xenbus device gives a domU.

A real guest has one xenstore ring, and every ``open("/dev/xen/xenbus")`` in it is a
connection of its own: the kernel's ``xenbus_dev_frontend`` gives each open file its own
request ids, keeps the transactions it started, tags the watches it registers so that their
events reach that file alone, and on close removes its watches and aborts its transactions.
The ring proxy (``xenstored_peer/xs_ring_proxy.py``) serves one client at a time (it is the
ring), so :class:`XenbusMux` stands in front of it and does what the kernel does: a guest
backend that opens several connections (the ``xen`` backend's session and its writer) then
works against the real C and OCaml daemons exactly as in a domU.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

HEADER = struct.Struct("<IIII")  # op, req_id, tx_id, length
WATCH, UNWATCH, TRANSACTION_START, TRANSACTION_END, WATCH_EVENT, ERROR = 4, 5, 6, 7, 15, 16
NUL = b"\x00"


@dataclass
class _Client:
    sock: socket.socket
    cid: int
    buffer: bytes = b""
    watches: set[tuple[bytes, bytes]] = field(default_factory=set)  # (path, tagged token)
    transactions: set[int] = field(default_factory=set)


class XenbusMux:
    """Accepts any number of clients at ``listen_path``; one connection to ``upstream``."""

    def __init__(self, upstream: Path, listen_path: Path) -> None:
        self.upstream_path = upstream
        self.listen_path = listen_path
        self._clients: dict[int, _Client] = {}
        self._by_fd: dict[int, _Client] = {}
        #: Our request id -> (client id or None for our own clean-up, its id, its op).
        self._pending: dict[int, tuple[int | None, int, int]] = {}
        self._next_req = 0
        self._next_cid = 0
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="xenbus-mux", daemon=True)

    def start(self) -> XenbusMux:
        self._up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._up.connect(str(self.upstream_path))
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.listen_path))
        self._listener.listen(16)
        self._up_buffer = b""
        self._thread.start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(5)
        for client in list(self._clients.values()):
            client.sock.close()
        self._listener.close()
        self._up.close()
        with contextlib.suppress(FileNotFoundError):
            self.listen_path.unlink()
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- the loop -------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while True:
                fds = [self._listener, self._up, self._stop_r, *self._by_fd]
                readable, _, _ = select.select(fds, [], [])
                if self._stop_r in readable:
                    return
                if self._listener in readable:
                    self._accept()
                if self._up in readable and not self._from_upstream():
                    return
                for fd in readable:
                    client = self._by_fd.get(fd) if isinstance(fd, int) else None
                    if client is not None:
                        self._from_client(client)
        finally:
            for client in list(self._clients.values()):
                client.sock.close()

    def _accept(self) -> None:
        sock, _ = self._listener.accept()
        self._next_cid += 1
        client = _Client(sock, self._next_cid)
        self._clients[client.cid] = client
        self._by_fd[sock.fileno()] = client

    def _from_client(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._release(client)
            return
        client.buffer += data
        while len(client.buffer) >= HEADER.size:
            op, req_id, tx_id, length = HEADER.unpack_from(client.buffer)
            if len(client.buffer) < HEADER.size + length:
                break
            payload = client.buffer[HEADER.size:HEADER.size + length]
            client.buffer = client.buffer[HEADER.size + length:]
            if op in (WATCH, UNWATCH):
                path, _, rest = payload.partition(NUL)
                token = rest.split(NUL, 1)[0]
                tagged = b"%d/" % client.cid + token
                payload = path + NUL + tagged + NUL
                if op == WATCH:
                    client.watches.add((path, tagged))
                else:
                    client.watches.discard((path, tagged))
            self._forward(client.cid, op, req_id, tx_id, payload)

    def _forward(self, cid: int | None, op: int, req_id: int, tx_id: int,
                 payload: bytes) -> None:
        self._next_req = self._next_req % 0xFFFFFFF0 + 1
        self._pending[self._next_req] = (cid, req_id, op)
        self._up.sendall(HEADER.pack(op, self._next_req, tx_id, len(payload)) + payload)

    def _from_upstream(self) -> bool:
        data = self._up.recv(65536)
        if not data:
            return False
        self._up_buffer += data
        while len(self._up_buffer) >= HEADER.size:
            op, req_id, tx_id, length = HEADER.unpack_from(self._up_buffer)
            if len(self._up_buffer) < HEADER.size + length:
                break
            payload = self._up_buffer[HEADER.size:HEADER.size + length]
            self._up_buffer = self._up_buffer[HEADER.size + length:]
            self._to_client(op, req_id, tx_id, payload)
        return True

    def _to_client(self, op: int, req_id: int, tx_id: int, payload: bytes) -> None:
        if op == WATCH_EVENT:
            path, _, rest = payload.partition(NUL)
            tagged = rest.split(NUL, 1)[0]
            cid_text, _, token = tagged.partition(b"/")
            client = self._clients.get(int(cid_text)) if cid_text.isdigit() else None
            if client is not None:
                self._send(client, op, 0, 0, path + NUL + token + NUL)
            return
        cid, their_id, their_op = self._pending.pop(req_id, (None, 0, 0))
        client = self._clients.get(cid) if cid is not None else None
        if client is None:
            return  # an answer to our own clean-up, or to a client gone since
        if their_op == TRANSACTION_START and op == TRANSACTION_START:
            with contextlib.suppress(ValueError):
                client.transactions.add(int(payload.rstrip(NUL)))
        elif their_op == TRANSACTION_END:
            client.transactions.discard(tx_id)
        self._send(client, op, their_id, tx_id, payload)

    def _send(self, client: _Client, op: int, req_id: int, tx_id: int, payload: bytes) -> None:
        try:
            client.sock.sendall(HEADER.pack(op, req_id, tx_id, len(payload)) + payload)
        except OSError:
            self._release(client)

    def _release(self, client: _Client) -> None:
        """The file is closed: its watches go and its transactions end, as in the kernel."""
        if self._clients.pop(client.cid, None) is None:
            return
        self._by_fd.pop(client.sock.fileno(), None)
        client.sock.close()
        for path, tagged in client.watches:
            self._forward(None, UNWATCH, 0, 0, path + NUL + tagged + NUL)
        for tx_id in client.transactions:
            self._forward(None, TRANSACTION_END, 0, tx_id, b"F" + NUL)
