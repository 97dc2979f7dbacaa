"""The config file: both spellings, checked against the real ParamSets, and the precedence
flags > file > kernel command line > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes.recording_backend import RecordingBackend

from xentmem.errors import ConfigError, ParamError
from xentmem.guestd.config import (
    ANY_BACKEND,
    ConfigSchema,
    load,
    read_config,
)
from xentmem_selfballoon.knobs import SELFBALLOON_PARAMS

TOML = """\
# the daemon
[daemon]
backend = "recording"
control_group = "wheel"
control_mode = "0640"
metrics_textfile = "/var/lib/node_exporter/xentmem.prom"

[tmem]
frontswap_writethrough = true

[backend.recording]
max_pools = 4
label = "from-toml"

[selfballoon]
selfballoon_interval = 9
selfballoon_min_usable_mb = "auto"
"""

MODPROBE = """\
# the same, as modprobe.d lines
options xentmemd backend=recording control_group=wheel control_mode=0640 \\
    metrics_textfile=/var/lib/node_exporter/xentmem.prom
options tmem frontswap_writethrough=1
options recording max_pools=4 label=from-toml   # trailing comment
options selfballoon selfballoon_interval=9 selfballoon_min_usable_mb=auto
"""


def schema() -> ConfigSchema:
    backends = {"recording": RecordingBackend}

    def params_of(name: str):  # type: ignore[no-untyped-def]
        if name not in backends:
            raise ParamError(f"unknown backend {name!r}; available backends: recording")
        return backends[name].params

    return ConfigSchema(SELFBALLOON_PARAMS, params_of)


@pytest.mark.parametrize(("name", "text"), [("x.toml", TOML), ("x.conf", MODPROBE)])
def test_both_spellings_mean_the_same(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    config = read_config(path, schema())
    assert config.backend == "recording"
    assert config.daemon["control_group"] == "wheel"
    assert config.daemon["control_mode"] == 0o640
    assert config.daemon["metrics_textfile"] == "/var/lib/node_exporter/xentmem.prom"
    assert config.tmem == {"frontswap_writethrough": True}
    assert config.backend_params == {"recording": {"max_pools": 4, "label": "from-toml"}}
    assert config.knobs == {"selfballoon_interval": 9, "selfballoon_min_usable_mb": None}
    assert config.load_params("recording") == {"frontswap_writethrough": True,
                                               "max_pools": 4, "label": "from-toml"}
    line = 4 if name.endswith(".toml") else 2
    assert config.origins["daemon.control_group"] == f"{path}:{line}"


def test_missing_default_file_is_defaults(tmp_path: Path) -> None:
    config = read_config(tmp_path / "absent.toml", schema(), missing_ok=True)
    assert config.backend == "auto" and config.path is None
    assert config.daemon["control_mode"] == 0 and config.knobs == {}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("c.toml", "[daemon]\nbackend = 'nope'\n", "c.toml:2: [daemon] backend: unknown backend"),
        ("c.toml", "[daemon]\n\nlog_level = 'loud'\n", "c.toml:3: [daemon] log_level"),
        ("c.toml", "[tmem]\ncleancache = 'maybe'\n", "c.toml:2: [tmem] cleancache"),
        ("c.toml", "[tmem]\nturbo = 1\n", "c.toml:2: [tmem] unknown param 'turbo' for tmem"),
        ("c.toml", "[backend.recording]\nmax_pools = 65\n",
         "c.toml:2: [recording] max_pools: 65 is out of range; accepted: an integer >= 1"),
        ("c.toml", "[backend.nosuch]\nx = 1\n", "c.toml:2: [nosuch] unknown backend 'nosuch'"),
        ("c.toml", "[backend]\nrecording = 1\n", "c.toml:2: [backend] recording"),
        ("c.toml", "[selfballoon]\nselfballoon_interval = 0\n",
         "c.toml:2: [selfballoon] selfballoon_interval"),
        ("c.toml", "[selfballoon]\nselfballoon_interval = [1]\n", "expected a string"),
        ("c.toml", "[extras]\na = 1\n", "c.toml:1: unknown table or key 'extras'"),
        ("c.toml", "top = 1\n", "c.toml:1: unknown table or key 'top'"),
        ("c.toml", "[daemon\n", "c.toml: not valid TOML"),
        ("c.conf", "options recording max_pools\n",
         "c.conf:1: [recording] 'max_pools' is not of the form name=value"),
        ("c.conf", "options\n", "c.conf:1: 'options' needs a module name"),
        ("c.conf", "\n\ninstall zcache /bin/true\n", "c.conf:3: 'install'"),
        ("c.conf", "options tmem \\\n  cleancache=2\n", "c.conf:1: [tmem] cleancache"),
        ("c.conf", "options xentmemd control_mode=999\n", "c.conf:1: [daemon] control_mode"),
        # Bits for others would open the page API and params.set to every local user:
        ("c.conf", "options xentmemd control_mode=0666\n",
         "c.conf:1: [daemon] control_mode: 0666 opens the control socket to every local user"),
        ("c.toml", "[daemon]\ncontrol_mode = 0o604\n",
         "c.toml:2: [daemon] control_mode: 0604 opens the control socket to every local user"),
        ("c.toml", "[daemon]\ncontrol_mode = \"0661\"\n", "c.toml:2: [daemon] control_mode"),
    ],
)
def test_bad_files_name_file_line_and_key(tmp_path: Path, name: str, text: str,
                                          message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        read_config(path, schema())
    assert message in str(caught.value).replace(str(tmp_path) + "/", "")


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text(TOML)
    config = load(path, schema(), ["selfballoon_interval=3", "recording.label=from-flag",
                                   "tmem.frontswap_writethrough=0", "capacity=5M",
                                   "daemon.log_level=debug", "xentmemd.control_group=users"])
    assert config.knobs["selfballoon_interval"] == 3
    assert config.knobs["selfballoon_min_usable_mb"] is None  # kept from the file
    assert config.backend_params["recording"] == {"max_pools": 4, "label": "from-flag"}
    assert config.backend_params[ANY_BACKEND] == {"capacity": "5M"}  # checked at load
    assert config.tmem == {"frontswap_writethrough": False}
    assert config.daemon["log_level"] == "debug"
    assert config.daemon["control_group"] == "users"
    assert config.daemon["control_mode"] == 0o640  # from the file
    assert config.origins["selfballoon.selfballoon_interval"] == "command line"


def test_world_bits_are_refused_from_the_command_line_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"command line: \[daemon\] control_mode: 0777 opens"):
        load(tmp_path / "absent.toml", schema(), ["daemon.control_mode=0777"], missing_ok=True)
    config = load(tmp_path / "absent.toml", schema(), ["daemon.control_mode=0660"],
                  missing_ok=True)
    assert config.daemon["control_mode"] == 0o660


def test_bad_override_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"-o: .*not of the form"):
        load(tmp_path / "absent.toml", schema(), ["novalue"], missing_ok=True)
    with pytest.raises(ConfigError, match="command line: \\[selfballoon\\] frontswap_inertia"):
        load(tmp_path / "absent.toml", schema(), ["frontswap_inertia=x"], missing_ok=True)


PRECEDENCE_TOML = """\
[tmem]
cleancache = false
selfballooning_at_load = true

[backend.zcache]
capacity = "64M"
detailed_stats = true

[selfballoon]
selfballoon_interval = 7
selfballoon_downhysteresis = 4
"""


def test_precedence_flags_file_cmdline_defaults(tmp_path: Path, make_daemon) -> None:
    """Each value below is decided by a different layer."""
    (tmp_path / "root" / "proc" / "cmdline").write_text(
        "ro tmem tmem.cleancache=1 tmem.selfballooning=0 noselfshrink tmem.frontswap=1\n")
    daemon = make_daemon(PRECEDENCE_TOML, overrides=("cleancache=1", "capacity=32M",
                                                     "selfballoon_interval=9"))
    daemon.load("zcache")
    flags = daemon.shim.flags
    params = daemon.shim.params()
    assert flags["cleancache"] is True          # -o 1 > file false > cmdline 1
    assert flags["selfballooning_at_load"] is True  # file true > cmdline 0
    assert flags["selfshrinking"] is False      # cmdline noselfshrink > default true
    assert flags["frontswap_writethrough"] is False   # default
    assert params["capacity"] == "32M"          # -o > file
    assert params["detailed_stats"] is True     # file > default
    assert daemon.balloon.knobs.get("selfballoon_interval") == 9     # -o > file
    assert daemon.balloon.knobs.get("selfballoon_downhysteresis") == 4   # file > default
    assert daemon.balloon.knobs.get("selfballoon_uphysteresis") == 1     # default


def test_cmdline_applies_when_the_file_is_silent(tmp_path: Path, make_daemon) -> None:
    (tmp_path / "root" / "proc" / "cmdline").write_text("ro nocleancache\n")
    daemon = make_daemon(None)
    daemon.load("zcache")
    assert daemon.shim.flags["cleancache"] is False
    assert daemon.shim.cleancache.ops is None


def test_unknown_unqualified_override_fails_at_load(make_daemon) -> None:
    daemon = make_daemon(None, overrides=("turbo=1",))
    with pytest.raises(ParamError, match="unknown param 'turbo' for zcache"):
        daemon.load("zcache")
    assert daemon.shim.backend is None
