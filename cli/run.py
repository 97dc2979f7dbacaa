"""``xentmem run``: the daemon in this terminal, for a first look (the README's main command).

It starts ``xentmemd`` in the foreground in places of its own, for root too (a run dir under
``$XDG_RUNTIME_DIR``, or a new temporary one removed at the end, and its ``state/``), so a
try-out never takes over the system service's ``/run/xentmem`` and ``/var/lib/xentmem`` unless
asked (``--system``). It waits until the daemon reports READY the way it would to systemd, and
then prints what a newcomer needs: which backend it picked and why, what the balloon does, the
socket the daemon opened, and commands to paste into a second terminal as they are (this CLI's
full path: a venv's ``bin/`` is seldom on PATH). The daemon's own log lines follow on stderr;
Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import click

from xentmem.clock import SystemClock
from xentmem.console import EXIT_FAILURE, EXIT_SIGNAL_BASE, Seconds
from xentmem.control.client import ControlClient
from xentmem.control.protocol import DEFAULT_SOCKET_PATH, SOCKET_NAME, ControlError
from xentmem_cli.app import App
from xentmem_cli.backend import complete_backend
from xentmem_cli.foreground import ForegroundDaemon

SYSTEM_RUN_DIR = Path(DEFAULT_SOCKET_PATH).parent
#: What the banner offers to type next, and what the README's quick start lists: one list.
NEXT_COMMANDS = (
    ("status", "backend and why, flags, frontends"),
    ("params list", "every flag, param and knob; params set NAME VALUE changes one"),
    ("stats", "counters"),
    ("balloon", "goal, target, floor and the last decisions"),
    ("pools", "the tmem pools and their pages"),
)
#: The daemon loads its backend and opens its socket in well under a second; this is slack.
DEFAULT_START_TIMEOUT_S = 60.0
#: Environment that describes *our* place under systemd; the child's stderr is a terminal.
SERVICE_ENV = ("JOURNAL_STREAM", "INVOCATION_ID")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Why a run dir was chosen when it is a new temporary one, removed again at the end.
TEMPORARY = "a new temporary directory, removed when the daemon has stopped"
#: How long to let the daemon stop cleanly if this process itself fails.
EMERGENCY_STOP_TIMEOUT_S = 30.0


def default_run_dir(env: dict[str, str] | os._Environ[str], *,
                    system: bool = False) -> tuple[Path, str]:
    """Where the daemon's socket goes, and why there.

    ``system`` (root asked for it): ``/run/xentmem``, the service's own.  Otherwise, root or
    not: ``$XDG_RUNTIME_DIR/xentmem`` (private to the user, cleaned at logout), else a new
    private temporary directory, so a try-out never takes over the system service's places.
    """
    if system:
        return SYSTEM_RUN_DIR, "--system: the system service's run directory"
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir() and os.access(runtime, os.W_OK):
        return Path(runtime) / "xentmem", "under $XDG_RUNTIME_DIR"
    return Path(tempfile.mkdtemp(prefix="xentmem-run-")), TEMPORARY


def default_state_dir(run_dir: Path, *, system: bool = False) -> Path | None:
    """Where file-backed swap areas and ``shutdown.json`` go: the daemon's default
    (/var/lib/xentmem) only with ``system``; otherwise ``state/`` in the run directory."""
    return None if system else run_dir / "state"


def split_places(daemon_args: tuple[str, ...]) -> tuple[Path | None, Path | None,
                                                        tuple[str, ...]]:
    """``--run-dir`` and ``--state-dir`` given after ``--`` (the last of each wins, as in
    the daemon's parser), and the other words unchanged: the banner must name the socket
    the daemon really opens, and the lock check must look there."""
    found: dict[str, Path] = {}
    rest: list[str] = []
    words = list(daemon_args)
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, value = word.partition("=")
        if name in ("--run-dir", "--state-dir"):
            if eq:
                found[name] = Path(value)
            elif i + 1 < len(words):
                found[name] = Path(words[i + 1])
                i += 1
            else:  # no value: leave it for the daemon to refuse
                rest.append(word)
        else:
            rest.append(word)
        i += 1
    return found.get("--run-dir"), found.get("--state-dir"), tuple(rest)


def cli_path(argv0: str, executable: str) -> str:
    """How to type this CLI in a new shell: ``xentmem`` if that is what PATH finds, else
    its full path (a venv's ``bin/`` is on PATH only once the venv is activated)."""
    candidates = [Path(argv0)] if Path(argv0).name == "xentmem" else []
    candidates.append(Path(executable).parent / "xentmem")  # the venv's script, unresolved
    mine = next((c for c in candidates if c.is_file()), None)
    if mine is None:
        return "xentmem"
    mine = Path(os.path.abspath(mine))
    found = shutil.which("xentmem")
    if found is not None and os.path.samefile(found, mine):
        return "xentmem"
    return str(mine)


def next_commands(program: str, socket_path: Path) -> list[str]:
    """The commands to paste into a second terminal, each complete on its own line."""
    base = shlex.quote(program)
    if str(socket_path) != DEFAULT_SOCKET_PATH:
        base += " --socket " + shlex.quote(str(socket_path))
    width = max(len(f"{base} {words}") for words, _ in NEXT_COMMANDS)
    return [f"  {(base + ' ' + words).ljust(width)}  # {what}" for words, what in NEXT_COMMANDS]


def daemon_command(run_dir: Path, *, config: str | None, backend: str | None,
                   log_level: str | None, options: tuple[str, ...],
                   extra: tuple[str, ...], root: str | None = None,
                   state_dir: Path | None = None) -> list[str]:
    """``xentmemd`` with the same interpreter as this CLI, so the two never disagree."""
    argv = [sys.executable, "-m", "xentmem.guestd.app", "--run-dir", str(run_dir)]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    if root is not None:
        argv += ["--root", root]
    if config is not None:
        argv += ["--config", config]
    if backend is not None:
        argv += ["--backend", backend]
    if log_level is not None:
        argv += ["--log-level", log_level]
    for word in options:
        argv += ["-o", word]
    return argv + list(extra)


def child_env(parent: dict[str, str] | os._Environ[str], stderr_is_tty: bool) -> dict[str, str]:
    env = dict(parent)
    if stderr_is_tty:
        # Journal-style log lines (no timestamps) only make sense when stderr is the journal.
        for name in SERVICE_ENV:
            env.pop(name, None)
    return env


def describe_ready(status: dict[str, Any] | None, pid: int, socket_path: Path,
                   program: str = "xentmem") -> list[str]:
    """The lines printed once the daemon is ready; ``program`` is how to type this CLI."""
    lines = [f"xentmemd is ready (pid {pid})"]
    if status is not None:
        choice = status.get("backend_choice") or {}
        backend = status.get("backend") or {}
        name = backend.get("name") if isinstance(backend, dict) else None
        how = choice_text(choice) if choice else ""
        lines.append(f"  backend: {name or 'none loaded'}" + (f" ({how})" if how else ""))
        balloon = status.get("balloon")
        if isinstance(balloon, dict):
            lines.append("  balloon: " + balloon_summary(balloon))
    lines.append(f"  socket:  {socket_path}")
    lines.append("In another terminal, paste any of these as they are:")
    lines += next_commands(program, socket_path)
    shorter = []
    if program != "xentmem":
        shorter.append(f"source {shlex.quote(str(Path(program).parent / 'activate'))}")
    if str(socket_path) != DEFAULT_SOCKET_PATH:
        shorter.append(f"export XENTMEM_SOCKET={shlex.quote(str(socket_path))}")
    if shorter:
        lines.append(f"  (or once: {'; '.join(shorter)}; then plain `xentmem status`)")
    lines.append("Ctrl-C stops it (swap pages held in tmem go back to their backing stores "
                 "first).")
    return lines


def choice_text(choice: dict[str, Any]) -> str:
    """``auto, the default: <why>`` or the reason a named backend gives (where it was named)."""
    requested, origin = choice.get("requested"), choice.get("from")
    if requested != "auto":
        return str(choice.get("reason"))
    where = "the default" if origin in (None, "default") else f"from {origin}"
    return f"auto, {where}: {choice.get('reason')}"


def balloon_summary(balloon: dict[str, Any]) -> str:
    if not balloon.get("running"):
        why = balloon.get("not_running_because")
        return "not running" + (f" ({why})" if why else "")
    jobs = balloon.get("jobs")
    text = "running" + (f" ({', '.join(jobs)})" if jobs else "")
    if balloon.get("report_only"):
        text += ", report-only: it computes targets but does not move the balloon"
    return text


@contextmanager
def forwarded_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Route Ctrl-C, SIGTERM and SIGHUP to ``on_signal`` while the daemon runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        on_signal(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def opened_socket(status: dict[str, Any] | None, expected: Path) -> Path:
    """The socket in the run directory the daemon reports (``expected`` if it says none)."""
    run_dir = status.get("run_dir") if isinstance(status, dict) else None
    return Path(run_dir) / SOCKET_NAME if isinstance(run_dir, str) and run_dir else expected


def ready_status(socket_path: Path, timeout: float) -> dict[str, Any] | None:
    """The daemon's status for the banner; None (and the banner without it) on any error."""
    try:
        with ControlClient(socket_path, timeout=timeout) as client:
            return client.status()
    except ControlError:
        return None


def already_running(socket_path: Path) -> bool:
    """Whether a daemon answers on ``socket_path`` (then a second one must not start)."""
    if not socket_path.exists():
        return False
    try:
        with ControlClient(socket_path, timeout=2.0) as client:
            client.hello()
    except ControlError:
        return False
    return True


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the socket goes [default: $XDG_RUNTIME_DIR/xentmem, else a new "
                   "temporary directory; swap areas go to its state/].")
@click.option("--system", is_flag=True,
              help="Use the system service's places, /run/xentmem and /var/lib/xentmem "
                   "(root; stop the service first).")
@click.option("--root", envvar="XENTMEM_ROOT", show_envvar=True,
              type=click.Path(file_okay=False, exists=True),
              help="A system root to read /proc, /sys and /etc from instead of / (a test "
                   "tree or a copy of another guest's files).")
@click.option("--config", type=click.Path(dir_okay=False),
              help="Config file [default: /etc/xentmem/xentmem.toml if present].")
@click.option("--backend", shell_complete=complete_backend,
              help="Backend to load: auto (xen on a Xen guest with a tmem host, else "
                   "zcache), zcache, xen, ...  [default: from the config, else auto]")
@click.option("--log-level", type=click.Choice(("debug", "info", "warning", "error")),
              help="How much the daemon says [default: info].")
@click.option("-o", "--option", "options", multiple=True, metavar="NAME=VALUE",
              help="A param, flag or knob for the daemon (repeatable): capacity=64M.")
@click.option("--start-timeout", type=Seconds(min=0.0, min_open=True),
              default=DEFAULT_START_TIMEOUT_S, show_default=True, metavar="SECONDS",
              help="Give up if the daemon is not ready by then.")
@click.argument("daemon_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- XENTMEMD_ARGS]")
@click.pass_obj
def run(app: App, *, run_dir: Path | None, system: bool, root: str | None,
        config: str | None, backend: str | None,
        log_level: str | None, options: tuple[str, ...], start_timeout: float,
        daemon_args: tuple[str, ...]) -> None:
    """Run the daemon in this terminal and show what it does (Ctrl-C stops it).

    Without Xen it runs on the local zcache store and the balloon only reports.  It keeps
    its socket, lock, swap areas and shutdown record in a directory of its own (printed at
    start), never in the system service's unless --system.  Arguments after -- go to
    xentmemd unchanged (see `xentmemd --help`).

    Exit status: xentmemd's own (0: a clean stop; 1: pages lost, or it did not start; 2: a
    bad xentmemd argument; 78: its configuration refused), or 128+N when signal N killed it
    (137: SIGKILL), as a shell reports it.
    """
    after_run_dir, after_state_dir, daemon_args = split_places(daemon_args)
    run_dir = after_run_dir or run_dir
    if run_dir is not None:
        why = "-- --run-dir" if after_run_dir is not None else "--run-dir"
    else:
        run_dir, why = default_run_dir(os.environ, system=system)
    try:
        _run(app, run_dir, why, system=system, root=root, config=config, backend=backend,
             log_level=log_level, options=options, start_timeout=start_timeout,
             daemon_args=daemon_args, after_state_dir=after_state_dir)
    finally:
        if why == TEMPORARY:
            shutil.rmtree(run_dir, ignore_errors=True)


def _run(app: App, run_dir: Path, why: str, *, system: bool, root: str | None,
         config: str | None, backend: str | None, log_level: str | None,
         options: tuple[str, ...], start_timeout: float, daemon_args: tuple[str, ...],
         after_state_dir: Path | None) -> None:
    state_dir = after_state_dir or default_state_dir(run_dir, system=system)
    socket_path = run_dir / SOCKET_NAME
    if already_running(socket_path):
        app.abort(f"a xentmemd already answers on {socket_path}; stop it first or pick "
                  "another --run-dir")
    argv = daemon_command(run_dir, config=config, backend=backend, log_level=log_level,
                          options=options, extra=daemon_args, root=root, state_dir=state_dir)
    state_text = (f"{state_dir}" if state_dir is not None
                  else "the system service's (xentmemd's default, in its first log line)")
    app.status(f"xentmem run: starting xentmemd in the foreground; run dir {run_dir} ({why}), "
               f"state dir {state_text}")
    daemon = ForegroundDaemon(argv, child_env(os.environ, sys.stderr.isatty()))
    code = supervise(app, daemon, socket_path, start_timeout,
                     program=cli_path(sys.argv[0], sys.executable))
    if code != 0:
        raise click.exceptions.Exit(code)


def supervise(app: App, daemon: ForegroundDaemon, socket_path: Path,
              start_timeout: float, program: str = "xentmem") -> int:
    """Start, announce READY, echo STATUS changes, forward stop signals; the exit status."""
    clock = SystemClock()
    presses: list[int] = []

    def on_signal(signum: int) -> None:
        presses.append(signum)
        if len(presses) == 1:
            app.status("xentmem run: stopping xentmemd (unloading the backend, repatriating "
                       "swap pages); Ctrl-C again kills it at once")
            daemon.signal(signal.SIGTERM)
        else:
            app.status("xentmem run: killing xentmemd; pages it held only in tmem are lost")
            daemon.signal(signal.SIGKILL)

    with forwarded_signals(on_signal):
        pid = daemon.start()
        try:
            return _watch(app, daemon, pid, socket_path, start_timeout, clock, presses,
                          program)
        finally:
            # Only reached with the daemon alive if this process failed: stop it, in order.
            alive = daemon.process is not None and daemon.process.poll() is None
            if alive and daemon.stop(EMERGENCY_STOP_TIMEOUT_S) is None:
                daemon.kill()
            daemon.close()


def _watch(app: App, daemon: ForegroundDaemon, pid: int, socket_path: Path,
           start_timeout: float, clock: SystemClock, presses: list[int],
           program: str) -> int:
    deadline = clock.monotonic() + start_timeout
    ready = timed_out = False
    last_status: str | None = None
    for event in daemon.events():
        if event.exit_code is not None:
            return _exited(app, event.exit_code, ready=ready,
                           timed_out=start_timeout if timed_out else None)
        note = event.notification
        if note is not None and note.ready and not ready:
            ready = True
            last_status = note.status
            status = ready_status(socket_path, app.timeout)
            opened = opened_socket(status, socket_path)
            for line in describe_ready(status, pid, opened, program):
                app.status(line)
        elif note is not None and note.status and note.status != last_status:
            last_status = note.status
            if ready:
                app.status(f"xentmem run: {note.status}")
        if not ready and not presses and clock.monotonic() > deadline:
            timed_out = True
            presses.append(signal.SIGTERM)
            daemon.signal(signal.SIGTERM)
    raise AssertionError("events() ends with the exit event")  # pragma: no cover


def _exited(app: App, code: int, *, ready: bool, timed_out: float | None) -> int:
    """Say how the daemon ended; the status to exit with (128+N for signal N, as a shell)."""
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    status = EXIT_SIGNAL_BASE - code if code < 0 else code
    if timed_out is not None:
        app.abort(f"xentmemd was not ready within {timed_out:g}s, so it was stopped "
                  f"(it {how}; its messages are above)", EXIT_FAILURE)
    if not ready:
        app.abort(f"xentmemd {how} before it was ready (its messages are above)",
                  status or EXIT_FAILURE)
    app.status(f"xentmem run: xentmemd stopped (exit status {code})" if code >= 0
               else f"xentmem run: xentmemd {how}")
    return status
