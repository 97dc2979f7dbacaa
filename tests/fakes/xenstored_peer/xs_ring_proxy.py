"""Expose a fake guest domain's xenstore ring as a Unix socket.

Works with xenstored started under the fakexen.so LD_PRELOAD shim with
XSFAKE_DIR=<dir>.  After dom0 sends XS_INTRODUCE <domid> <mfn> <port>, xenstored
maps <dir>/ring-<domid> as that domain's xenstore_domain_interface page.  This
proxy pumps bytes between a Unix-socket client (e.g. pyxs
``Client(unix_socket_path=...)``) and that ring, so the client's requests
reach xenstored *as domain <domid>* (unprivileged, permissions enforced).

    proxy = RingProxy(fakedir, domid, "/tmp/.../dom5.sock"); proxy.start()
    dom0.introduce_domain(domid, 0, 1)
    with pyxs.Client(unix_socket_path=proxy.path) as guest: ...

One client at a time per domain (the ring is a single connection).
Kick protocol (fakexen.so): write the domid as a 4-byte native uint32 into
<dir>/evtchn; 0xffffffff means "VIRQ_DOM_EXC" (re-check which domains died).
"""
import contextlib
import ctypes
import mmap
import os
import select
import socket
import stat
import sys
import threading

RING = 1024
REQ, RSP = 0, 1024
# indexes of struct xenstore_domain_interface (offset 2048), as u32 words
REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD = 0, 1, 2, 3


def _fifo(path):
    try:
        st = os.stat(path)
        if not stat.S_ISFIFO(st.st_mode):
            os.unlink(path)
            os.mkfifo(path, 0o600)
    except FileNotFoundError:
        os.mkfifo(path, 0o600)
    return os.open(path, os.O_RDWR | os.O_NONBLOCK)


class RingProxy:
    def __init__(self, fakedir, domid, path):
        self.fakedir, self.domid, self.path = fakedir, domid, path
        ring = os.path.join(fakedir, f"ring-{domid}")
        fd = os.open(ring, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, 4096)
        self.mem = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
        os.close(fd)
        self.mem[:] = b"\0" * 4096
        # Aligned 32-bit loads/stores: struct.pack_into("<I") writes byte by
        # byte, and xenstored then sees torn indexes (-> XENSTORE_ERROR_RINGIDX).
        self.idx = (ctypes.c_uint32 * 4).from_buffer(self.mem, 2048)
        self.notify_fd = _fifo(os.path.join(fakedir, f"notify-{domid}"))
        self.kick_fd = os.open(os.path.join(fakedir, "evtchn"),
                               os.O_WRONLY | os.O_NONBLOCK)
        if os.path.exists(path):
            os.unlink(path)
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(path)
        self.lsock.listen(1)
        self.kick_rec = ctypes.c_uint32(domid).value.to_bytes(4, sys.byteorder)
        self.stop_r, self.stop_w = os.pipe()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        """Stop the thread and close everything this proxy opened (a test run introduces
        hundreds of domains: leaked descriptors would pass select()'s limit of 1024)."""
        os.write(self.stop_w, b"x")
        self.thread.join(5)
        self.lsock.close()
        if self.thread.is_alive():
            return  # it still uses them: leave them to the process's exit
        for fd in (self.notify_fd, self.kick_fd, self.stop_r, self.stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        del self.idx  # the ring's mapping holds a descriptor too; the view must go first
        with contextlib.suppress(BufferError):
            self.mem.close()

    def _get(self, i):
        return self.idx[i]

    def _put(self, i, v):
        self.idx[i] = v & 0xffffffff

    def _kick(self):
        with contextlib.suppress(BlockingIOError):
            os.write(self.kick_fd, self.kick_rec)

    def _serve(self):
        while True:
            r, _, _ = select.select([self.lsock, self.stop_r], [], [])
            if self.stop_r in r:
                return
            conn, _ = self.lsock.accept()
            try:
                if self._pump(conn):
                    return
            finally:
                conn.close()

    def _pump(self, conn):
        pending = b""
        while True:
            r, _, _ = select.select([conn, self.notify_fd, self.stop_r],
                                    [], [], 0.05)
            if self.stop_r in r:
                return True
            if self.notify_fd in r:
                try:
                    while os.read(self.notify_fd, 4096):
                        pass
                except BlockingIOError:
                    pass
            if conn in r:
                data = conn.recv(65536)
                if not data:
                    return False
                pending += data
            moved = False
            if pending:                       # client -> request ring
                cons, prod = self._get(REQ_CONS), self._get(REQ_PROD)
                space = RING - ((prod - cons) & 0xffffffff)
                n = min(space, len(pending))
                done = 0
                while done < n:
                    idx = (prod + done) % RING
                    k = min(n - done, RING - idx)
                    self.mem[REQ + idx:REQ + idx + k] = pending[done:done + k]
                    done += k
                if n:
                    self._put(REQ_PROD, prod + n)
                    pending = pending[n:]
                    moved = True
            cons, prod = self._get(RSP_CONS), self._get(RSP_PROD)
            avail = (prod - cons) & 0xffffffff
            if avail:                         # response ring -> client
                out = b""
                while len(out) < avail:
                    idx = (cons + len(out)) % RING
                    k = min(avail - len(out), RING - idx)
                    out += self.mem[RSP + idx:RSP + idx + k]
                self._put(RSP_CONS, cons + avail)
                conn.sendall(out)
                moved = True
            if moved:
                self._kick()
