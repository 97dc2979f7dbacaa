"""Where each setting came from, said in ``params list`` and the backend choice: the command
line, the config file's line, the kernel command line, the default, or auto; then what
changed it since (a load request, params set)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONF = """\
options zcache capacity=64M
options selfballoon selfballoon_interval=7
"""


def origins(daemon: Any) -> dict[tuple[str, str], str]:
    return {(row["section"], row["name"]): row["from"] for row in daemon.params_list()}


def test_each_param_says_where_its_value_came_from(tmp_path: Path, make_daemon: Any) -> None:
    (tmp_path / "root" / "proc" / "cmdline").write_text("ro tmem.cleancache=0\n")
    daemon = make_daemon(CONF, suffix=".conf",
                         overrides=("daemon.backend=zcache", "selfballoon_downhysteresis=4"))
    daemon.load()
    conf = tmp_path / "xentmem.conf"
    found = origins(daemon)
    assert found[("backend", "capacity")] == f"{conf}:1"
    assert found[("selfballoon", "selfballoon_interval")] == f"{conf}:2"
    assert found[("selfballoon", "selfballoon_downhysteresis")] == "command line"
    assert found[("tmem", "cleancache")] == "kernel command line"
    assert found[("tmem", "frontswap")] == "default"
    assert found[("selfballoon", "selfballoon_min_usable_mb")] == "auto"
    assert found[("selfballoon", "selfballooning")] == "tmem flag selfballooning_at_load"
    assert daemon.choice.describe() == {"requested": "zcache", "chosen": "zcache",
                                        "reason": "named in the command line",
                                        "from": "command line"}

    daemon.param_set("selfballoon_interval", "9")
    daemon.param_set("capacity", "32M")
    assert origins(daemon)[("selfballoon", "selfballoon_interval")] == "params set"
    assert origins(daemon)[("backend", "capacity")] == "params set"

    daemon.unload()
    daemon.load("zcache", {"detailed_stats": "1"})
    found = origins(daemon)
    assert found[("backend", "detailed_stats")] == "load request"
    assert found[("backend", "capacity")] == f"{conf}:1"  # the load set it afresh
    assert found[("selfballoon", "selfballoon_interval")] == "params set"  # knobs stay
    assert daemon.choice.describe()["reason"] == "named in the load request"


def test_a_backend_named_in_the_file_says_its_line(tmp_path: Path, make_daemon: Any) -> None:
    daemon = make_daemon("[daemon]\n\nbackend = \"zcache\"\n")
    daemon.load()
    assert daemon.choice.describe()["reason"] == f"named in {tmp_path / 'xentmem.toml'}:3"


def test_auto_by_default_says_so(make_daemon: Any) -> None:
    auto = make_daemon(None)
    auto.load()
    assert auto.choice.describe()["from"] == "default"
