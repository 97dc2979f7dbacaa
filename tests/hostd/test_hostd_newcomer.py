"""``xentmem-hostd`` as a newcomer meets it: the socket's variable in every --help, a guest
listed as soon as it has a device, a domid that is no guest refused (and nothing made),
freeze/thaw shown as ``list`` shows guests, and a demo whose figures move."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from xentmem.control import protocol
from xentmem.hostd.cli import cli, render_domids, render_listing
from xentmem.hostd.handlers import HostControl
from xentmem.hostd.store import HostStore

WAIT_S = 60.0


class FakeDevice:
    """A guest's tmem device as ``list`` describes it: connected, no pool yet."""

    def __init__(self, domid: int) -> None:
        self.domid = domid

    def describe(self) -> dict[str, Any]:
        return {"domid": self.domid, "state": "Connected", "frontend_state": "Connected"}


@pytest.fixture
def control() -> HostControl:
    service = SimpleNamespace(store=HostStore(64 << 20), devices={3: FakeDevice(3)})
    return HostControl(service)  # type: ignore[arg-type]


def ask(control: HostControl, op: str, **args: Any) -> dict[str, Any]:
    line = json.dumps({"v": 1, "id": 1, "op": op, "args": args}).encode()
    return json.loads(control.handle_line(line))


@pytest.mark.parametrize("command", ["list", "freeze", "thaw", "set", "shared-auth",
                                     "freeable", "run"])
def test_every_command_names_the_socket_variable_in_its_help(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "XENTMEM_HOSTD_SOCKET" in result.output
    assert "XENTMEM_HOSTD_SOCKET" in CliRunner().invoke(cli, ["--help"]).output


def test_a_connected_guest_is_listed_before_it_has_a_pool(control: HostControl) -> None:
    listing = ask(control, "list")["result"]
    assert listing["clients"] == [] and [d["domid"] for d in listing["devices"]] == [3]
    text = render_listing(listing)
    assert "domain 3: device=Connected (no tmem client yet: no pool made)" in text
    assert ask(control, "list", domid=3)["result"]["devices"][0]["domid"] == 3


@pytest.mark.parametrize("op", ["freeze", "thaw", "list"])
def test_a_domid_that_is_no_guest_is_refused_and_nothing_is_made(control: HostControl,
                                                                 op: str) -> None:
    answer = ask(control, op, domid=7)
    assert answer["error"]["code"] == protocol.NOT_FOUND
    assert answer["error"]["message"] == ("domain 7 is not a guest of this service (guests: "
                                          "3); see `xentmem-hostd list`")
    assert 7 not in control.service.store.clients
    set_answer = ask(control, "set", domid=7, weight=1)
    assert set_answer["error"]["code"] == protocol.NOT_FOUND


def test_freeze_and_thaw_print_the_guests_as_list_does(control: HostControl) -> None:
    frozen = ask(control, "freeze", domid=3)["result"]
    text = render_domids(frozen)
    assert text.splitlines()[0] == "frozen: 3"
    assert text.splitlines()[1].startswith("domain 3: weight=0 compress=1 frozen=1 "
                                           "device=Connected")
    listed = render_listing(ask(control, "list")["result"]).splitlines()[1:]
    assert text.splitlines()[1:] == listed
    thawed = render_domids(ask(control, "thaw", domid="all")["result"])
    assert "frozen=0" in thawed.splitlines()[1]


def _lines(stream: Any, into: queue.Queue[str | None]) -> None:
    for raw in stream:
        into.put(raw.rstrip("\n"))
    into.put(None)


def _until(lines: queue.Queue[str | None], pattern: str) -> str:
    while True:
        line = lines.get(timeout=WAIT_S)
        if line is None:
            raise AssertionError(f"ended before {pattern!r}")
        if re.search(pattern, line):
            return line


def test_the_demo_load_moves_pages_through_the_host() -> None:
    directory = Path(tempfile.mkdtemp(prefix="demo-load-", dir="/tmp"))
    demo = subprocess.Popen(
        [sys.executable, "-m", "xentmem.hostd", "demo", "--dir", str(directory), "--load",
         "--load-interval", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_lines, args=(demo.stderr, err), daemon=True).start()
    try:
        assert demo.stdout is not None
        out = [demo.stdout.readline() for _ in range(5)]
        assert any("--control" in line and " list" in line for line in out), out
        _until(err, r"load: guest 1 round 2: stored 32 pages \(32 in tmem\), read back 24 "
                    r"intact")
        listed = subprocess.run(
            [sys.executable, "-m", "xentmem.hostd", "list", "--json"],
            env={**os.environ, "XENTMEM_HOSTD_SOCKET": str(directory / "hostd.sock")},
            capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0, listed.stderr
        client = json.loads(listed.stdout)["clients"][0]
        assert client["domid"] == 1 and client["persistent_pages"] > 0
        assert client["stats"]["succ_puts"] >= 64 and client["stats"]["found_gets"] >= 24
    finally:
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(WAIT_S)
    assert code == 0
    guest = subprocess.run(["pgrep", "-f", "--", f"--run-dir {directory}/guest-1"],
                           capture_output=True, text=True)
    assert (guest.returncode, guest.stdout) == (1, ""), "the demo stops the guest it started"
    shutdown = json.loads((directory / "guest-1" / "state" / "shutdown.json").read_text())
    assert shutdown["clean"] is True and shutdown["lost_pages"] == 0


@pytest.mark.parametrize("command", ["run", "demo"])
def test_the_capacity_help_shows_a_share_as_it_is_typed(command: str) -> None:
    """click does not %-format help: "10%%" was printed, and typed back it was refused."""
    output = CliRunner().invoke(cli, [command, "--help"]).output
    assert "10% of RAM" in " ".join(output.split()) and "%%" not in output
