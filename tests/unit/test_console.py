"""Every console script follows ``xentmem.console``: click, ``-h``, one error line on
stderr, and one table of exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from xentmem import console
from xentmem.console import EXIT_CONFIG, EXIT_FAILURE, EXIT_UNREACHABLE, EXIT_USAGE


def script(name: str) -> list[str]:
    """An installed console script (pyproject's [project.scripts]), as a command."""
    found = Path(sys.executable).with_name(name)
    if not found.exists():
        pytest.fail(f"{name} is not installed in this environment (pip install -e .)")
    return [str(found)]


COMMANDS = {
    "xentmem": lambda: script("xentmem"),
    "xentmemd": lambda: script("xentmemd"),
    "xentmem-hostd": lambda: script("xentmem-hostd"),
    "mock_xenstored": lambda: [sys.executable, "-m", "xentmem.mock_xenstored"],
}


@click.command(name="demo-tool")
@click.option("--fail", type=int)
@console.json_option
def tool(fail: int | None, as_json: bool) -> None:
    if fail is not None:
        console.abort("it went wrong", fail)
    console.note("a note for a human")
    console.emit({"b": [1, 2], "a": "x"}, as_json=as_json, render=lambda d: f"a is {d['a']}")


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:  # click >= 8.2 keeps them apart already
        return CliRunner()


def test_the_table() -> None:
    assert (console.EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_CONFIG) == (
        0, 1, 2, 3, 78)


def test_json_is_one_compact_document_and_notes_go_to_stderr() -> None:
    result = runner().invoke(tool, ["--json"])
    assert result.exit_code == 0
    assert result.stdout == '{"a":"x","b":[1,2]}\n'
    assert result.stderr == "a note for a human\n"
    assert runner().invoke(tool, []).stdout == "a is x\n"


@pytest.mark.parametrize("code", [EXIT_FAILURE, EXIT_UNREACHABLE, EXIT_CONFIG])
def test_abort_is_one_line_named_after_the_script(code: int) -> None:
    result = runner().invoke(tool, ["--fail", str(code)])
    assert result.exit_code == code
    assert result.stdout == ""
    assert result.stderr == "demo-tool: error: it went wrong\n"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_script_is_click_with_help_and_usage_errors(name: str) -> None:
    command = COMMANDS[name]()
    helped = subprocess.run([*command, "-h"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("Usage: "), helped.stderr
    bad = subprocess.run([*command, "--no-such-option"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == EXIT_USAGE
    assert "No such option" in bad.stderr and bad.stdout == ""


def test_xentmemd_refuses_a_bad_configuration_with_78(tmp_path: Path) -> None:
    result = subprocess.run(
        [*script("xentmemd"), "--root", str(tmp_path), "--check-config", "-o",
         "capacity=bogus"], capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_CONFIG
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("xentmemd: error: "), result.stderr
