"""``xentmem run``: the daemon in the foreground, as a newcomer starts it."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from xentmem_cli.foreground import Notification
from xentmem_cli.main import cli
from xentmem_cli.run import (
    NEXT_COMMANDS,
    SYSTEM_RUN_DIR,
    balloon_summary,
    child_env,
    cli_path,
    daemon_command,
    default_run_dir,
    default_state_dir,
    describe_ready,
    split_places,
)

WAIT_S = 30.0


# -- the pieces ------------------------------------------------------------------------------------

def test_the_system_run_dir_only_when_asked(tmp_path: Path) -> None:
    """Root or not, a try-out keeps out of the system service's places unless --system."""
    run_dir, _ = default_run_dir({"XDG_RUNTIME_DIR": str(tmp_path)})
    assert run_dir == tmp_path / "xentmem" and run_dir != SYSTEM_RUN_DIR
    assert default_run_dir({"XDG_RUNTIME_DIR": str(tmp_path)}, system=True) == (
        SYSTEM_RUN_DIR, "--system: the system service's run directory")
    assert Path("/run/xentmem") == SYSTEM_RUN_DIR


def test_run_dir_is_under_xdg_runtime_dir(tmp_path: Path) -> None:
    run_dir, why = default_run_dir({"XDG_RUNTIME_DIR": str(tmp_path)})
    assert run_dir == tmp_path / "xentmem"
    assert "XDG_RUNTIME_DIR" in why


def test_run_dir_without_xdg_is_a_new_private_temp_dir(tmp_path: Path) -> None:
    first, why = default_run_dir({"XDG_RUNTIME_DIR": str(tmp_path / "missing")})
    second, _ = default_run_dir({})
    try:
        assert first != second
        for made in (first, second):
            assert made.is_dir() and (made.stat().st_mode & 0o777) == 0o700
        assert "temporary" in why
    finally:
        first.rmdir()
        second.rmdir()


def test_daemon_command_passes_everything_through(tmp_path: Path) -> None:
    argv = daemon_command(tmp_path, config="/etc/x.toml", backend="zcache", log_level="debug",
                          options=("capacity=64M", "selfballoon_interval=10"),
                          extra=("--xenstore-socket", "/xs"), root="/fake")
    assert argv == [sys.executable, "-m", "xentmem.guestd.app", "--run-dir", str(tmp_path),
                    "--root", "/fake", "--config", "/etc/x.toml", "--backend", "zcache",
                    "--log-level", "debug", "-o", "capacity=64M", "-o",
                    "selfballoon_interval=10", "--xenstore-socket", "/xs"]
    assert daemon_command(tmp_path, config=None, backend=None, log_level=None, options=(),
                          extra=()) == [sys.executable, "-m", "xentmem.guestd.app",
                                        "--run-dir", str(tmp_path)]


def test_a_try_out_keeps_its_swap_areas_beside_its_run_dir(tmp_path: Path) -> None:
    assert default_state_dir(tmp_path) == tmp_path / "state"  # root too
    assert default_state_dir(tmp_path, system=True) is None  # the daemon's /var/lib/xentmem
    argv = daemon_command(tmp_path, config=None, backend=None, log_level=None, options=(),
                          extra=(), state_dir=tmp_path / "state")
    assert argv[-4:] == ["--run-dir", str(tmp_path), "--state-dir", str(tmp_path / "state")]


def test_child_env_drops_journal_markers_only_for_a_terminal() -> None:
    parent = {"JOURNAL_STREAM": "8:123", "INVOCATION_ID": "abc", "HOME": "/root"}
    assert child_env(parent, stderr_is_tty=True) == {"HOME": "/root"}
    assert child_env(parent, stderr_is_tty=False) == parent


def test_notification_parse() -> None:
    note = Notification.parse(b"READY=1\nSTATUS=backend zcache; 0 pages\nMAINPID=42\n")
    assert note.ready and not note.stopping
    assert note.status == "backend zcache; 0 pages"
    assert note.fields["MAINPID"] == "42"
    odd = Notification.parse(b"garbage\n=x\nBAD KEY=1\nSTOPPING=1\n\xff=1")
    assert dict(odd.fields) == {"STOPPING": "1"}
    assert odd.stopping and not odd.ready and odd.status is None


def test_ready_banner_tells_a_newcomer_what_to_do_next(tmp_path: Path) -> None:
    status = {
        "backend": {"name": "zcache"},
        "backend_choice": {"requested": "auto", "chosen": "zcache", "reason": "no Xen",
                           "from": "default"},
        "balloon": {"running": True, "jobs": ["selfballooning"], "report_only": True},
    }
    socket_path = tmp_path / "control.sock"
    lines = describe_ready(status, 42, socket_path)
    assert lines[:4] == [
        "xentmemd is ready (pid 42)",
        "  backend: zcache (auto, the default: no Xen)",
        "  balloon: running (selfballooning), report-only: it computes targets but does not "
        "move the balloon",
        f"  socket:  {socket_path}",
    ]
    for words, _ in NEXT_COMMANDS:
        assert any(line.startswith(f"  xentmem --socket {socket_path} {words} ")
                   for line in lines), words
    assert f"export XENTMEM_SOCKET={socket_path}" in lines[-2]
    assert lines[-1].startswith("Ctrl-C stops it")
    default = describe_ready(None, 7, SYSTEM_RUN_DIR / "control.sock")
    assert not any("export" in line or "--socket" in line for line in default)
    venv = describe_ready(None, 7, socket_path, "/srv/x/.venv/bin/xentmem")
    assert any(line.startswith(f"  /srv/x/.venv/bin/xentmem --socket {socket_path} status")
               for line in venv)
    assert "source /srv/x/.venv/bin/activate" in venv[-2]
    assert balloon_summary({"running": False, "not_running_because": "dom0"}) == (
        "not running (dom0)")


def test_run_dir_and_state_dir_after_the_double_dash_are_the_ones_used() -> None:
    assert split_places(("--run-dir", "/a", "--xenstore-socket", "/xs", "--state-dir=/s",
                         "--run-dir=/b")) == (Path("/b"), Path("/s"), ("--xenstore-socket", "/xs"))
    assert split_places(("--log-level", "debug")) == (None, None, ("--log-level", "debug"))
    assert split_places(("--run-dir",)) == (None, None, ("--run-dir",))


def test_cli_path_is_the_full_path_unless_path_finds_this_very_script(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    script = venv_bin / "xentmem"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert cli_path(str(script), "/usr/bin/python3") == str(script)
    assert cli_path("-c", str(venv_bin / "python")) == str(script)
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")
    assert cli_path(str(script), "/usr/bin/python3") == "xentmem"


def test_readme_quick_start_lists_the_banners_commands() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    for words, _ in NEXT_COMMANDS:
        assert f"`{words}`" in quick or f" {words}`" in quick, words


def exit_code_table() -> dict[str, str]:
    """docs/control-protocol.md's one exit-code table: code -> meaning."""
    doc = (Path(__file__).parents[2] / "docs" / "control-protocol.md").read_text()
    table = doc.split("- Exit codes, one table for all:", 1)[1].split("\n\n", 2)[1]
    rows = [line.split("|")[1:3] for line in table.splitlines()[2:]]
    return {code.strip(): meaning.strip() for code, meaning in rows}


def test_the_signal_exit_of_run_is_in_the_one_table_and_its_help() -> None:
    """Fails before: ``xentmem run`` exits 128+N when xentmemd is killed by signal N (the
    shell's convention, right for a supervisor), a code neither the table nor ``run
    --help`` named."""
    from xentmem import console

    table = exit_code_table()
    codes = {str(getattr(console, name)) for name in dir(console) if name.startswith("EXIT_")
             and name != "EXIT_SIGNAL_BASE"}
    assert set(table) == codes | {f"{console.EXIT_SIGNAL_BASE}+N"}
    assert "xentmem run" in table["128+N"] and "signal N" in table["128+N"]
    result = CliRunner().invoke(cli, ["run", "--help"], prog_name="xentmem")
    assert result.exit_code == 0
    assert "128+N when signal N killed it" in " ".join(result.stdout.split())


# -- the command, end to end -----------------------------------------------------------------------

class LineReader:
    """The lines of a pipe, read on a thread, each waited for with a timeout."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for raw in stream:
            self.lines.put(raw.rstrip("\n"))
        self.lines.put(None)

    def until(self, predicate: Any, timeout_s: float = WAIT_S) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout_s)
            except queue.Empty:
                raise AssertionError(f"nothing matching within {timeout_s}s: {self.seen}") from None
            if line is None:
                raise AssertionError(f"stream ended first: {self.seen}")
            self.seen.append(line)
            if predicate(line):
                return line

    def rest(self) -> list[str]:
        self._thread.join(timeout=WAIT_S)
        while True:
            line = self.lines.get_nowait() if not self.lines.empty() else None
            if line is None:
                return self.seen
            self.seen.append(line)


def console_script() -> str:
    return str(Path(sys.executable).with_name("xentmem"))


def newcomer_env() -> dict[str, str]:
    """A new shell's environment: no XENTMEM_SOCKET, and the venv's bin/ not on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("XENTMEM_SOCKET", "NOTIFY_SOCKET")}
    env["PATH"] = os.pathsep.join(part for part in env.get("PATH", "/usr/bin:/bin").split(
        os.pathsep) if part != venv_bin)
    return env


@pytest.fixture(params=["option", "after --"])
def run_process(request: pytest.FixtureRequest, tmp_path: Path,
                fake_root: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """``xentmem run`` in its own session (a terminal's foreground job), on a fake root; its
    run dir given as ``run --run-dir DIR`` or as ``run -- --run-dir DIR``."""
    run_dir = tmp_path / "run"
    where = (["--run-dir", str(run_dir)] if request.param == "option"
             else ["--", "--run-dir", str(run_dir)])
    proc = subprocess.Popen(
        [console_script(), "run", "--root", str(fake_root), *where],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=newcomer_env(),
        start_new_session=True,
    )
    yield proc, run_dir
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(WAIT_S)


def test_run_shows_the_socket_then_stops_cleanly_on_ctrl_c(
    run_process: tuple[subprocess.Popen[str], Path], xentmem_at: Any,
) -> None:
    proc, run_dir = run_process
    stderr = LineReader(proc.stderr)
    ready = stderr.until(lambda line: line.startswith("xentmemd is ready"))
    daemon_pid = int(ready.split("pid ")[1].rstrip(")"))
    socket_line = stderr.until(lambda line: line.startswith("  socket:"))
    socket_path = Path(socket_line.split(None, 1)[1])
    assert socket_path == run_dir / "control.sock"
    pasted = stderr.until(lambda line: line.lstrip().split(" ", 3)[-1].startswith("status "))
    command = pasted.split("#", 1)[0].strip()
    assert command.startswith(f"{console_script()} --socket {socket_path} status")
    # Pasted into a new shell as printed: the venv is not on its PATH.
    shell = subprocess.run(["sh", "-c", command], env=newcomer_env(), capture_output=True,
                           text=True, timeout=WAIT_S)
    assert shell.returncode == 0, shell.stderr
    assert "backend:" in shell.stdout and "zcache" in shell.stdout

    status = xentmem_at(socket_path).json("status")
    assert status["pid"] == daemon_pid
    assert status["backend"]["name"] == "zcache"

    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    assert proc.wait(WAIT_S) == 0
    lines = stderr.rest()
    assert "xentmem run: xentmemd stopped (exit status 0)" in lines
    assert any("stopping xentmemd" in line for line in lines)
    assert proc.stdout is not None and proc.stdout.read() == ""  # status only, on stderr
    with pytest.raises(ProcessLookupError):
        os.kill(daemon_pid, 0)
    assert not socket_path.exists()


def test_run_reports_a_daemon_that_fails_to_start(
    tmp_path: Path, fake_root: Path, runner: Any,
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[selfballoon]\nselfballoon_interval = 0\n")
    result = runner.invoke(cli, ["run", "--run-dir", str(tmp_path / "run"), "--config",
                                 str(bad), "--", "--root", str(fake_root)],
                           prog_name="xentmem")
    assert result.exit_code == 78, result.output  # EX_CONFIG, passed on
    assert result.stderr.splitlines()[-1] == (
        "xentmem: error: xentmemd exited with status 78 before it was ready "
        "(its messages are above)")


def test_run_refuses_a_run_dir_where_a_daemon_answers(
    daemon: Any, runner: Any, assert_error: Any,
) -> None:
    result = runner.invoke(cli, ["run", "--run-dir", str(daemon.run_dir)], prog_name="xentmem")
    assert_error(result, 1, f"a xentmemd already answers on {daemon.socket}")


def test_run_gives_up_on_a_daemon_that_never_gets_ready(
    tmp_path: Path, runner: Any, monkeypatch: pytest.MonkeyPatch, assert_error: Any,
) -> None:
    """A daemon that says nothing is stopped after --start-timeout, with one clear line."""
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr("xentmem_cli.run.daemon_command", lambda *a, **k: silent)
    result = runner.invoke(cli, ["run", "--run-dir", str(tmp_path / "run"),
                                 "--start-timeout", "0.5"], prog_name="xentmem")
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[-1] == (
        "xentmem: error: xentmemd was not ready within 0.5s, so it was stopped "
        "(it was killed by signal 15; its messages are above)")


READY_THEN_EXIT = """
import os, socket, sys
run_dir = sys.argv[sys.argv.index("--run-dir") + 1]
open(os.path.join(run_dir, "xentmemd.lock"), "w").close()
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1\\nSTATUS=fake", os.environ["NOTIFY_SOCKET"])
"""


@pytest.mark.parametrize("how", ["stopped", "failed to start"])
def test_a_temporary_run_dir_is_removed_when_the_daemon_has_stopped(
    how: str, tmp_path: Path, fake_root: Path, runner: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fails before: each try-out without $XDG_RUNTIME_DIR left a xentmem-run-* dir behind."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    if how == "stopped":
        monkeypatch.setattr("xentmem_cli.run.daemon_command",
                            lambda run_dir, **k: [sys.executable, "-c", READY_THEN_EXIT,
                                                  "--run-dir", str(run_dir)])
        args = ["run"]
    else:
        bad = tmp_path / "bad.toml"
        bad.write_text("[selfballoon]\nselfballoon_interval = 0\n")
        args = ["run", "--config", str(bad), "--", "--root", str(fake_root)]
    result = runner.invoke(cli, args, prog_name="xentmem")
    assert result.exit_code == (0 if how == "stopped" else 78), result.output
    assert [p.name for p in temp.iterdir() if p.name.startswith("xentmem-run-")] == []
    assert "a new temporary directory, removed when the daemon has stopped" in result.stderr
