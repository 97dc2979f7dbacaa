"""One end of a xenbus device, and the state rules both ends follow.

What Linux's ``struct xenbus_device`` and ``xenbus_client.c`` give a frontend and a backend
driver alike: the end's own area (``nodename``) and the other end's (``otherend``), the
``state`` node each writes, ``xenbus_switch_state``, ``xenbus_read_driver_state``,
``xenbus_dev_error`` and ``xenbus_dev_fatal``.  The guest's tmem front and the host's tmem
back subclass :class:`XenbusDevice`, so the rules are written once.
"""

from __future__ import annotations

import logging
import re

from xentmem.tmem.abi import XenbusState
from xentmem.xenbus.xs import XsError, XsSession

log = logging.getLogger(__name__)

#: The node of each area that holds its end's XenbusState, in decimal.
STATE = "state"
#: ``xenbus_dev_error``'s node: ``"<errno> <message>"``.
ERROR_NODE = "error"
_STATE_RE = re.compile(rb"[0-9]{1,10}")
#: What an ``error`` node may not hold: anything but printable ASCII.
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def parse_state(untrusted: bytes | None) -> XenbusState:
    """A state read from the other end: unreadable or nonsense is Unknown, as
    ``xenbus_read_driver_state`` has it."""
    text = b"" if untrusted is None else untrusted.strip(b"\x00")
    if not _STATE_RE.fullmatch(text) or int(text) > XenbusState.RECONFIGURED:
        return XenbusState.UNKNOWN
    return XenbusState(int(text))


class XenbusDevice:
    """One end of a device: its area, the other end's area, and its own state."""

    def __init__(self, xs: XsSession, nodename: str = "", otherend: str = "") -> None:
        self.xs = xs
        self.nodename = nodename
        self.otherend = otherend
        self.state = XenbusState.UNKNOWN
        self.otherend_state = XenbusState.UNKNOWN

    def read_state(self, area: str) -> XenbusState:
        """The state of ``area`` (this end's or the other's), Unknown if unreadable."""
        return parse_state(self.xs.read_optional(f"{area}/{STATE}"))

    def read_otherend_state(self) -> XenbusState:
        self.otherend_state = self.read_state(self.otherend)
        return self.otherend_state

    def switch_state(self, state: XenbusState) -> None:
        """``xenbus_switch_state``: nothing if unchanged, else a transaction that never
        recreates a vanished node (the other end, or the toolstack, removed the device)."""
        if state == self.state:
            return
        path = f"{self.nodename}/{STATE}"

        def body(tx: int) -> None:
            if self.xs.read_optional(path, tx=tx) is None:
                raise XsError("ENOENT", f"{path} vanished; the device was removed")
            self.xs.write(path, str(int(state)).encode(), tx=tx)

        self.xs.transaction(body)
        log.debug("%s: %s -> %s", self.nodename, self.state.strstate(), state.strstate())
        self.state = state

    def dev_error(self, code: int, message: str) -> None:
        """``xenbus_dev_error``: say why in this end's ``error`` node (and the log).

        The message may quote what the other end wrote, and a value is written only as
        printable ASCII (:class:`~xentmem.xenbus.xs.XsSession` refuses anything else), so
        anything else in it becomes ``?``: the ``error`` node is written whatever it says."""
        message = _UNPRINTABLE.sub("?", message)
        log.error("%s: %s", self.nodename, message)
        self.xs.write(f"{self.nodename}/{ERROR_NODE}", f"{code} {message}".encode())

    def dev_fatal(self, code: int, message: str) -> None:
        """``xenbus_dev_fatal``: :meth:`dev_error`, then Closing."""
        self.dev_error(code, message)
        self.switch_state(XenbusState.CLOSING)

    def read_error(self, area: str) -> str:
        """The ``error`` node of ``area``, untrusted, shortened for a message."""
        untrusted = self.xs.read_optional(f"{area}/{ERROR_NODE}")
        return (untrusted or b"no reason given")[:200].decode("ascii", "replace")
