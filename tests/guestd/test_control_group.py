"""A ``control_group`` the daemon cannot give its socket to (the shipped unit's bounding set
has no CAP_CHOWN; without SupplementaryGroups= root is no member of the group): the start
is refused as a configuration error (exit 78, not restarted in a loop), and a reload that
names it is refused whole, nothing applied.  The EPERM is injected: every chown to a group
fails, as it does for such a process."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xentmem.clock import FakeClock
from xentmem.console import EXIT_CONFIG
from xentmem.errors import ConfigError
from xentmem.guestd.app import Application, serve
from xentmem.guestd.signals import SignalFlags
from xentmem.notify import Notifier
from xentmem.roots import Roots

GROUP = str(os.getgid())  # a group that exists
NO_LOOPS = "[tmem]\nselfballooning_at_load = false\nselfshrinking = false\n"


@pytest.fixture
def no_chown_to_a_group(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """os.chown to a group fails with EPERM (no CAP_CHOWN, not a member); the calls seen."""
    real_chown = os.chown
    calls: list[Any] = []

    def chown(path: Any, uid: int, gid: int, **kwargs: Any) -> None:
        calls.append(path)
        if gid != -1:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        real_chown(path, uid, gid, **kwargs)

    monkeypatch.setattr(os, "chown", chown)
    return calls


@pytest.fixture
def application(tmp_path: Path, fake_root: Path) -> Iterator[Any]:
    """``application(config_text)``: an Application on the fake root (not started)."""
    made: list[tuple[Application, SignalFlags]] = []

    def make(text: str) -> Application:
        config = tmp_path / "xentmem.toml"
        config.write_text(text)
        signals = SignalFlags()
        app = Application(roots=Roots(root=fake_root, run_dir=tmp_path / "run"),
                          config_path=config, config_missing_ok=False, clock=FakeClock(0.0),
                          notifier=Notifier(None), signals=signals)
        made.append((app, signals))
        return app

    yield make
    for _, signals in made:
        signals.close()


def test_a_group_the_socket_cannot_be_given_to_is_a_config_error_at_start(
        application: Any, no_chown_to_a_group: list[Any], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    app = application(NO_LOOPS + f'[daemon]\nbackend = "zcache"\ncontrol_group = "{GROUP}"\n')
    assert serve(app) == EXIT_CONFIG  # it was 1: Restart=on-failure started it again and again
    assert no_chown_to_a_group  # it was tried
    assert "cannot be given to group" in caplog.text and "CAP_CHOWN" in caplog.text
    assert app.daemon is None  # refused before the backend, the swap areas, the socket
    run = tmp_path / "run"
    assert not (run / "control.sock").exists()
    assert not list(run.glob(".group-check-*"))  # the throwaway file is gone


def test_a_reload_naming_a_group_the_socket_cannot_be_given_to_changes_nothing(
        application: Any, no_chown_to_a_group: list[Any], tmp_path: Path) -> None:
    before = NO_LOOPS + '[daemon]\nbackend = "zcache"\n[selfballoon]\nselfballoon_interval = 5\n'
    app = application(before)
    app.start()
    try:
        assert app.daemon is not None and app.server is not None
        config = app.daemon.config
        socket = os.stat(app.server.path)
        (tmp_path / "xentmem.toml").write_text(
            before.replace("selfballoon_interval = 5", "selfballoon_interval = 9")
            .replace('backend = "zcache"\n', f'backend = "zcache"\ncontrol_group = "{GROUP}"\n'))
        with pytest.raises(ConfigError, match="cannot be given to group"):
            app.reload()
        assert app.daemon.config is config
        assert app.daemon.balloon.knobs.get("selfballoon_interval") == 5  # not applied
        after = os.stat(app.server.path)
        assert (after.st_gid, stat.S_IMODE(after.st_mode)) == \
            (socket.st_gid, stat.S_IMODE(socket.st_mode))
        assert app.server.socket.group == ""
        assert not list((tmp_path / "run").glob(".group-check-*"))
    finally:
        assert app.shutdown() == 0
