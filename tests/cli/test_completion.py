"""Shell completion: the scripts click generates, and what they complete."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from xentmem_cli.main import cli


def console_script() -> str:
    beside = Path(sys.executable).with_name("xentmem")
    found = str(beside) if beside.exists() else shutil.which("xentmem")
    if found is None:
        pytest.fail("the xentmem console script is not installed (pip install -e .)")
    return found


@pytest.mark.parametrize("shell,marker", [
    ("bash", "complete -o nosort -F _xentmem_completion xentmem"),
    ("zsh", "compdef _xentmem_completion xentmem"),
    ("fish", "complete --no-files --command xentmem"),
])
def test_installed_script_prints_a_completion_script(shell: str, marker: str) -> None:
    env = {**os.environ, "_XENTMEM_COMPLETE": f"{shell}_source"}
    result = subprocess.run([console_script()], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout
    assert "_XENTMEM_COMPLETE" in result.stdout


def complete(runner: Any, words: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash would offer for the last word of ``words``."""
    parts = words.split(" ")
    full_env = {"_XENTMEM_COMPLETE": "bash_complete", "COMP_WORDS": words,
                "COMP_CWORD": str(len(parts) - 1), **(env or {})}
    result = runner.invoke(cli, [], prog_name="xentmem", env=full_env)
    assert result.exit_code == 0, result.output
    return [line.split(",", 1)[1] for line in result.stdout.splitlines() if line]


def test_commands_and_options_complete(runner: Any) -> None:
    assert sorted(complete(runner, "xentmem st")) == ["stats", "status"]
    assert complete(runner, "xentmem params ") == ["get", "list", "set"]
    assert "--json" in complete(runner, "xentmem balloon --")


def test_backend_names_complete_from_the_installed_entry_points(runner: Any) -> None:
    assert complete(runner, "xentmem load ") == ["auto", "xen", "zcache"]
    assert complete(runner, "xentmem load z") == ["zcache"]
    assert complete(runner, "xentmem run --backend a") == ["auto"]


def test_param_names_complete_from_the_running_daemon(runner: Any, shared_daemon: Any) -> None:
    offered = complete(runner, f"xentmem --socket {shared_daemon.socket} params set "
                               "selfballoon_i")
    assert offered == ["selfballoon_interval"]
    from_env = complete(runner, "xentmem params get frontswap_h",
                        env={"XENTMEM_SOCKET": str(shared_daemon.socket)})
    assert from_env == ["frontswap_hysteresis"]


def test_param_completion_offers_nothing_without_a_daemon(
    runner: Any, no_daemon_socket: Path,
) -> None:
    assert complete(runner, f"xentmem --socket {no_daemon_socket} params get self") == []
