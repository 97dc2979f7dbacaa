"""Names in a config file: a key set twice is accepted (the later line wins, as with
modprobe), but never silently: a warning names both lines, and ``--check-config`` says which
line's value is in force.  A balloon job's knob is set through its tmem flag."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_config import schema

from xentmem.errors import ConfigError
from xentmem.guestd.app import command
from xentmem.guestd.config import load, read_config

TWICE = """\
options selfballoon selfballoon_interval=9
options tmem frontswap_writethrough=1
options selfballoon selfballoon_interval=12
"""


def test_a_key_on_two_lines_warns_with_both_lines(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "xentmem.conf"
    path.write_text(TWICE)
    with caplog.at_level(logging.WARNING):
        config = read_config(path, schema())
    assert config.knobs["selfballoon_interval"] == 12
    assert config.origins["selfballoon.selfballoon_interval"] == f"{path}:3"
    assert config.warnings == (
        f"{path}:3: [selfballoon] selfballoon_interval is set again (first at {path}:1); "
        f"the value at {path}:3 wins",)
    assert f"{path}:1" in caplog.text and f"{path}:3" in caplog.text


def test_a_key_twice_on_one_line_warns_too(tmp_path: Path) -> None:
    path = tmp_path / "xentmem.conf"
    path.write_text("options xentmemd log_level=debug log_level=error\n")
    config = read_config(path, schema())
    assert config.daemon["log_level"] == "error"
    assert len(config.warnings) == 1 and "log_level is set again" in config.warnings[0]


def test_distinct_keys_and_command_line_overrides_do_not_warn(tmp_path: Path) -> None:
    path = tmp_path / "xentmem.conf"
    path.write_text("options selfballoon selfballoon_interval=9\n")
    config = load(path, schema(), ["selfballoon_interval=4"])
    assert config.knobs["selfballoon_interval"] == 4
    assert config.warnings == ()


def test_check_config_names_the_line_that_won(tmp_path: Path) -> None:
    path = tmp_path / "xentmem.conf"
    path.write_text(TWICE)
    root = tmp_path / "root"
    root.mkdir()
    runner = CliRunner()
    result = runner.invoke(command, ["--root", str(root), "--config", str(path),
                                     "--check-config"])
    assert result.exit_code == 0, result.output
    assert f"selfballoon.selfballoon_interval = 12 (from {path}:3)" in result.output
    assert (f"warning: {path}:3: [selfballoon] selfballoon_interval is set again "
            f"(first at {path}:1)") in result.output


@pytest.mark.parametrize(("knob", "flag"), [("selfballooning", "selfballooning_at_load"),
                                            ("frontswap_selfshrinking", "selfshrinking")])
def test_a_job_knob_in_the_config_points_at_its_flag(tmp_path: Path, knob: str,
                                                     flag: str) -> None:
    """One name for one thing: the flag is the knob's value at each load, so the config sets
    the flag, and naming the knob there says so instead of being overwritten at load."""
    path = tmp_path / "xentmem.conf"
    path.write_text(f"options selfballoon {knob}=0\n")
    with pytest.raises(ConfigError) as info:
        read_config(path, schema())
    message = str(info.value)
    assert message.startswith(f"{path}:1: [selfballoon] {knob}: takes the tmem flag {flag}")
    assert f"options tmem {flag}=0" in message
