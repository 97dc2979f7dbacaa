"""The NBD server: a listener (a Unix socket; TCP on loopback only when asked) and one
thread per connection, speaking the fixed newstyle handshake then simple replies.

A connection reads requests into one buffer allocated when it is accepted (the longest
request fits), carries each out in order against its :class:`Export`, and gathers the
replies in a second buffer allocated then too, sending them when it would otherwise wait
for the client: with many requests in flight (fio's iodepth, the kernel's queue) one
``recv`` and one ``send`` serve many.  Each connection's thread is marked an I/O flusher
(``resident.py``): it serves swap, so its allocations must not wait on swap.  A
write is applied only once its whole payload has arrived, so a client that vanishes
mid-request changes nothing.  A violation the protocol lets a server end the session for
(a bad magic, unknown client flags, a payload or option large enough to be a denial of
service) closes that connection only; the export and the other connections go on.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import selectors
import socket
import stat
import threading
from pathlib import Path
from typing import Any, Protocol

from xentmem.clock import Clock, SystemClock
from xentmem.guestd.nbd import proto
from xentmem.guestd.nbd.export import Export, NbdError
from xentmem.guestd.nbd.fanout import PageFanout
from xentmem.guestd.nbd.resident import Residency

log = logging.getLogger(__name__)

#: Connections at once (over all exports); one more is closed at accept.
MAX_CONNECTIONS = 64
#: How long a client may take over the whole handshake, counted from its start (a
#: transmission has no limit: the kernel's connection idles as long as swap does).
HANDSHAKE_TIMEOUT_S = 30.0
#: Options one connection may send before we take it for a denial of service.
MAX_OPTIONS = 1024
#: The input buffer: the longest request (header and payload) and room to spare.
BUFFER_BYTES = proto.MAX_BLOCK + 64 * 1024
#: The output buffer: replies are gathered up to this many bytes (a longer read's data is
#: sent straight from the bytes the export returned).
OUT_BYTES = 256 * 1024
_REQUEST_SIZE = proto.REQUEST.size
_unpack_request = proto.REQUEST.unpack_from
_REPLY_SIZE = proto.SIMPLE_REPLY.size
_pack_reply = proto.SIMPLE_REPLY.pack_into
#: How long stop() waits for connections to finish their request before cutting them.
STOP_GRACE_S = 5.0


class ExportTable(Protocol):
    """What the server needs to know of the exports: look one up, list them."""

    def get(self, name: str) -> Export | None: ...

    def names(self) -> list[str]: ...


class HardDisconnect(Exception):
    """The protocol lets us (or makes us) end the session: close the connection."""


class _Stream(Protocol):
    """What :class:`_Wire` needs of its socket."""

    def recv_into(self, buffer: memoryview) -> int: ...

    def sendall(self, data: bytes | bytearray | memoryview) -> None: ...


class _Handshaking:
    """A connection's socket during the handshake: each receive and send may wait only for
    what is left of the whole handshake's time, so a client that trickles its bytes cannot
    hold a connection (one of ``max_connections``) past the limit."""

    def __init__(self, sock: socket.socket, clock: Clock, limit_s: float) -> None:
        self.sock = sock
        self.clock = clock
        self.limit_s = limit_s
        self.deadline = clock.monotonic() + limit_s

    def _time_left(self) -> None:
        """The socket's timeout set to the time left; TimeoutError (as the socket's own)
        once there is none."""
        left = self.deadline - self.clock.monotonic()
        if left <= 0:
            raise TimeoutError(f"the handshake took longer than {self.limit_s:g}s")
        self.sock.settimeout(left)

    def recv_into(self, buffer: memoryview) -> int:
        self._time_left()
        return self.sock.recv_into(buffer)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        self._time_left()
        self.sock.sendall(data)


class _Wire:
    """A connection's socket with its input buffer and its pending replies."""

    def __init__(self, sock: _Stream) -> None:
        self.sock = sock
        self._buf = bytearray(BUFFER_BYTES)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._out = memoryview(bytearray(OUT_BYTES))
        self._out_end = 0

    def request(self) -> tuple[int, int, int, int, int, int]:
        """The next request header, unpacked: (magic, flags, type, handle, offset, length).
        Read in place (no view, no copy): this and :meth:`reply` are every request's path."""
        start = self._start
        if self._end - start < _REQUEST_SIZE:
            self._fill(_REQUEST_SIZE)
            start = self._start
        self._start = start + _REQUEST_SIZE
        return _unpack_request(self._buf, start)

    def reply(self, error: int, handle: int) -> None:
        """Gather a simple reply, packed in place."""
        end = self._out_end
        if end + _REPLY_SIZE > OUT_BYTES:
            self.flush()
            end = 0
        _pack_reply(self._out, end, proto.SIMPLE_REPLY_MAGIC, error, handle)
        self._out_end = end + _REPLY_SIZE

    def take(self, n: int) -> memoryview:
        """The next ``n`` bytes (valid until the next take); EOFError if the client left."""
        if self._end - self._start < n:
            self._fill(n)
        view = self._view[self._start:self._start + n]
        self._start += n
        return view

    def skip(self, n: int) -> None:
        """Read and drop ``n`` bytes, a buffer at a time."""
        while n:
            chunk = min(n, BUFFER_BYTES // 2)
            self.take(chunk)
            n -= chunk

    def _fill(self, n: int) -> None:
        if n > BUFFER_BYTES:
            raise HardDisconnect(f"{n} bytes do not fit the buffer")
        if BUFFER_BYTES - self._start < n:  # compact: the unread bytes to the front
            kept = self._end - self._start
            self._buf[:kept] = self._buf[self._start:self._end]
            self._start, self._end = 0, kept
        while self._end - self._start < n:
            self.flush()  # about to wait for the client: answer what it already asked
            got = self.sock.recv_into(self._view[self._end:])
            if not got:
                raise EOFError("the client closed the connection")
            self._end += got

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Gather ``data``; what does not fit goes out first (and data longer than the whole
        buffer goes out as it is)."""
        n = len(data)
        if self._out_end + n > OUT_BYTES:
            self.flush()
            if n > OUT_BYTES:
                self.sock.sendall(data)
                return
        self._out[self._out_end:self._out_end + n] = data
        self._out_end += n

    def flush(self) -> None:
        if self._out_end:
            self.sock.sendall(self._out[:self._out_end])
            self._out_end = 0

    def discard(self) -> None:
        """Drop the gathered replies unsent."""
        self._out_end = 0


class _Connection:
    def __init__(self, server: NbdServer, sock: socket.socket, peer: str, number: int) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.number = number
        self.export: Export | None = None
        self.wire = _Wire(sock)  # through _Handshaking until the handshake is over
        self.no_zeroes = False
        self.thread = threading.Thread(target=self.run, name=f"nbd-conn-{number}",
                                       daemon=True)

    def run(self) -> None:
        try:
            if self.server.residency is not None:
                self.server.residency.serving_thread()
            self.wire.sock = _Handshaking(self.sock, self.server.clock,
                                          self.server.handshake_timeout_s)
            export = self._handshake()
            if export is not None:
                self.wire.sock = self.sock
                self.sock.settimeout(None)
                self._transmit(export)
        except HardDisconnect as exc:
            log.warning("nbd connection %d (%s): closed: %s", self.number, self.peer, exc)
        except (EOFError, OSError) as exc:
            log.debug("nbd connection %d (%s): gone: %s", self.number, self.peer, exc)
        except Exception:
            log.exception("nbd connection %d (%s): failed", self.number, self.peer)
        finally:
            with contextlib.suppress(OSError):
                self.wire.flush()
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.server.gone(self)

    # -- handshake ------------------------------------------------------------------------------

    def _handshake(self) -> Export | None:
        """Greeting, client flags, options until EXPORT_NAME or a successful GO (the export)
        or ABORT (None)."""
        wire = self.wire
        wire.send(proto.GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, proto.HANDSHAKE_FLAGS))
        (untrusted_client_flags,) = proto.CLIENT_FLAGS.unpack(
            wire.take(proto.CLIENT_FLAGS.size))
        if untrusted_client_flags & ~proto.CLIENT_FLAGS_KNOWN:
            raise HardDisconnect(f"unknown client flags {untrusted_client_flags:#x}")
        self.no_zeroes = bool(untrusted_client_flags & proto.FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            # The option's number is only compared (an unknown one is answered UNSUP).
            untrusted_magic, option, untrusted_length = proto.OPTION.unpack(
                wire.take(proto.OPTION.size))
            if untrusted_magic != proto.IHAVEOPT:
                raise HardDisconnect(f"option magic {untrusted_magic:#x}")
            if untrusted_length > proto.MAX_OPTION_DATA:
                raise HardDisconnect(f"option {option} with {untrusted_length} bytes of data")
            untrusted_data = bytes(wire.take(untrusted_length))
            export, done = self._option(option, untrusted_data)
            if done:
                if export is not None:  # attached before the client hears it may start
                    try:
                        self.server.attach(self, export)
                    except HardDisconnect:
                        wire.discard()  # the ACK must not go out: the export is going
                        raise
                wire.flush()
                return export
        raise HardDisconnect(f"more than {MAX_OPTIONS} options")

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self.wire.send(proto.option_reply(option, reply, data))

    def _error(self, option: int, reply: int, message: str) -> None:
        self._reply(option, reply, proto.error_message(message))

    def _option(self, option: int, untrusted_data: bytes) -> tuple[Export | None, bool]:
        """Answer one option; (the export, True) to enter transmission, (None, True) to
        close after an abort, (None, False) to go on haggling.  ``untrusted_data`` as the
        client sent it: each option parses (checks) its own."""
        if option == proto.OPT_ABORT:  # data, if any, is ignored
            self._reply(option, proto.REP_ACK)
            return None, True
        if option == proto.OPT_EXPORT_NAME:
            try:
                name = proto.decode_string(untrusted_data)
            except proto.OptionInvalid as exc:
                raise HardDisconnect(f"NBD_OPT_EXPORT_NAME: {exc}") from None
            export = self._lookup(name)
            if export is None:  # cannot return an error: the session MUST end
                raise HardDisconnect(f"NBD_OPT_EXPORT_NAME of unknown export {name!r}")
            reply = proto.EXPORT_NAME_REPLY.pack(export.size, export.flags)
            self.wire.send(reply if self.no_zeroes else reply + proto.ZEROES_124)
            return export, True
        if self.server.stopping:
            self._error(option, proto.REP_ERR_SHUTDOWN, "the server is shutting down")
            return None, False
        if option == proto.OPT_LIST:
            if untrusted_data:
                self._error(option, proto.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None, False
            for name in self.server.exports.names():
                self._reply(option, proto.REP_SERVER, proto.server_entry(name))
            self._reply(option, proto.REP_ACK)
            return None, False
        if option in (proto.OPT_INFO, proto.OPT_GO):
            try:
                request = proto.parse_info_request(untrusted_data)
            except proto.OptionInvalid as exc:
                self._error(option, proto.REP_ERR_INVALID, str(exc))
                return None, False
            export = self._lookup(request.name)
            if export is None:
                self._error(option, proto.REP_ERR_UNKNOWN, f"no export {request.name!r}")
                return None, False
            self._reply(option, proto.REP_INFO, proto.info_export(export.size, export.flags))
            # Sent whether asked or not (a server MAY): our constraints are not the defaults.
            self._reply(option, proto.REP_INFO, proto.info_block_size())
            if proto.INFO_NAME in request.requests:
                self._reply(option, proto.REP_INFO, proto.info_string(proto.INFO_NAME,
                                                                      export.name))
            if proto.INFO_DESCRIPTION in request.requests:
                self._reply(option, proto.REP_INFO, proto.info_string(
                    proto.INFO_DESCRIPTION, export.description))
            self._reply(option, proto.REP_ACK)
            return (export, True) if option == proto.OPT_GO else (None, False)
        # STARTTLS (NOTLS mode), structured replies, meta contexts and anything unknown.
        self._error(option, proto.REP_ERR_UNSUP, f"option {option} is not supported")
        return None, False

    def _lookup(self, name: str) -> Export | None:
        export = self.server.exports.get(name)
        return None if export is None or export.closing else export

    # -- transmission ---------------------------------------------------------------------------

    def _transmit(self, export: Export) -> None:
        wire = self.wire
        request, reply = wire.request, wire.reply
        fanout = self.server.fanout
        while True:
            # The handle is opaque (only sent back); the rest is untrusted until
            # export.check passed it (the command: until compared with one we serve).
            (untrusted_magic, untrusted_flags, untrusted_cmd, handle, untrusted_offset,
             untrusted_length) = request()
            if untrusted_magic != proto.REQUEST_MAGIC:
                raise HardDisconnect(f"request magic {untrusted_magic:#x}")
            try:
                if untrusted_cmd == proto.CMD_WRITE:
                    if untrusted_length >= proto.DOS_PAYLOAD:
                        raise HardDisconnect(f"a write of {untrusted_length} bytes")
                    try:
                        export.check(proto.CMD_WRITE, untrusted_flags, untrusted_offset,
                                     untrusted_length)
                    except NbdError:
                        # The payload is in the stream (less than DOS_PAYLOAD): drop it.
                        wire.skip(untrusted_length)
                        raise
                    flags, offset, length = untrusted_flags, untrusted_offset, untrusted_length
                    # Applied only once the whole payload is here (take waits for it).
                    export.write(offset, wire.take(length), flags & proto.CMD_FLAG_FUA,
                                 fanout)
                elif untrusted_cmd == proto.CMD_READ:
                    export.check(proto.CMD_READ, untrusted_flags, untrusted_offset,
                                 untrusted_length)
                    offset, length = untrusted_offset, untrusted_length
                    data = export.read(offset, length, fanout)
                    reply(0, handle)
                    wire.send(data)
                    continue
                elif untrusted_cmd == proto.CMD_DISC:  # every earlier request is answered
                    return
                else:
                    export.check(untrusted_cmd, untrusted_flags, untrusted_offset,
                                 untrusted_length)
                    cmd, flags, offset, length = (untrusted_cmd, untrusted_flags,
                                                  untrusted_offset, untrusted_length)
                    if cmd == proto.CMD_TRIM:
                        export.trim(offset, length, bool(flags & proto.CMD_FLAG_FUA))
                    elif cmd == proto.CMD_WRITE_ZEROES:
                        export.write_zeroes(offset, length, flags)
                    elif cmd == proto.CMD_FLUSH:
                        export.flush()
            except NbdError as exc:
                self._refused(export, untrusted_cmd, handle, exc)
                continue
            reply(0, handle)

    def _refused(self, export: Export, untrusted_cmd: int, handle: int,
                 exc: NbdError) -> None:
        export.count(f"refused_{exc.name}")
        log.debug("nbd export %s: command %d refused (%s): %s", export.name, untrusted_cmd,
                  exc.name, exc)
        self.wire.reply(exc.error, handle)

    def stop_reading(self) -> None:
        """Wake the thread: its next wait for a request sees the end of the stream."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class NbdServer:
    """Listeners and connections over one table of exports."""

    def __init__(self, exports: ExportTable, *, max_connections: int = MAX_CONNECTIONS,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 residency: Residency | None = None, clock: Clock | None = None) -> None:
        """``residency``: marks each connection's thread an I/O flusher (None: not marked,
        for a server that serves no swap); ``clock``: what the handshake's limit is counted
        on (the real clock unless a test says otherwise)."""
        self.exports = exports
        self.residency = residency
        self.max_connections = max_connections
        self.handshake_timeout_s = handshake_timeout_s
        self.clock: Clock = clock or SystemClock()
        self.stopping = False
        self._listeners: list[socket.socket] = []
        self.addresses: list[str] = []
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._number = 0
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        #: Threads that carry a request's pages side by side (made by the first attach).
        self.fanout = PageFanout(on_start=residency.serving_thread if residency else None)
        #: Signalled whenever a connection ends (tests and stop() wait on it).
        self.changed = threading.Condition(self._lock)

    # -- listening ------------------------------------------------------------------------------

    def listen_unix(self, path: Path | str) -> Path:
        """Bind a Unix socket (mode 0600); a stale socket file there is replaced."""
        path = Path(path)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        self._listeners.append(sock)
        self.addresses.append(f"unix:{path}")
        return path

    def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Bind TCP on a loopback address only (ValueError otherwise); port 0 picks one."""
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"NBD over TCP listens on loopback only, not {host}")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        bound = sock.getsockname()[:2]
        self._listeners.append(sock)
        self.addresses.append(f"tcp:{bound[0]}:{bound[1]}")
        return bound[0], bound[1]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="nbd-accept",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        if self.residency is not None:  # a connection's buffers are allocated here
            self.residency.serving_thread()
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            for sock in self._listeners:
                selector.register(sock, selectors.EVENT_READ)
            while not self.stopping:
                for key, _ in selector.select():
                    if key.fileobj == self._wake_r:
                        return
                    assert isinstance(key.fileobj, socket.socket)
                    self._accept(key.fileobj)

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, address = listener.accept()
        except OSError as exc:
            log.warning("nbd: accept failed: %s", exc)
            return
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self.stopping or len(self._connections) >= self.max_connections:
                log.warning("nbd: %d connections already: one more refused",
                            len(self._connections))
                sock.close()
                return
            self._number += 1
            conn = _Connection(self, sock, str(address) or "unix", self._number)
            self._connections.add(conn)
        conn.thread.start()

    # -- connections ----------------------------------------------------------------------------

    def attach(self, conn: _Connection, export: Export) -> None:
        """Under the lock :meth:`detach` takes: an export being removed either sees this
        connection, or this connection sees it closing."""
        with self._lock:
            if export.closing:
                raise HardDisconnect(f"export {export.name} went away during the handshake")
            conn.export = export
        self.fanout.start()  # once, before the first request: made now, not under pressure
        export.count("connections")

    def gone(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
            self.changed.notify_all()

    def connections(self, export: Export | None = None) -> int:
        with self._lock:
            return sum(1 for c in self._connections if export is None or c.export is export)

    def detach(self, export: Export, timeout_s: float = STOP_GRACE_S) -> bool:
        """End every connection to ``export`` (each finishes the request it is on first);
        True once none is left."""
        return self._end(lambda c: c.export is export, timeout_s)

    def _end(self, which: Any, timeout_s: float) -> bool:
        with self._lock:
            chosen = [c for c in self._connections if which(c)]
        for conn in chosen:
            conn.stop_reading()
        with self._lock:
            if self.changed.wait_for(lambda: not any(which(c) for c in self._connections),
                                     timeout_s):
                return True
            chosen = [c for c in self._connections if which(c)]
        for conn in chosen:  # stuck sending to a client that does not read
            conn.cut()
        with self._lock:
            return self.changed.wait_for(
                lambda: not any(which(c) for c in self._connections), timeout_s)

    def stop(self, timeout_s: float = STOP_GRACE_S) -> bool:
        """Stop listening, end every connection; True if all ended in time.  Idempotent."""
        if self._wake_w < 0:
            return self._end(lambda c: True, timeout_s)
        self.stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout_s)
        for sock in self._listeners:
            if sock.family == socket.AF_UNIX:
                with contextlib.suppress(OSError, TypeError):
                    path = sock.getsockname()
                    os.unlink(path)
            sock.close()
        self._listeners.clear()
        ended = self._end(lambda c: True, timeout_s)
        if ended:  # a connection still serving may be waiting on its pages' threads
            self.fanout.stop(timeout_s)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1
        return ended

    def describe(self) -> dict[str, Any]:
        resident = {} if self.residency is None else self.residency.describe()
        return {"listening": list(self.addresses), "connections": self.connections(),
                **resident}


#: The NBD socket's file name inside the daemon's run directory.
NBD_SOCKET = "nbd.sock"


def serve_nbd(exports: Any, path: Path, tcp: str = "") -> NbdServer:
    """The daemon's NBD server over ``exports``: the Unix socket ``path``, and TCP at
    ``tcp`` (``HOST:PORT`` on loopback) when set; started."""
    server = NbdServer(exports, residency=exports.residency)
    try:
        server.listen_unix(path)
        if tcp:
            host, _, port = tcp.rpartition(":")
            server.listen_tcp(host.strip("[]"), int(port))
    except BaseException:
        server.stop(0)
        raise
    exports.server = server
    server.start()
    log.info("NBD: serving exports on %s", ", ".join(server.addresses))
    return server
