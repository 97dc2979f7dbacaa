"""Every way a command can fail: a non-zero exit and one clear line on stderr, never a trace.

Exit codes: 1 the daemon refused, 2 usage error (click), 3 the daemon cannot be reached.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from xentmem_cli.main import cli

#: Every read command, as a user would type it (each takes --json too).
READ_COMMANDS = (
    ("status",), ("params", "list"), ("params", "get", "capacity"), ("backends",), ("pools",),
    ("stats",), ("balloon",), ("metrics",),
)
WRITE_COMMANDS = (
    ("params", "set", "capacity", "64M"), ("load", "zcache"), ("unload",), ("reload",),
)


@pytest.mark.parametrize("args", READ_COMMANDS + WRITE_COMMANDS, ids=" ".join)
def test_no_daemon_says_so_and_how_to_start_it(
    args: tuple[str, ...], no_daemon_socket: Path, xentmem_at: Any, assert_error: Any,
) -> None:
    assert_error(xentmem_at(no_daemon_socket)(*args), 3, "xentmemd is not running",
                 f"no socket at {no_daemon_socket}", "xentmem run", "systemctl start xentmem")


@pytest.mark.parametrize("args", READ_COMMANDS, ids=" ".join)
def test_no_daemon_fails_the_same_with_json(
    args: tuple[str, ...], no_daemon_socket: Path, xentmem_at: Any, assert_error: Any,
) -> None:
    assert_error(xentmem_at(no_daemon_socket)(*args, "--json"), 3, "xentmemd is not running")


def test_socket_comes_from_the_environment(
    tmp_path: Path, runner: Any, assert_error: Any,
) -> None:
    path = tmp_path / "from-env.sock"
    result = runner.invoke(cli, ["status"], prog_name="xentmem",
                           env={"XENTMEM_SOCKET": str(path)})
    assert_error(result, 3, f"no socket at {path}")


def test_stale_socket_file_means_not_running(
    tmp_path: Path, xentmem_at: Any, assert_error: Any,
) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: what a crashed daemon leaves behind
    stale.close()
    assert_error(xentmem_at(path)("status"), 3, f"xentmemd is not running (stale socket at {path})",
                 "xentmem run")


@pytest.fixture
def silent_daemon(tmp_path: Path) -> Iterator[Path]:
    """A socket that accepts connections and never answers."""
    path = tmp_path / "silent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except (socket.timeout, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture
def rude_daemon(tmp_path: Path) -> Iterator[Any]:
    """``rude_daemon(reply)``: a socket whose peer reads one request, sends ``reply``, hangs up."""
    servers: list[tuple[socket.socket, threading.Thread]] = []

    def start(reply: bytes) -> Path:
        path = tmp_path / f"rude-{len(servers)}.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(4)
        server.settimeout(10)

        def serve() -> None:  # one connection: a fresh one that fails is not retried
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):  # the client may hang up first
                conn.settimeout(10)
                conn.recv(65536)
                conn.sendall(reply)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        servers.append((server, thread))
        return path

    yield start
    for server, thread in servers:
        server.close()
        thread.join(timeout=10)


def test_a_garbled_answer_is_a_protocol_error(rude_daemon: Any, xentmem_at: Any,
                                              assert_error: Any) -> None:
    assert_error(xentmem_at(rude_daemon(b"this is not json\n"))("status"), 1,
                 "not JSON", "[protocol]")


def test_an_answer_in_another_protocol_version(rude_daemon: Any, xentmem_at: Any,
                                               assert_error: Any) -> None:
    reply = b'{"v": 99, "id": 1, "ok": true, "result": {}}\n'
    assert_error(xentmem_at(rude_daemon(reply))("status"), 1, "another protocol version",
                 "[protocol]")


def test_a_daemon_that_hangs_up_without_answering(rude_daemon: Any, xentmem_at: Any,
                                                  assert_error: Any) -> None:
    path = rude_daemon(b"")
    assert_error(xentmem_at(path)("status"), 3, f"xentmemd at {path} broke off",
                 "closed the connection")


def test_no_answer_within_the_timeout(
    silent_daemon: Path, xentmem_at: Any, assert_error: Any,
) -> None:
    result = xentmem_at(silent_daemon, timeout=0.3)("status")
    assert_error(result, 3, "did not answer within 0.3s", "--timeout")


def without_file_permission_overrides() -> list[str]:
    """A command prefix under which file modes bind, even for root (no CAP_DAC_*)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and util-linux's setpriv is absent: cannot drop "
                    "CAP_DAC_OVERRIDE to see a permission error")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


def xentmem_script() -> str:
    script = Path(sys.executable).with_name("xentmem")
    return str(script) if script.exists() else (shutil.which("xentmem") or "xentmem")


@pytest.fixture
def listening_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "locked" / "control.sock"
    path.parent.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    yield path
    os.chmod(path.parent, 0o700)
    server.close()


@pytest.mark.parametrize("locked,fragments", [
    ("socket", ("permission denied on", "owner-only")),
    ("directory", ("permission denied on the way to", "closed to this user")),
])
def test_socket_without_permission(
    listening_socket: Path, locked: str, fragments: tuple[str, ...],
) -> None:
    prefix = without_file_permission_overrides()
    os.chmod(listening_socket if locked == "socket" else listening_socket.parent, 0)
    result = subprocess.run(
        [*prefix, xentmem_script(), "--socket", str(listening_socket), "status"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("xentmem: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# click's own wording changes between versions; the fragments are the parts that do not.
@pytest.mark.parametrize("args,fragments", [
    (("params", "get"), ("Missing argument", "NAME")),
    (("params", "set", "capacity"), ("Missing argument", "VALUE")),
    (("params", "list", "--section", "nope"), ("'nope'", "tmem", "selfballoon")),
    (("load",), ("Missing argument", "BACKEND")),
    (("load", "zcache", "capacity"), ("'capacity' is not of the form name=value",)),
    (("load", "zcache", "=1"), ("'=1' is not of the form name=value",)),
    (("balloon", "-n", "-1"), ("-1", "range")),
    (("stats", "--bogus"), ("No such option", "--bogus")),
    (("--timeout", "0", "status"), ("0.0", "range")),
    (("--timeout", "soon", "status"), ("'soon'", "float")),
    (("--timeout", "nan", "status"), ("'nan'", "finite")),
    (("--timeout", "1e400", "status"), ("'1e400'", "finite")),
    (("balloon", "record", "--duration", "inf"), ("'inf'", "finite")),
    (("frobnicate",), ("No such command", "frobnicate")),
    (("params", "frob"), ("No such command", "frob")),
])
def test_usage_errors_exit_2_and_touch_no_daemon(
    args: tuple[str, ...], fragments: tuple[str, ...], no_daemon_socket: Path,
    xentmem_at: Any, assert_error: Any,
) -> None:
    # The socket does not exist: a usage error must be reported before any connection.
    assert_error(xentmem_at(no_daemon_socket)(*args), 2, *fragments)


def all_commands(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += all_commands(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "xentmem")
def test_help_everywhere(path: tuple[str, ...], no_daemon_socket: Path, xentmem_at: Any) -> None:
    for flag in ("--help", "-h"):
        result = xentmem_at(no_daemon_socket)(*path, flag)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("Usage: xentmem"), result.stdout
        assert result.stderr == ""


def test_every_read_command_takes_json() -> None:
    reads = {" ".join(args[:2]) if args[0] == "params" else args[0] for args in READ_COMMANDS}
    for path in all_commands():
        if not path:
            continue
        command: Any = cli
        for name in path:
            command = command.commands[name]
        if isinstance(command, click.Group):
            continue
        has_json = any(p.name == "as_json" for p in command.params)
        if " ".join(path) in reads:
            assert has_json, f"{' '.join(path)} lacks --json"
