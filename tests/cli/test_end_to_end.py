"""The issue's acceptance story, driven by the CLI: a daemon subprocess on a fake root, the
CLI loads and unloads a backend, sets every knob, reads status/stats/pools as JSON; pages
stored through the socket survive SIGTERM in their backing file."""

from __future__ import annotations

import json
import signal
from typing import Any

from xentmem.control import ControlClient
from xentmem.guestd.swap import read_swap_area


def page(seed: int) -> bytes:
    return (f"cli-page-{seed:05d}|".encode() * 300)[:4096]


def test_cli_drives_the_daemon_and_sigterm_loses_nothing(daemon: Any, xentmem: Any) -> None:
    # The backend: what auto chose, then unload and load again with module params.
    assert xentmem.json("status")["backend_choice"]["chosen"] == "zcache"
    assert xentmem.json("unload")["backend"] == "zcache"
    assert xentmem.json("status")["backend"] is None
    loaded = xentmem.json("load", "zcache", "capacity=48M", "detailed_stats=1")
    assert loaded["params"]["capacity"] == "48M" and loaded["params"]["detailed_stats"] is True

    # Every selfballoon knob, by its qualified name, to a new valid value.
    knobs = xentmem.json("params", "list", "--section", "selfballoon")
    assert len(knobs) >= 9
    for record in knobs:
        if record["type"] == "bool":
            value, expected = ("0", False) if record["value"] else ("1", True)
        else:
            value, expected = "17", 17
        name = f"selfballoon.{record['name']}"
        assert xentmem.json("params", "set", name, value)["value"] == expected
        assert xentmem.json("params", "get", name)["value"] == expected

    # Pages through the socket's page API (the CLI has no page commands).
    stored = {offset: page(offset) for offset in range(24)}
    with ControlClient(daemon.socket, timeout=10.0) as client:
        swap = client.frontswap.init(pages=128, backing="file")
        for offset, data in stored.items():
            assert client.frontswap.store(swap, offset, data) == 0

    stats = xentmem.json("stats")
    assert stats["frontswap"]["succ_stores"] == 24
    assert stats["frontswap"]["curr_pages"] == 24
    assert stats["backend"]["pers_pages"] == 24
    assert stats["backend_detailed"]
    pools = xentmem.json("pools")
    assert [(a["type"], a["kind"], a["tmem_pages"]) for a in pools["frontswap"]["swap_types"]] \
        == [(swap, "FileBacking", 24)]
    assert pools["backend_pools"]

    daemon.send(signal.SIGTERM)
    assert daemon.stop(None) == 0, daemon.log()
    assert read_swap_area(daemon.state_dir / "swap" / f"type-{swap}.swap") == stored
    summary = json.loads((daemon.state_dir / "shutdown.json").read_text())
    assert summary["clean"] is True and summary["repatriated"] == 24
