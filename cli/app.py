"""The object every command gets in ``ctx.obj``: where the daemon is, and how to leave.

Commands never build a client or print an error themselves.  They ask :meth:`App.call` for
a result and hand the dict they built to :meth:`App.emit`; every failure goes through
:meth:`App.abort`.  Output, the error line and the exit codes are those of every console
script of the project (:mod:`xentmem.console`): 1 when the daemon refused or failed (its
message is shown as it sent it), 2 for a usage error, 3 when the daemon cannot be reached.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, NoReturn, Protocol

from xentmem import console
from xentmem.console import EXIT_FAILURE, EXIT_UNREACHABLE, json_option
from xentmem.control import protocol
from xentmem.control.client import ControlClient
from xentmem.control.protocol import ControlError

#: Commands take ``--json`` from here, with everything else they need of the CLI.
__all__ = ["App", "Client", "json_option"]

#: How long ``load`` and ``unload`` wait when no --timeout is given: an unload repatriates
#: every swap page held in tmem (seconds per GiB locally, much longer over xenstore).
LONG_OP_TIMEOUT_S = 300.0

HOW_TO_START = ("start it with `xentmem run` (foreground) or `systemctl start xentmem`, "
                "or point --socket / XENTMEM_SOCKET at its socket")


class Client(Protocol):
    """What the CLI needs of :class:`xentmem.control.ControlClient`."""

    def call(self, op: str, **args: Any) -> Any: ...

    def close(self) -> None: ...


ClientFactory = Callable[[str, float], Client]


def control_client(socket_path: str, timeout: float) -> Client:
    """The client of the control socket (the default factory)."""
    return ControlClient(socket_path, timeout=timeout)


class App:
    """The socket path, the timeout and a lazily opened client, shared by every command."""

    def __init__(
        self,
        socket_path: str,
        timeout: float,
        client_factory: ClientFactory = control_client,
        *,
        timeout_given: bool = True,
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        #: False when --timeout (and XENTMEM_TIMEOUT) were not given: the default may grow.
        self.timeout_given = timeout_given
        self._client_factory = client_factory
        self._client: Client | None = None

    def expect_long_op(self, seconds: float = LONG_OP_TIMEOUT_S) -> None:
        """Wait up to ``seconds`` for the next answer, unless the user chose a timeout.

        ``load`` and ``unload`` call this: the default wait suits a status query, not the
        repatriation of every swap page, which would otherwise be reported as "did not
        answer" while the daemon goes on with it.
        """
        if self.timeout_given or seconds <= self.timeout:
            return
        self.timeout = seconds
        self.close()  # a client opened with the short timeout is reopened with the long one

    # -- talking to the daemon ----------------------------------------------------------------

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = self._client_factory(self.socket_path, self.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def call(self, op: str, **args: Any) -> Any:
        """The daemon's result for ``op``, or an abort with one clear line."""
        try:
            return self.client.call(op, **args)
        except ControlError as exc:
            if exc.unreachable:
                self.abort(self.unreachable_message(exc), EXIT_UNREACHABLE)
            self.abort(f"{exc.message} [{exc.code}]")

    def unreachable_message(self, exc: ControlError) -> str:
        """Say why there is no daemon to talk to, and what to do about it."""
        path = self.socket_path
        if exc.code == protocol.TIMEOUT:
            return (f"xentmemd at {path} did not answer within {self.timeout:g}s "
                    "(busy or stuck; try a larger --timeout)")
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return f"xentmemd is not running (no socket at {path}); {HOW_TO_START}"
        except PermissionError:
            return (f"permission denied on the way to {path}: its directory is closed to "
                    "this user; run as the daemon's user (root for the system service)")
        except OSError as error:
            return f"cannot reach xentmemd at {path}: {error.strerror or error}"
        if not os.access(path, os.R_OK | os.W_OK):
            return (f"permission denied on {path}: the socket is owner-only; run as its owner "
                    "(root for the system service) or ask for the socket's group")
        if not self._accepts_connections():
            return f"xentmemd is not running (stale socket at {path}); {HOW_TO_START}"
        return f"xentmemd at {path} broke off: {exc.message}"

    def _accepts_connections(self) -> bool:
        """Whether anything listens on the socket (a crashed daemon leaves a dead file)."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(self.timeout)
        try:
            probe.connect(self.socket_path)
        except OSError:
            return False
        finally:
            probe.close()
        return True

    # -- output: the conventions of xentmem.console ------------------------------------------

    @staticmethod
    def abort(message: str, code: int = EXIT_FAILURE) -> NoReturn:
        """One line on stderr, then exit with ``code``: the only way a command fails."""
        console.abort(message, code)

    @staticmethod
    def status(message: str) -> None:
        """Progress and notes for a human: stderr, so stdout stays pure data."""
        console.note(message)

    @staticmethod
    def emit(data: Any, *, as_json: bool, render: Callable[[Any], str]) -> None:
        """Print ``data`` to stdout: as one line of JSON, or through ``render`` as text."""
        console.emit(data, as_json=as_json, render=render)
