"""Bad module params are refused with a message naming the param, and nothing is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes.recording_backend import RecordingBackend

from xentmem.errors import ParamError
from xentmem.guest.cmdline import BootParams
from xentmem.guest.frontends import MemoryBacking
from xentmem.guest.shim import Shim
from xentmem.roots import Roots


@pytest.fixture
def shim(tmp_path: Path) -> Shim:
    s = Shim(roots=Roots(root=tmp_path), boot=BootParams())
    s.cleancache.init_fs()
    s.frontswap.init(0, MemoryBacking(8))
    return s


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"no_such_param": "1"}, r"unknown param 'no_such_param'.*known params: cleancache"),
        ({"cleancache": "maybe"}, r"cleancache: 'maybe' is not a boolean; accepted: 0 or 1"),
        ({"max_pools": "lots"}, r"max_pools: .* not a base-10 integer; accepted: an integer >= 1"),
        ({"max_pools": "0"}, r"max_pools: 0 is out of range; accepted: an integer >= 1 and <= 64"),
        ({"max_pools": 65}, r"max_pools: 65 is out of range"),
        ({"max_pools": True}, r"max_pools: True is not an integer"),
    ],
)
def test_bad_param_refused_and_nothing_changes(shim: Shim, params: dict, message: str) -> None:
    with pytest.raises(ParamError, match=message):
        shim.load(RecordingBackend, params)
    assert shim.backend is None
    assert shim.cleancache.ops is None and shim.frontswap.ops is None
    assert shim.frontswap.pool_id == -1
    assert shim.flags["cleancache"] is True


def test_unknown_backend_name_lists_available(shim: Shim) -> None:
    with pytest.raises(ParamError, match=r"unknown backend 'nope'; available backends: .*zcache"):
        shim.load("nope")


def test_read_only_flag_cannot_change_at_run_time(shim: Shim) -> None:
    shim.load(RecordingBackend)
    with pytest.raises(ParamError, match="read-only"):
        shim.set_param("cleancache", "0")
    with pytest.raises(ParamError, match="max_pools: read-only"):
        shim.set_param("max_pools", "3")
    assert shim.set_param("label", "new") == "new"
    assert shim.params()["label"] == "new"


def test_explicit_params_win_over_the_kernel_command_line(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cmdline").write_text("ro tmem tmem.cleancache=0 nofrontswap\n")
    shim = Shim(roots=Roots(root=tmp_path))
    shim.load(RecordingBackend, {"frontswap": "1"})
    assert shim.flags["cleancache"] is False  # from the command line
    assert shim.flags["frontswap"] is True  # explicit wins


@pytest.mark.parametrize("text", ["\u0663", "\uff13", "3\u00a0", "1_0", "0x3", "3 4", "--3", ""])
def test_an_int_param_takes_ascii_digits_only(text: str) -> None:
    # Regression: str.isdigit() and int() read '\u0663' and '\uff13' as 3.
    from xentmem.params import Param

    with pytest.raises(ParamError, match="is not a base-10 integer"):
        Param("n", int, 1, "a number").coerce(text)


@pytest.mark.parametrize(("text", "typed"), [("3", 3), (" +3\n", 3), ("-3", -3), ("007", 7)])
def test_an_int_param_reads_the_kernels_integers(text: str, typed: int) -> None:
    from xentmem.params import Param

    assert Param("n", int, 1, "a number").coerce(text) == typed
