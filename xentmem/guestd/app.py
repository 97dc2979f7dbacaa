"""``xentmemd``: the composition root, the main loop and the command line.

Start: the config (refused: exit 78), the run and state directories' locks (another live
daemon: exit, touching nothing of its own), the shim and its backend, the control socket,
READY.  Run: the main thread waits on the signal flags' self-pipe and does what is due
(WATCHDOG first, the metrics textfile, STATUS, a SIGHUP reload); it never waits for a lock a
long socket op may hold, so the WATCHDOG ping keeps coming during an unload.  Stop: balloon
loops, backend (swap pages repatriated), sockets; exit 0 only if nothing was left behind
(``docs/configuration.md``, "Stopping and exit status").
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from xentmem import __version__
from xentmem.clock import Clock, SystemClock, WakeableClock
from xentmem.console import CONTEXT_SETTINGS, EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, abort
from xentmem.control.server import check_group, group_id
from xentmem.errors import ConfigError, ParamError, XentmemError
from xentmem.guest import registry
from xentmem.guestd import balloon as balloon_mod
from xentmem.guestd import config as config_mod
from xentmem.guestd import handlers
from xentmem.guestd.choice import Resolve
from xentmem.guestd.config import (
    DAEMON_SECTION,
    DEFAULT_CONFIG,
    BackendNames,
    Config,
    ConfigSchema,
)
from xentmem.guestd.core import Daemon
from xentmem.guestd.logs import set_level, setup_logging
from xentmem.guestd.mainthread import DaemonBusy, MainThreadCalls, NotNow
from xentmem.guestd.metrics import write_textfile
from xentmem.guestd.nbd.resident import THREAD_STACK_BYTES, io_flusher_for_every_thread
from xentmem.guestd.nbd.server import NBD_SOCKET, NbdServer, serve_nbd
from xentmem.guestd.rundir import RunDirLock
from xentmem.guestd.server import ControlServer, ServerError
from xentmem.guestd.signals import SignalFlags
from xentmem.guestd.swap import DEFAULT_STATE_DIR
from xentmem.notify import Notifier
from xentmem.roots import Roots
from xentmem_selfballoon.knobs import SELFBALLOON_PARAMS

log = logging.getLogger("xentmem.guestd")

#: How often the STATUS= line (and the debug log line) is refreshed.
STATUS_INTERVAL_S = 60.0
#: How long a client's ``config.reload`` waits for the main thread to start it (and as long
#: again to finish): below the CLI's default 10 s, so the client hears "busy", not a timeout.
RELOAD_WAIT_S = 4.0
#: While a reload waits for the configuration lock, the main loop looks again this often.
RETRY_S = 0.25


@dataclass
class Task:
    """Something the main loop does every ``interval_s`` (first after one interval)."""

    name: str
    interval_s: float
    action: Callable[[], None]
    due: float = 0.0
    #: Run before the other due tasks (the WATCHDOG ping).
    first: bool = False


class Schedule:
    """The main loop's timetable, on an injected clock.

    Only the main thread changes it in the daemon; a lock keeps it consistent anyway, and
    every look iterates over a copy.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._tasks: dict[str, Task] = {}
        self._lock = threading.Lock()

    def every(self, name: str, interval_s: float | None, action: Callable[[], None], *,
              first: bool = False) -> None:
        """Add, replace or (with ``None``) remove a task; ``first`` runs before the others."""
        with self._lock:
            if interval_s is None or interval_s <= 0:
                self._tasks.pop(name, None)
                return
            self._tasks[name] = Task(name, interval_s, action,
                                     self._clock.monotonic() + interval_s, first)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._tasks)

    def _snapshot(self) -> list[Task]:
        with self._lock:
            return sorted(self._tasks.values(), key=lambda t: not t.first)

    def timeout(self, ceiling_s: float) -> float:
        """Seconds until the next task is due (at most ``ceiling_s``)."""
        now = self._clock.monotonic()
        nearest = min((t.due for t in self._snapshot()), default=now + ceiling_s)
        return max(0.0, min(ceiling_s, nearest - now))

    def run_due(self) -> list[str]:
        """Run every task that is due, ``first`` ones first; a failing task is logged and
        stays scheduled."""
        now = self._clock.monotonic()
        ran = []
        for task in self._snapshot():
            if now + 1e-9 >= task.due:
                task.due = now + task.interval_s
                try:
                    task.action()
                except Exception:
                    log.exception("main loop task %s failed", task.name)
                ran.append(task.name)
        return ran


class OffMainThread:
    """Runs an action on a thread of its own, one run at a time, so the main loop never
    waits for it: a run that is still going when the next is due makes that one a skip.

    The metrics textfile and the STATUS line read figures behind the frontends' locks, which
    an unload holds while it repatriates; on the main thread they would stall the WATCHDOG
    ping until systemd killed the daemon mid-repatriation.
    """

    def __init__(self, name: str, action: Callable[[], None]) -> None:
        self.name = name
        self._action = action
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.skipped = 0

    def __call__(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self.skipped += 1
                if self.skipped == 1:
                    log.warning("%s: the previous run has not finished (a long unload or "
                                "shrink holds the figures); skipping until it has", self.name)
                return
            if self.skipped:
                log.info("%s: running again after %d skipped", self.name, self.skipped)
                self.skipped = 0
            thread = threading.Thread(target=self._run, name=f"xentmem-{self.name}",
                                      daemon=True)
            self._thread = thread
        thread.start()

    def _run(self) -> None:
        try:
            self._action()
        except Exception:
            log.exception("main loop task %s failed", self.name)

    def join(self, timeout_s: float) -> bool:
        """Wait for a run in progress; True if none is left."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            return not thread.is_alive()
        return True


class Application:
    """The daemon process: config, daemon core, control socket, signals, sd_notify."""

    def __init__(
        self,
        *,
        roots: Roots,
        config_path: Path,
        config_missing_ok: bool,
        overrides: Sequence[str] = (),
        clock: WakeableClock | None = None,
        notifier: Notifier | None = None,
        signals: SignalFlags | None = None,
        resolve: Resolve = registry.backend_class,
        make_balloon: Callable[..., Any] = balloon_mod.make_balloon,
        reload_wait_s: float = RELOAD_WAIT_S,
        state_dir: Path | None = None,
        backend_names: BackendNames = registry.available,
    ) -> None:
        self.roots = roots
        #: File-backed swap areas (``swap/``) and ``shutdown.json``: kept across restarts.
        self.state_dir = state_dir or roots.under(DEFAULT_STATE_DIR)
        self.config_path = config_path
        self.config_missing_ok = config_missing_ok
        self.overrides = tuple(overrides)
        self.clock: WakeableClock = clock or SystemClock()
        self.notifier = notifier or Notifier(None)
        self.signals = signals or SignalFlags()
        self.resolve = resolve
        self.backend_names = backend_names
        self._make_balloon = make_balloon
        self.schedule = Schedule(self.clock)
        self.daemon: Daemon | None = None
        self.server: ControlServer | None = None
        self.nbd_server: NbdServer | None = None
        self.run_lock = RunDirLock(roots.run)
        self.state_lock = RunDirLock(self.state_dir, what="state directory", flag="--state-dir",
                                     mode=0o700)
        #: Calls other threads hand to the main thread (a client's config.reload).
        self.calls = MainThreadCalls(self.signals.wake)
        self.reload_wait_s = reload_wait_s
        self._sighup_pending = False
        self.status_task = OffMainThread("status", self._status)
        self.metrics_task = OffMainThread("metrics", self.write_metrics)
        #: Set at shutdown, under ``_metrics_lock``: a periodic write still in flight must
        #: not land after the final one.
        self._metrics_lock = threading.Lock()
        self._metrics_final = False
        #: The last failed write's error, said once (not a traceback every interval).
        self._metrics_failed: str | None = None

    # -- start ------------------------------------------------------------------------------------

    def read_config(self) -> Config:
        schema = ConfigSchema(SELFBALLOON_PARAMS,
                              lambda name: self.resolve(name).params, self.backend_names)
        return config_mod.load(self.config_path, schema, self.overrides,
                               missing_ok=self.config_missing_ok)

    def start(self) -> None:
        """Everything up to READY; raises ConfigError/XentmemError/ServerError on failure."""
        config = self.read_config()
        set_level(config.daemon["log_level"])
        log.info("xentmemd %s starting: config %s, root %s, run dir %s, state dir %s",
                 __version__, config.path or f"{self.config_path} (absent: defaults)",
                 self.roots.root, self.roots.run, self.state_dir)
        # Before the backend, the socket or any file: a second daemon stops here (RunDirBusy).
        self.run_lock.acquire()
        self.state_lock.acquire()
        # Before anything changes: a group the socket cannot be given to is a config error
        # (exit 78, not restarted), as a reload refuses it.
        group = config.daemon["control_group"]
        if group:
            try:
                self.check_control_group(group)
            except ServerError as exc:
                where = config.origin(DAEMON_SECTION, "control_group") or "control_group"
                raise ConfigError(f"{where}: control_group: {exc}") from None
        balloon = self._make_balloon(self.roots, self.clock, config.knobs)
        self.daemon = Daemon(
            roots=self.roots, clock=self.clock, config=config, balloon=balloon,
            config_path=self.config_path, overrides=self.overrides,
            config_missing_ok=self.config_missing_ok, resolve=self.resolve,
            on_settings=self.apply_settings, state_dir=self.state_dir,
            backend_names=self.backend_names, check_control_group=self.check_control_group,
        )
        # A client's config.reload runs here, on the main thread, which owns the schedule
        # and the daemon settings a reload changes.
        self.daemon.reload_runner = self._reload_for_client
        # The record says "running" before anything is taken over, so a crash from here on
        # shows; then the file swap areas an earlier run left are re-attached.
        self.daemon.begin_run()
        self.daemon.load()
        daemon = self.daemon
        self.server = ControlServer(
            self.roots.run / "control.sock",
            lambda line: handlers.handle_line(daemon, line),
            mode=config.daemon["control_mode"], group=config.daemon["control_group"],
            idle_timeout_s=config.daemon["control_idle_timeout"],
        )
        self.server.start()
        self.nbd_server = serve_nbd(daemon.nbd, self.roots.run / NBD_SOCKET,
                                    config.daemon["nbd_tcp"])
        self._schedule_tasks(config.daemon)
        self.daemon.state = "running"
        self.notifier.ready(self.daemon.summary_line())
        log.info("ready: %s", self.daemon.summary_line())

    def check_control_group(self, group: str) -> None:
        """That the control socket (in the run directory) can be given to ``group``:
        ServerError if not (no such group, no CAP_CHOWN and not a member of it)."""
        check_group(self.roots.run, group)

    def _schedule_tasks(self, settings: Mapping[str, Any]) -> None:
        self.schedule.every("watchdog", self.notifier.watchdog_interval_s, self.notifier.watchdog,
                            first=True)
        self.schedule.every("status", STATUS_INTERVAL_S, self.status_task)
        textfile = settings["metrics_textfile"]
        self.schedule.every("metrics", settings["metrics_interval"] if textfile else None,
                            self.metrics_task)

    def apply_settings(self, settings: Mapping[str, Any]) -> None:
        """The daemon's own settings after a reload: log level, socket access, metrics."""
        set_level(settings["log_level"])
        if self.server is not None:
            try:
                self.server.set_access(settings["control_mode"], settings["control_group"])
            except (OSError, ServerError) as exc:
                log.error("config: control socket access unchanged: %s", exc)
            self.server.idle_timeout_s = settings["control_idle_timeout"]
        self._schedule_tasks(settings)

    # -- run --------------------------------------------------------------------------------------

    def _status(self) -> None:
        assert self.daemon is not None
        if self.daemon.state != "running":  # a late run after STOPPING=1 says nothing
            return
        line = self.daemon.summary_line()
        self.notifier.status(line)
        log.debug("status: %s", line)

    def write_metrics(self, *, final: bool = False) -> None:
        """Write the textfile (if one is configured); after the final write, no other."""
        assert self.daemon is not None
        target = self.daemon.config.daemon["metrics_textfile"]
        if not target:
            return
        text = self.daemon.metrics_text()
        with self._metrics_lock:
            if self._metrics_final:
                return
            self._metrics_final = final
            try:
                write_textfile(Path(target), text)
            except OSError as exc:
                self._metrics_write_failed(target, exc)
                return
            if self._metrics_failed is not None:
                log.info("metrics textfile %s written again", target)
                self._metrics_failed = None

    def _metrics_write_failed(self, target: str, exc: OSError) -> None:
        """Say once why the textfile cannot be written (again when the reason changes); the
        daemon goes on, and tries again at the next interval."""
        reason = f"{target}: {exc.strerror or exc}"
        if reason == self._metrics_failed:
            return
        self._metrics_failed = reason
        hint = ""
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            hint = ("; under the shipped unit (ProtectSystem=strict) its directory needs "
                    "ReadWritePaths= in a drop-in")
        log.error("cannot write the metrics textfile %s%s; trying again every "
                  "metrics_interval, said again only if the reason changes", reason, hint)

    def reload(self, *, lock_wait_s: float | None = None) -> dict[str, Any]:
        """Re-read the config now (main thread); RELOADING=1 ... READY=1 around it.

        :class:`DaemonBusy` (nothing done, nothing sent) if the configuration lock is not
        free within ``lock_wait_s``; a refused file raises its ConfigError after READY=1.
        """
        assert self.daemon is not None
        daemon = self.daemon
        with daemon.holding_config(lock_wait_s):
            self.notifier.reloading()
            try:
                return daemon.reload_config()
            finally:
                self.notifier.send("READY=1", f"STATUS={daemon.summary_line()}")

    def _reload_for_client(self) -> dict[str, Any]:
        """A client's ``config.reload``: handed to the main thread, with a bounded wait."""
        return self.calls.call(self._reload_on_main_thread, self.reload_wait_s,
                               what="config.reload")

    def _reload_on_main_thread(self) -> dict[str, Any]:
        try:
            return self.reload(lock_wait_s=0)
        except DaemonBusy:
            raise NotNow from None

    def _reload_after_sighup(self) -> None:
        """SIGHUP: reload when the configuration lock is free; a refused file is logged."""
        try:
            self.reload(lock_wait_s=0)
        except DaemonBusy:
            if not self._sighup_pending:
                log.info("SIGHUP: a load, unload or param change is running; the reload "
                         "follows when it is done")
            self._sighup_pending = True
            return
        except (ConfigError, XentmemError) as exc:
            log.error("config reload refused, the old config stays in force: %s", exc)
        self._sighup_pending = False

    def run(self, max_wait_s: float = STATUS_INTERVAL_S) -> None:
        """The main loop: until SIGTERM/SIGINT (``signals.terminate_requested``).

        The wait is on the signal flags' self-pipe, so a signal (or another thread asking for
        something) ends it at once; the pipe is drained before the flags are read, so a
        request that comes in after that look wakes the next wait.
        """
        flags = self.signals
        while not flags.terminate_requested:
            timeout = self.schedule.timeout(max_wait_s)
            if self._sighup_pending or self.calls.pending():
                timeout = min(timeout, RETRY_S)
            self.clock.wait_readable(flags.fileno(), timeout)
            flags.drain()
            if flags.terminate_requested:
                break
            self.schedule.run_due()
            if flags.take_reload() or self._sighup_pending:
                self._reload_after_sighup()
            self.calls.run_ready()

    # -- stop -------------------------------------------------------------------------------------

    def shutdown(self, start_error: str | None = None) -> int:
        """Loops, backend (repatriating), then sockets; the exit status.

        A start that failed before this process owned the run directory has nothing to
        stop: the directory, its socket and its shutdown record belong to another daemon.
        One that failed later (``start_error``) adds that to the shutdown record.
        """
        if not (self.run_lock.held and self.state_lock.held):
            self.notifier.close()
            self.run_lock.release()
            return EXIT_FAILURE
        self.notifier.stopping("stopping: repatriating swap pages")
        status = EXIT_OK
        held: set[str] | None = None
        if self.nbd_server is not None:  # no NBD write may land after the areas are flushed
            if self.daemon is not None:
                held = self.daemon.nbd.held()
            try:
                if not self.nbd_server.stop():
                    log.error("NBD: connections still open after the grace period")
            except Exception:
                log.exception("stopping the NBD server failed")
                status = EXIT_FAILURE
        if self.daemon is not None:
            try:
                if not self.daemon.shutdown(start_error, nbd_held=held)["clean"]:
                    status = EXIT_FAILURE
            except Exception:  # Daemon.shutdown records its own failures; this is a bug
                log.exception("shutdown of the daemon core failed")
                status = EXIT_FAILURE
            if self.daemon.config.daemon["metrics_textfile"]:
                try:
                    self.write_metrics(final=True)
                except Exception as exc:
                    log.error("metrics textfile: %s", exc)
        # Whatever failed above, the socket goes and systemd hears the rest.
        if self.server is not None:
            try:
                self.server.stop()
            except Exception:
                log.exception("closing the control socket failed")
                status = EXIT_FAILURE
        self.notifier.close()
        self.state_lock.release()
        self.run_lock.release()
        log.info("xentmemd stopped")
        return status


# -- command line ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    """The command line, parsed: what :func:`application_from_args` builds the daemon from."""

    config: str | None = None
    root: str | None = None
    run_dir: str | None = None
    state_dir: str | None = None
    xenstore_socket: str | None = None
    backend: str | None = None
    log_level: str | None = None
    control_group: str | None = None
    control_mode: str | None = None
    metrics_textfile: str | None = None
    option: tuple[str, ...] = ()
    check_config: bool = False


@click.command(
    name="xentmemd", context_settings=CONTEXT_SETTINGS,
    epilog="Precedence: -o and other flags > the config file > the kernel command line "
           "(deprecated) > defaults.  SIGHUP re-reads the config; SIGTERM stops cleanly.",
)
@click.option("--config", metavar="PATH",
              help=f"Config file (.toml, or modprobe-style lines in any other file); default "
                   f"{DEFAULT_CONFIG} under --root, which may be absent.")
@click.option("--root", metavar="PATH",
              help="System root for /proc, /sys and /etc (default / or $XENTMEM_ROOT).")
@click.option("--run-dir", metavar="PATH",
              help="Run directory for the control socket (default /run/xentmem under --root).")
@click.option("--state-dir", metavar="PATH",
              help="State directory, kept across restarts, for file-backed swap areas and "
                   "shutdown.json (default $STATE_DIRECTORY, else /var/lib/xentmem under "
                   "--root).")
@click.option("--xenstore-socket", metavar="PATH",
              help="xenstored Unix socket (default: the xenbus device, or $XENSTORED_PATH).")
@click.option("--backend", help="Backend to load: auto, zcache, xen, ...")
@click.option("--log-level", type=click.Choice(config_mod.LOG_LEVELS))
@click.option("--control-group", help="Group allowed on the control socket (0660).")
@click.option("--control-mode", help="Control socket mode in octal.")
@click.option("--metrics-textfile", metavar="PATH", help="node_exporter textfile to write.")
@click.option("-o", "--option", multiple=True, metavar="[SECTION.]K=V",
              help="A param, flag or knob (repeatable): capacity=64M, tmem.cleancache=0, "
                   "selfballoon_interval=10.")
@click.option("--check-config", is_flag=True,
              help="Check the configuration, print it, and exit.")
@click.version_option(__version__, prog_name="xentmemd", message="%(prog)s %(version)s")
def command(**params: Any) -> None:
    """Transcendent memory and self-ballooning for a Xen guest, in user space."""
    args = Options(**params)
    setup_logging(args.log_level or "info")
    app = application_from_args(args)
    if args.check_config:
        check_config(app)
        return
    # Before any thread: once the daemon serves swap its memory is locked, each thread's
    # whole stack with it (docs/nbd.md, "No deadlock under memory pressure").
    threading.stack_size(THREAD_STACK_BYTES)
    # And every thread an I/O flusher, so that none waits in reclaim on its own device.
    io_flusher_for_every_thread()
    app.signals.install()
    status = serve(app)
    app.signals.ignore_from_now()  # the stop is done: a late signal must not change its status
    raise click.exceptions.Exit(status)


def parse_args(argv: Sequence[str]) -> Options:
    """The command line as :class:`Options`, running nothing (a usage error raises)."""
    with command.make_context("xentmemd", list(argv)) as ctx:
        return Options(**ctx.params)


def overrides_of(args: Options) -> list[str]:
    """The flags as ``-o`` words (named flags first, so an explicit -o wins)."""
    words = []
    for flag, key in (("backend", "backend"), ("log_level", "log_level"),
                      ("control_group", "control_group"), ("control_mode", "control_mode"),
                      ("metrics_textfile", "metrics_textfile")):
        value = getattr(args, flag)
        if value is not None:
            words.append(f"daemon.{key}={value}")
    return words + list(args.option)


def application_from_args(args: Options, env: Mapping[str, str] | None = None) -> Application:
    env = os.environ if env is None else env
    root = Path(args.root or env.get("XENTMEM_ROOT") or "/")
    run_dir = Path(args.run_dir) if args.run_dir else None
    xenstore = args.xenstore_socket or env.get("XENSTORED_PATH")
    roots = Roots(root=root, run_dir=run_dir,
                  xenstore_socket=Path(xenstore) if xenstore else None)
    if args.config:
        config_path, missing_ok = Path(args.config), False
    else:
        config_path, missing_ok = roots.under(DEFAULT_CONFIG), True
    # systemd's StateDirectory= sets $STATE_DIRECTORY (a colon-separated list: ours is first).
    state = args.state_dir or env.get("STATE_DIRECTORY", "").split(":")[0]
    return Application(roots=roots, config_path=config_path, config_missing_ok=missing_ok,
                       overrides=overrides_of(args), notifier=Notifier.from_env(env),
                       state_dir=Path(state) if state else None)


def check_config(app: Application) -> None:
    """``--check-config``: the configuration as it would apply, or a refusal (exit 78)."""
    try:
        config = app.read_config()
    except ConfigError as exc:
        abort(str(exc), EXIT_CONFIG)
    group = config.daemon["control_group"]
    if group:  # the start refuses a group that does not exist (78, not restarted): say so now
        try:
            group_id(group)
        except ServerError as exc:
            where = config.origin(DAEMON_SECTION, "control_group") or "control_group"
            abort(f"{where}: control_group: {exc}", EXIT_CONFIG)
    click.echo(f"{config.path or app.config_path}: ok")
    for key, where in sorted(config.origins.items()):
        section, _, name = key.partition(".")
        value = {"daemon": config.daemon, "tmem": config.tmem,
                 "selfballoon": config.knobs}.get(section)
        shown = (value or {}).get(name, config.backend_params.get(section, {}).get(name))
        click.echo(f"  {key} = {shown!r} (from {where})")
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script ``xentmemd`` (exits with the status of the table in
    :mod:`xentmem.console`)."""
    command.main(args=None if argv is None else list(argv), prog_name="xentmemd")


def serve(app: Application) -> int:
    """Start, run until told to stop, shut down: the exit status.  A failed start cleans up
    only what this process owns (see :meth:`Application.shutdown`)."""
    try:
        app.start()
    except (ConfigError, ParamError) as exc:
        # A param refused at load is a configuration error too: restarting cannot help,
        # and 78 is what the unit's RestartPreventExitStatus= stops on.
        log.error("refusing to start: %s", exc)
        app.shutdown(start_error=f"refusing to start: {exc}")
        return EXIT_CONFIG
    except (XentmemError, ServerError, OSError) as exc:
        log.error("cannot start: %s", exc)
        app.shutdown(start_error=f"cannot start: {exc}")
        return EXIT_FAILURE
    try:
        app.run()
    finally:
        status = app.shutdown()
    return status


if __name__ == "__main__":  # pragma: no cover
    main()
