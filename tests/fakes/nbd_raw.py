"""A bare NBD client for the requests libnbd will not send (bad magic, unaligned or
oversized requests, half a payload, unknown options and flags).

Its numbers are written out from the NBD project's ``doc/proto.md``, not imported from the
server's ``proto.py``, so a mistake there is not repeated here.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
#: Every wait for the server: generous (a busy CI machine), and only ever a bound.
TIMEOUT_S = 60.0


class RawClient:
    def __init__(self, path: Path | str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(str(path))

    def recv_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return bytes(data)

    def greeting(self) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        return flags

    def start(self, client_flags: int = 3) -> None:
        self.greeting()
        self.sock.sendall(struct.pack(">I", client_flags))

    def option(self, option: int, data: bytes = b"", magic: int = IHAVEOPT) -> None:
        self.sock.sendall(struct.pack(">QII", magic, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == REPLY_MAGIC
        return option, reply, self.recv_exact(length)

    def replies_until_final(self) -> list[tuple[int, int, bytes]]:
        """Option replies up to the final one (an ACK or an error)."""
        replies = []
        while True:
            replies.append(self.option_reply())
            if replies[-1][1] != 2 and replies[-1][1] != 3:  # not SERVER, not INFO
                return replies

    def go(self, name: str, requests: tuple[int, ...] = (3,)) -> list[tuple[int, int, bytes]]:
        raw = name.encode()
        data = (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(requests))
                + struct.pack(f">{len(requests)}H", *requests))
        self.option(7, data)
        return self.replies_until_final()

    def connect(self, name: str) -> None:
        self.start()
        final = self.go(name)[-1]
        assert final[1] == 1, final

    def request(self, cmd: int, offset: int, length: int, handle: int = 1, flags: int = 0,
                payload: bytes = b"", magic: int = REQUEST_MAGIC) -> None:
        self.sock.sendall(struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length)
                          + payload)

    def reply(self) -> tuple[int, int]:
        """(error, handle) of a simple reply."""
        magic, error, handle = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC
        return error, handle

    def closed_by_server(self) -> bool:
        """True once the server closed the connection (no more bytes come)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()
