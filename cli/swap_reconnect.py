"""Bringing an NBD swap device's connection back after ``xentmemd`` died and restarted.

nbd-client (3.24, Debian 12) configures a device over the kernel's netlink interface and
exits at once; in that mode it neither keeps the connection alive (``-persist`` works only
with the ioctl interface, whose reconnect clears the device's queue with I/O errors) nor
sets the kernel's ``dead_conn_timeout``.  Both are a few netlink messages, so they are done
here (the ``nbd`` generic netlink family: ``include/uapi/linux/nbd-netlink.h``,
``drivers/block/nbd.c``):

* ``NBD_CMD_RECONFIGURE`` with ``NBD_ATTR_DEAD_CONN_TIMEOUT``: once the connection dies,
  the kernel holds new requests for that many seconds waiting for a new one, instead of
  failing them at once (``wait_for_reconnect``); requests in flight on the dead socket are
  sent again on the new one (``nbd_xmit_timeout``: the socket's cookie changed).
* ``NBD_CMD_RECONFIGURE`` with ``NBD_ATTR_SOCKETS``: a new socket, after this module's own
  handshake with the export (fixed newstyle, ``NBD_OPT_GO``: the NBD project's
  ``doc/proto.md``), replaces the dead one (``nbd_reconnect_socket``).  The kernel takes its
  own reference to the socket, so this process may close its descriptor after.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from xentmem.errors import XentmemError

# -- the handshake's numbers (doc/proto.md) -------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_GO = 7
REP_ACK, REP_INFO = 1, 3
REP_ERROR_BIT = 1 << 31
INFO_EXPORT = 0
MAX_REPLY = 1 << 16  # longer than any reply to NBD_OPT_GO the export sends

# -- generic netlink (linux/netlink.h, linux/genetlink.h) and the nbd family --------------------
NETLINK_GENERIC = 16
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 0x2
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
NLA_F_NESTED = 1 << 15
NBD_FAMILY, NBD_GENL_VERSION = "nbd", 1
NBD_CMD_RECONFIGURE = 3
NBD_ATTR_INDEX, NBD_ATTR_SOCKETS, NBD_ATTR_DEAD_CONN_TIMEOUT = 1, 7, 8
NBD_SOCK_ITEM, NBD_SOCK_FD = 1, 1
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_GENL = struct.Struct("=BBH")  # genlmsghdr: command, version, reserved


class ReconnectFailed(XentmemError):
    """The handshake or the kernel refused; the words say which and why."""


# -- the export's side ---------------------------------------------------------------------


@dataclass
class Connected:
    """A socket in transmission phase with the export, ready to hand to the kernel."""

    sock: socket.socket
    size: int
    flags: int


def _receive(sock: socket.socket, length: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            raise ReconnectFailed("the export closed the connection during the handshake")
        data += chunk
    return data


def handshake(path: str, name: str, timeout_s: float) -> Connected:
    """Connect to ``path`` and negotiate export ``name`` with NBD_OPT_GO (fixed newstyle)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(path)
        magic, option_magic, flags = struct.unpack(">QQH", _receive(sock, 18))
        if magic != NBDMAGIC or option_magic != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise ReconnectFailed(f"{path}: not a fixed-newstyle NBD server")
        sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        encoded = name.encode()
        data = struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", 0)
        sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        size = transmission = -1
        while True:
            magic, option, kind, length = struct.unpack(">QIII", _receive(sock, 20))
            if magic != REPLY_MAGIC or option != OPT_GO or length > MAX_REPLY:
                raise ReconnectFailed(f"{path}: a malformed reply to NBD_OPT_GO")
            payload = _receive(sock, length)
            if kind & REP_ERROR_BIT:
                raise ReconnectFailed(f"export {name!r}: refused ({kind & ~REP_ERROR_BIT}): "
                                      f"{payload.decode('utf-8', 'replace')[:200]}")
            if kind == REP_INFO and len(payload) >= 12 and \
                    struct.unpack_from(">H", payload)[0] == INFO_EXPORT:
                size, transmission = struct.unpack_from(">QH", payload, 2)
            elif kind == REP_ACK:
                break
        if size < 0:
            raise ReconnectFailed(f"export {name!r}: no NBD_INFO_EXPORT before the ACK")
        sock.settimeout(None)  # blocking again: the kernel's socket from now on
        return Connected(sock, size, transmission)
    except OSError as exc:
        sock.close()
        raise ReconnectFailed(f"{path}: {exc}") from None
    except BaseException:
        sock.close()
        raise


# -- the kernel's side ---------------------------------------------------------------------


def attribute(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + bytes(-length % 4)


def reconfigure_message(family: int, index: int, dead_conn_timeout_s: int | None = None,
                        fds: Sequence[int] = (), sequence: int = 1) -> bytes:
    """``NBD_CMD_RECONFIGURE`` of device ``index``: a dead-connection timeout, sockets, or
    both."""
    attributes = attribute(NBD_ATTR_INDEX, struct.pack("=I", index))
    if dead_conn_timeout_s is not None:
        attributes += attribute(NBD_ATTR_DEAD_CONN_TIMEOUT, struct.pack("=Q", dead_conn_timeout_s))
    if fds:
        items = b"".join(attribute(NBD_SOCK_ITEM | NLA_F_NESTED,
                                   attribute(NBD_SOCK_FD, struct.pack("=I", fd))) for fd in fds)
        attributes += attribute(NBD_ATTR_SOCKETS | NLA_F_NESTED, items)
    return _message(family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, attributes, sequence)


def _message(family: int, command: int, version: int, attributes: bytes, sequence: int) -> bytes:
    body = _GENL.pack(command, version, 0) + attributes
    return _HEADER.pack(_HEADER.size + len(body), family, NLM_F_REQUEST | NLM_F_ACK,
                        sequence, 0) + body


def parse_attributes(data: bytes) -> dict[int, bytes]:
    found = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & ~NLA_F_NESTED] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return found


class NbdNetlink:
    """The kernel's ``nbd`` generic netlink family, on one socket."""

    def __init__(self) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
            self.sock.bind((0, 0))
        except OSError as exc:
            raise ReconnectFailed(f"generic netlink: {exc}") from None
        self.sequence = 0
        try:
            self.family = self._family_id()
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> NbdNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _request(self, message: bytes) -> list[tuple[int, bytes]]:
        """Send one request; its replies (type, payload) up to the ACK, or the errno."""
        self.sock.sendall(message)
        sequence = _HEADER.unpack_from(message)[3]
        replies = []
        while True:
            data = self.sock.recv(65536)
            if len(data) < _HEADER.size:
                raise ReconnectFailed("a malformed netlink reply")
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _flags, seq, _port = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise ReconnectFailed("a malformed netlink reply")
                payload = data[offset + _HEADER.size:offset + length]
                offset += (length + 3) & ~3
                if seq != sequence:
                    continue
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise ReconnectFailed(f"the kernel refused: {os.strerror(code)} "
                                              f"({errno.errorcode.get(code, code)})")
                    return replies
                replies.append((kind, payload))

    def _next(self) -> int:
        self.sequence += 1
        return self.sequence

    def _family_id(self) -> int:
        name = attribute(CTRL_ATTR_FAMILY_NAME, NBD_FAMILY.encode() + b"\0")
        try:
            replies = self._request(_message(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, name,
                                             self._next()))
        except ReconnectFailed as exc:
            raise ReconnectFailed(f"no nbd netlink family (is the nbd module loaded?): "
                                  f"{exc}") from None
        for _kind, payload in replies:
            found = parse_attributes(payload[_GENL.size:])
            if CTRL_ATTR_FAMILY_ID in found:
                return int(struct.unpack_from("=H", found[CTRL_ATTR_FAMILY_ID])[0])
        raise ReconnectFailed("the nbd netlink family has no id")

    def reconfigure(self, index: int, dead_conn_timeout_s: int | None = None,
                    fds: Sequence[int] = ()) -> None:
        self._request(reconfigure_message(self.family, index, dead_conn_timeout_s, fds,
                                          self._next()))


def kernel_reconfigure(index: int, dead_conn_timeout_s: int | None = None,
                       fds: Sequence[int] = ()) -> None:
    """One ``NBD_CMD_RECONFIGURE`` on a fresh netlink socket (what the CLI needs)."""
    with NbdNetlink() as netlink:
        netlink.reconfigure(index, dead_conn_timeout_s, fds)
