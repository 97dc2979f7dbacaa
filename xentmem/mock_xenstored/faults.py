"""Fault injection for tests: a domain's requests swallowed, its replies delayed or spoilt."""

from __future__ import annotations

import enum
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from xentmem.mock_xenstored.wire import Packet, XsOp


class Malformation(enum.Enum):
    """Ways :class:`Faults` can spoil a reply, each a trap a careful client must survive."""

    #: The reply echoes a request id the client never used (pyxs's router thread dies).
    WRONG_REQ_ID = "wrong-req-id"
    #: The reply carries another op code than the request's.
    WRONG_OP = "wrong-op"
    #: An ERROR reply with a name no daemon sends.
    UNKNOWN_ERROR = "unknown-error"
    #: The payload is replaced by bytes that are not ASCII.
    GARBAGE_PAYLOAD = "garbage-payload"
    #: The header announces more payload than follows; the client waits for the rest.
    TRUNCATED = "truncated"
    #: The header announces, and the server sends, 5000 payload bytes (over the limit).
    OVERSIZED = "oversized"
    #: The server closes the connection instead of answering.
    CLOSE = "close"


@dataclass
class Faults:
    """Explicit, per-domain fault injection (domid 0 is dom0's socket).  Thread-safe
    through the server's lock; effective from the next request on."""

    _lock: threading.RLock = field(repr=False)
    _wake: Callable[[], None] = field(repr=False)
    muted: set[int] = field(default_factory=set)
    delays: dict[int, float] = field(default_factory=dict)
    malformed: dict[int, deque[Malformation]] = field(default_factory=dict)

    def mute(self, domid: int) -> None:
        """Swallow every request from ``domid`` unexecuted and send it nothing (a hung
        daemon, from that domain's point of view)."""
        with self._lock:
            self.muted.add(domid)

    def unmute(self, domid: int) -> None:
        with self._lock:
            self.muted.discard(domid)

    def delay(self, domid: int, seconds: float) -> None:
        """Hold back every reply and event to ``domid`` for ``seconds`` (0 to stop)."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        with self._lock:
            if seconds:
                self.delays[domid] = seconds
            else:
                self.delays.pop(domid, None)

    def malform_next(self, domid: int, kind: Malformation, count: int = 1) -> None:
        """Spoil the next ``count`` replies to ``domid`` (the requests still execute)."""
        with self._lock:
            self.malformed.setdefault(domid, deque()).extend([kind] * count)

    def next_malformation(self, domid: int) -> Malformation | None:
        """The spoiling the next reply to ``domid`` is due for, taken off the queue."""
        queue = self.malformed.get(domid)
        return queue.popleft() if queue else None

    def clear(self) -> None:
        with self._lock:
            self.muted.clear()
            self.delays.clear()
            self.malformed.clear()
        self._wake()


def malformed_bytes(packet: Packet, kind: Malformation) -> bytes | None:
    """What goes on the wire instead of ``packet``; None for :attr:`Malformation.CLOSE`."""
    if kind is Malformation.WRONG_REQ_ID:
        return Packet(packet.op, (packet.req_id + 1) & 0xFFFFFFFF, packet.tx_id,
                      packet.payload).encode()
    if kind is Malformation.WRONG_OP:
        other = XsOp.DIRECTORY if packet.op != XsOp.DIRECTORY else XsOp.READ
        return Packet(int(other), packet.req_id, packet.tx_id, packet.payload).encode()
    if kind is Malformation.UNKNOWN_ERROR:
        return Packet(int(XsOp.ERROR), packet.req_id, packet.tx_id, b"EWHATEVER\0").encode()
    if kind is Malformation.GARBAGE_PAYLOAD:
        payload = bytes(range(0x80, 0x100)) + b"\n\t"
        return Packet(packet.op, packet.req_id, packet.tx_id, payload).encode()
    if kind is Malformation.TRUNCATED:
        longer = Packet(packet.op, packet.req_id, packet.tx_id, packet.payload + bytes(64))
        return longer.encode()[:16] + packet.payload
    if kind is Malformation.OVERSIZED:
        payload = b"x" * 5000
        header = Packet(packet.op, packet.req_id, packet.tx_id, b"").encode()[:12]
        return header + len(payload).to_bytes(4, "little") + payload
    return None
