"""fio's nbd engine (libnbd underneath) against our export: its own write-then-verify over
several connections at once, and a fio killed with SIGKILL in the middle of its writes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading

import pytest
from fakes.libnbd_peer import fio_unavailable_reason
from fakes.nbd_served import WAIT_S, Served
from fakes.required import unavailable

from xentmem.guestd.nbd.export import Export

PAGE = 4096


@pytest.fixture
def fio() -> str:
    reason = fio_unavailable_reason()
    if reason is not None:
        unavailable("NBD", "fio with its nbd engine", reason)
    path = shutil.which("fio")
    assert path is not None
    return path


def fio_args(fio: str, served: Served, name: str, *extra: str) -> list[str]:
    return [fio, "--name=nbd", "--ioengine=nbd", f"--uri={served.uri(name)}", "--bs=4k",
            "--output-format=terse", "--terse-version=3",
            "--verify_state_save=0",  # no local-*-verify.state left in the working directory
            *extra]


def test_fio_writes_then_verifies_over_four_connections(served: Served, fio: str) -> None:
    served.exports.add(4 * 512, "file", name="v")
    result = subprocess.run(
        fio_args(fio, served, "v", "--rw=randwrite", "--iodepth=16", "--numjobs=4",
                 "--size=2m", "--offset_increment=2m", "--verify=crc32c",
                 "--do_verify=1", "--verify_fatal=1", "--group_reporting"),
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    fields = result.stdout.strip().splitlines()[-1].split(";")
    assert fields[4] == "0", f"fio reported error {fields[4]}"
    counts = served.exports.get("v").describe()["counts"]
    assert counts["connections"] >= 4
    assert counts["pages_to_tmem"] + counts["pages_to_backing"] == 4 * 512
    assert not any(k.startswith("refused") for k in counts), counts


def test_a_fio_killed_mid_write_leaves_the_export_intact(served: Served, fio: str,
                                                         monkeypatch) -> None:
    served.exports.add(1024, "file", name="k")
    busy = threading.Event()
    real_write = Export.write
    writes = 0

    def counting_write(self: Export, offset: int, data, fua: bool = False,
                       fanout=None) -> None:
        nonlocal writes
        real_write(self, offset, data, fua, fanout)
        writes += 1
        if writes >= 200:
            busy.set()  # fio is well into its writes: now kill it
    monkeypatch.setattr(Export, "write", counting_write)
    proc = subprocess.Popen(
        fio_args(fio, served, "k", "--rw=randwrite", "--iodepth=32", "--size=4m",
                 "--time_based", "--runtime=300", "--thread"),  # one process: all killed
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert busy.wait(WAIT_S), "fio never got going"
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    served.wait_connections(0)
    monkeypatch.undo()
    # Every page reads back (no damaged page, no error), and the export takes a full
    # write-and-verify run afterwards.
    result = subprocess.run(
        fio_args(fio, served, "k", "--rw=randwrite", "--iodepth=8", "--size=4m",
                 "--verify=crc32c", "--do_verify=1", "--verify_fatal=1"),
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert served.swap.store_of(0).describe()["damaged"] == 0
