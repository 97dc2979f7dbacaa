"""Configuration errors stop the daemon with 78 (EXIT_CONFIG, which the unit does not restart),
wherever they are found: in the file, in ``-o`` words, or when the backend is loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fakes.recording_backend import RecordingBackend

from xentmem.clock import FakeClock
from xentmem.console import EXIT_CONFIG
from xentmem.errors import ConfigError, ParamError
from xentmem.guestd.app import Application, application_from_args, parse_args, serve
from xentmem.guestd.signals import SignalFlags
from xentmem.notify import Notifier
from xentmem.roots import Roots


def read(fake_root: Path, *argv: str) -> Any:
    args = parse_args(["--root", str(fake_root), *argv])
    return application_from_args(args, env={}).read_config()


def test_the_reviewers_command_line_is_refused_with_78(fake_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xentmem.guestd.app", "--root", str(fake_root),
         "--check-config", "-o", "selfbalooning=1", "-o", "capacity=bogus"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert "selfbalooning: unknown name" in result.stderr
    assert "ok" not in result.stdout


def test_check_config_refuses_a_control_group_the_start_would_refuse(fake_root: Path) -> None:
    """The start refuses a group that does not exist (78, so systemd does not restart it):
    --check-config once said ok to it (docs/configuration.md's example names a group)."""
    result = subprocess.run(
        [sys.executable, "-m", "xentmem.guestd.app", "--root", str(fake_root),
         "--check-config", "-o", "daemon.control_group=no-such-group-xentmem"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert "control socket group 'no-such-group-xentmem' does not exist" in result.stderr
    assert "ok" not in result.stdout


@pytest.mark.parametrize(("words", "message"), [
    (["-o", "selfbalooning=1"], "command line: selfbalooning: unknown name: not a shim flag, "
                                "knob or daemon setting, nor a param of any installed backend"),
    (["-o", "capacity=bogus"], "command line: [zcache] capacity: 'bogus'"),
    (["--backend", "xen", "-o", "capacity=64M"], "capacity: unknown name: not a shim flag, "
                                                 "knob or daemon setting, nor a param of the "
                                                 "backend 'xen'"),
])
def test_unqualified_names_no_backend_declares_are_refused(fake_root: Path, words: list[str],
                                                           message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read(fake_root, *words)
    assert message in str(caught.value)


@pytest.mark.parametrize("words", [
    ["-o", "capacity=64M"],  # zcache's
    ["-o", "timeout_ms=500"],  # xen's: auto may pick either
    ["--backend", "zcache", "-o", "max_pools=8"],
    ["-o", "selfballoon_interval=3", "-o", "frontswap=0"],  # a knob and a shim flag
])
def test_names_some_backend_declares_pass(fake_root: Path, words: list[str]) -> None:
    assert read(fake_root, *words) is not None


class RefusesAtLoad(RecordingBackend):
    """Accepts its params one by one but refuses the combination when it connects."""

    name: ClassVar[str] = "refuses"

    def connect(self) -> None:
        raise ParamError("max_pools: more than this host allows")


def test_a_param_refused_at_load_exits_78(tmp_path: Path, fake_root: Path) -> None:
    config = tmp_path / "xentmem.conf"
    config.write_text("options xentmemd backend=refuses\n")
    app = Application(roots=Roots(root=fake_root, run_dir=tmp_path / "run"), config_path=config,
                      config_missing_ok=False, clock=FakeClock(0.0), notifier=Notifier(None),
                      signals=SignalFlags(), resolve={"refuses": RefusesAtLoad}.__getitem__,
                      backend_names=lambda: ["refuses"])
    try:
        assert serve(app) == EXIT_CONFIG
    finally:
        app.signals.close()
