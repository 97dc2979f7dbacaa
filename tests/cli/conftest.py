"""Fixtures of the CLI tests: a real ``xentmemd`` on a temp socket, and a CliRunner for it.

The daemon subprocess and the fake guest root come from :mod:`fakes.guest_daemon`, as in the
daemon's tests, so both suites start the daemon the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from fakes.guest_daemon import DaemonProcess, make_root

from xentmem_cli.main import cli


def make_runner() -> CliRunner:
    """A runner that keeps stderr apart from stdout (the default from click 8.2 on)."""
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


class Xentmem:
    """Runs ``xentmem --socket <the daemon's socket> ARGS`` in process, with CliRunner."""

    def __init__(self, socket_path: Path | str, timeout: float = 10.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.runner = make_runner()

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> Result:
        full = ["--socket", self.socket_path, "--timeout", str(self.timeout), *args]
        return self.runner.invoke(cli, full, prog_name="xentmem", env=env,
                                  catch_exceptions=False)

    def json(self, *args: str, env: dict[str, str] | None = None) -> Any:
        """``xentmem ARGS --json``, which must succeed; its stdout parsed."""
        result = self(*args, "--json", env=env)
        assert result.exit_code == 0, result.output
        assert result.stdout.count("\n") == 1, "--json prints exactly one line"
        return json.loads(result.stdout)


def assert_error(result: Result, code: int, *fragments: str) -> str:
    """The command failed with ``code`` and one line on stderr holding every fragment."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == "", "errors never write to stdout"
    lines = result.stderr.strip().splitlines()
    if code == 2:  # click's usage errors: "Usage: ...", a hint, then "Error: ..."
        message = lines[-1]
        assert message.startswith("Error: "), result.stderr
    else:
        assert len(lines) == 1, f"one line expected: {result.stderr!r}"
        message = lines[0]
        assert message.startswith("xentmem: error: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.fixture(name="assert_error")
def assert_error_fixture() -> Any:
    """:func:`assert_error`, for test modules (a conftest cannot be imported by name)."""
    return assert_error


@pytest.fixture
def xentmem_at() -> Any:
    """``xentmem_at(socket_path, timeout=10.0)``: a :class:`Xentmem` for any socket."""
    return Xentmem


@pytest.fixture
def runner() -> CliRunner:
    return make_runner()


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    return make_root(tmp_path)


def _start(base: Path, *args: str) -> Any:
    process = DaemonProcess(base, make_root(base), None, args)
    process.wait_ready()
    return process


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Any]:
    """A fresh daemon (zcache, fake 2 GiB root, no config) for a test that changes things."""
    process = _start(tmp_path)
    yield process
    if process.proc.poll() is None:
        process.stop()


@pytest.fixture
def xentmem(daemon: Any) -> Xentmem:
    return Xentmem(daemon.socket)


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One daemon for a module of tests that only read."""
    process = _start(tmp_path_factory.mktemp("shared"))
    yield process
    if process.proc.poll() is None:
        process.stop()


@pytest.fixture
def reader(shared_daemon: Any) -> Xentmem:
    return Xentmem(shared_daemon.socket)


@pytest.fixture
def no_daemon_socket(tmp_path: Path) -> Path:
    """A socket path where nothing listens (and no file exists)."""
    return tmp_path / "absent" / "control.sock"

