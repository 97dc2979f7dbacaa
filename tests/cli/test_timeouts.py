"""``load`` and ``unload`` wait long enough for a repatriation unless --timeout is given."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

import xentmem_cli.app as cli_app
from xentmem_cli.main import cli


class RecordingClient:
    """Stands in for ControlClient: records the timeout it was opened with."""

    opened: list[tuple[str, float]] = []

    def __init__(self, socket_path: str, timeout: float) -> None:
        self.opened.append((socket_path, timeout))

    def call(self, op: str, **args: Any) -> Any:
        return {"backend": "zcache", "repatriated": 0, "pools_dropped": 0, "params": {},
                "choice": {}} if op.startswith("backend.") else {"backend": None}

    def close(self) -> None:
        pass


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    RecordingClient.opened = []
    monkeypatch.setattr(cli_app, "ControlClient", RecordingClient)
    monkeypatch.delenv("XENTMEM_TIMEOUT", raising=False)
    return RecordingClient.opened


@pytest.mark.parametrize(("args", "env", "timeout"), [
    (["unload"], {}, cli_app.LONG_OP_TIMEOUT_S),
    (["load", "zcache"], {}, cli_app.LONG_OP_TIMEOUT_S),
    (["--timeout", "7", "unload"], {}, 7.0),
    (["load", "zcache"], {"XENTMEM_TIMEOUT": "20"}, 20.0),  # the variable is a choice too
    (["--timeout", "900", "unload"], {}, 900.0),
    (["reload"], {}, 10.0),  # only the ops that move pages wait long by default
])
def test_the_long_ops_wait_long_by_default(opened: list[tuple[str, float]], runner: CliRunner,
                                           args: list[str], env: dict[str, str],
                                           timeout: float) -> None:
    result = runner.invoke(cli, ["--socket", "/nonexistent/x.sock", *args, "--json"],
                                  env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [t for _, t in opened] == [timeout]
