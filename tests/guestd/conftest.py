"""Fixtures of the daemon tests: a fake guest root, a running ``xentmemd`` subprocess (both
from :mod:`fakes.guest_daemon`), and an in-process daemon core."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.guest_daemon import DaemonProcess, make_root
from fakes.recording_backend import RecordingBackend

from xentmem.clock import FakeClock
from xentmem.errors import UnknownBackend
from xentmem.guest.backends.zcache import ZcacheBackend
from xentmem.guestd.balloon import make_balloon
from xentmem.guestd.config import ConfigSchema, load
from xentmem.guestd.core import Daemon
from xentmem.roots import Roots
from xentmem_selfballoon.knobs import SELFBALLOON_PARAMS

#: Backends the in-process tests can load, by name (the daemon's registry seam).
TEST_BACKENDS = {"zcache": ZcacheBackend, "recording": RecordingBackend}


def resolver(extra: dict[str, type] | None = None) -> Any:
    """The daemon's name -> backend class seam over :data:`TEST_BACKENDS` plus ``extra``."""
    table = {**TEST_BACKENDS, **(extra or {})}

    def resolve(name: str) -> type:
        try:
            return table[name]
        except KeyError:
            raise UnknownBackend(f"unknown backend {name!r}; available backends: "
                             + ", ".join(table)) from None

    return resolve


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    return make_root(tmp_path)


def build_daemon(tmp_path: Path, root: Path, config_text: str | None = None, *,
                 suffix: str = ".toml", overrides: tuple[str, ...] = (),
                 balloon_loops: bool = True, backends: dict[str, type] | None = None) -> Daemon:
    """An in-process daemon core (no socket, no signals) over ``root``.

    ``balloon_loops=False`` turns the tmem flags ``selfballooning_at_load`` and
    ``selfshrinking`` off, so a load starts no worker (on the FakeClock a worker would tick
    without pause)."""
    roots = Roots(root=root, run_dir=tmp_path / "run")
    path = tmp_path / f"xentmem{suffix}"
    if config_text is not None:
        path.write_text(config_text)
    clock = FakeClock(1000.0)
    if not balloon_loops:
        overrides = ("selfballooning_at_load=0", "selfshrinking=0", *overrides)
    resolve = resolver(backends)
    schema = ConfigSchema(SELFBALLOON_PARAMS, lambda name: resolve(name).params)
    config = load(path, schema, overrides, missing_ok=config_text is None)
    balloon = make_balloon(roots, clock, config.knobs)
    return Daemon(roots=roots, clock=clock, config=config, balloon=balloon, config_path=path,
                  overrides=overrides, config_missing_ok=config_text is None, resolve=resolve)


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    """``start_daemon(root, config=None, *args)``: a started (READY) daemon, stopped at teardown.

    ``base`` (default: the test's tmp_path) holds its run dir, log and notify socket; a
    second daemon needs its own."""
    started: list[DaemonProcess] = []

    def start(root: Path, config: Path | None = None, *args: str, wait: bool = True,
              env: dict[str, str] | None = None, base: Path | None = None) -> DaemonProcess:
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        process = DaemonProcess(base or tmp_path, root, config, args, env)
        started.append(process)
        if wait:
            process.wait_ready()
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.stop()


@pytest.fixture
def make_daemon(tmp_path: Path, fake_root: Path) -> Iterator[Any]:
    """``make_daemon(config_text=None, suffix=".toml", overrides=(), balloon_loops=True,
    backends=None)``:
    an in-process daemon core over the fake root; shut down at teardown."""
    made: list[Daemon] = []

    def make(config_text: str | None = None, **kw: Any) -> Daemon:
        daemon = build_daemon(tmp_path, fake_root, config_text, **kw)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        if daemon.state != "stopped":
            daemon.shutdown()
