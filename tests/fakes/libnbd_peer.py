"""libnbd (the NBD project's C client library) as a test peer of our NBD server.

Debian's ``python3-libnbd`` is built for Debian's ``/usr/bin/python3``; the suite runs in a
venv of another interpreter, so the bindings run in a child process
(``libnbd_driver.py``) that this module talks to, one JSON line each way.  A
:class:`Handle` is one ``nbd.NBD()`` there: ``h.pwrite(data, offset)``, ``h.pread(n, off)``
as in libnbd's Python API; a libnbd error raises :class:`LibNbdError` with its errno name.

:func:`unavailable_reason` says why the peer cannot run (missing packages); the tests skip
with it, or fail under CI (``tests/fakes/required.py``).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

SYSTEM_PYTHON = "/usr/bin/python3"
DRIVER = Path(__file__).resolve().parent / "libnbd_driver.py"
#: The Debian packages the NBD tests need (tests/xen/install-deps.sh installs them).
PACKAGES = "python3-libnbd libnbd-bin fio nbdkit"
ANSWER_TIMEOUT_S = 120.0


def unavailable_reason() -> str | None:
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} is missing (apt-get install python3)"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True,
                           text=True, timeout=60)
    if probe.returncode != 0:
        return f"python3-libnbd is missing (apt-get install {PACKAGES})"
    return None


def fio_unavailable_reason() -> str | None:
    fio = shutil.which("fio")
    if fio is None:
        return f"fio is missing (apt-get install {PACKAGES})"
    engines = subprocess.run([fio, "--enghelp"], capture_output=True, text=True, timeout=60)
    if "nbd" not in engines.stdout.split():
        return "this fio has no nbd ioengine (Debian's fio links libnbd)"
    return None


class LibNbdError(Exception):
    def __init__(self, errno: str | None, message: str) -> None:
        super().__init__(f"{errno}: {message}")
        self.errno = errno
        self.message = message


def _encode(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {"b64": base64.b64encode(bytes(value)).decode()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "b64" in value:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


class LibNbd:
    """The child process that holds libnbd handles."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(DRIVER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def ask(self, request: dict[str, Any]) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the libnbd driver died (exit {self.proc.wait(10)})")
        answer = json.loads(line)
        if "error" in answer:
            raise LibNbdError(answer["error"]["errno"], answer["error"]["msg"])
        return _decode(answer["ok"])

    def handle(self) -> Handle:
        return Handle(self, self.ask({"new": True}))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(ANSWER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Handle:
    def __init__(self, peer: LibNbd, number: int) -> None:
        self.peer = peer
        self.number = number

    def __getattr__(self, method: str) -> Any:
        def call(*args: Any) -> Any:
            return self.peer.ask({"h": self.number, "m": method,
                                  "a": [_encode(a) for a in args]})
        return call

    def close(self) -> None:
        self.peer.ask({"close": self.number})
