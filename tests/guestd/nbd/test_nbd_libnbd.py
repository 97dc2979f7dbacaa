"""Our NBD server against libnbd, the NBD project's client library: the handshake's
options, every command, the errors the protocol names, and data checked against a model
over many connections at once."""

from __future__ import annotations

import random

import pytest
from fakes.libnbd_peer import Handle, LibNbd, LibNbdError
from fakes.nbd_served import Served

PAGE = 4096
CMD_FLAG_FUA = 1
CMD_FLAG_NO_HOLE = 2
CMD_FLAG_FAST_ZERO = 16


def connect(libnbd: LibNbd, served: Served, name: str) -> Handle:
    h = libnbd.handle()
    h.connect_uri(served.uri(name))
    return h


def page(tag: int) -> bytes:
    return random.Random(tag).randbytes(PAGE)


def test_the_handshake_options(served: Served, libnbd: LibNbd) -> None:
    served.exports.add(64, "file", name="alpha")
    served.exports.add(16, "memory", name="beta")
    h = libnbd.handle()
    h.set_opt_mode(True)
    h.set_request_block_size(True)
    h.connect_uri(served.uri("alpha"))
    # libnbd asked for structured replies first: refused with NBD_REP_ERR_UNSUP, it goes on.
    assert h.get_structured_replies_negotiated() is False
    assert h.opt_list()["names"] == ["alpha", "beta"]
    h.set_export_name("beta")
    h.opt_info()
    assert h.get_size() == 16 * PAGE
    h.set_export_name("nosuch")
    with pytest.raises(LibNbdError):
        h.opt_info()
    h.set_export_name("alpha")
    h.opt_go()
    assert h.get_size() == 64 * PAGE
    assert [h.get_block_size(k) for k in (0, 1, 2)] == [PAGE, PAGE, 2 * 1024 * 1024]
    assert h.can_multi_conn() and h.can_flush() and h.can_fua()
    assert h.can_trim() and h.can_zero()
    assert not h.is_read_only()
    assert not h.can_cache() and not h.can_df() and not h.can_fast_zero()
    h.shutdown()
    h.close()
    served.wait_connections(0)

    aborted = libnbd.handle()
    aborted.set_opt_mode(True)
    aborted.connect_uri(served.uri("alpha"))
    aborted.opt_abort()
    aborted.close()
    served.wait_connections(0)


def test_an_unknown_export_is_refused_at_go(served: Served, libnbd: LibNbd) -> None:
    served.exports.add(8, "memory", name="alpha")
    h = libnbd.handle()
    with pytest.raises(LibNbdError):
        h.connect_uri(served.uri("nosuch"))
    h.close()


def test_every_command_against_a_model_over_many_connections(served: Served,
                                                             libnbd: LibNbd) -> None:
    pages = 96
    served.exports.add(pages, "file", name="swap")
    handles = [connect(libnbd, served, "swap") for _ in range(6)]
    model: dict[int, bytes] = {}
    rng = random.Random(13)
    for step in range(400):
        h = rng.choice(handles)
        first = rng.randrange(pages)
        count = rng.randint(1, min(8, pages - first))
        op = rng.choice(["write", "write", "write", "fua", "read", "read", "trim", "zero",
                         "zero_no_hole", "flush"])
        if op in ("write", "fua"):
            data = b"".join(page(step * 100 + i) for i in range(count))
            h.pwrite(data, first * PAGE, CMD_FLAG_FUA if op == "fua" else 0)
            for i in range(count):
                model[first + i] = data[i * PAGE:(i + 1) * PAGE]
        elif op == "read":
            got = h.pread(count * PAGE, first * PAGE)
            want = b"".join(model.get(first + i, bytes(PAGE)) for i in range(count))
            assert got == want, f"step {step}: pages {first}..{first + count - 1}"
        elif op == "trim":
            h.trim(count * PAGE, first * PAGE)
            for i in range(count):  # after a trim the contents are unspecified: ours are zero
                model.pop(first + i, None)
        elif op in ("zero", "zero_no_hole"):
            h.zero(count * PAGE, first * PAGE, CMD_FLAG_NO_HOLE if op == "zero_no_hole" else 0)
            for i in range(count):
                model.pop(first + i, None)
        else:
            h.flush()
    reader = handles[0]
    assert reader.pread(pages * PAGE, 0) == b"".join(model.get(i, bytes(PAGE))
                                                    for i in range(pages))
    area = served.shim.frontswap.describe()["swap_types"][0]
    assert area["tmem_pages"] > 0  # the pages went through frontswap to zcache
    for h in handles:
        h.shutdown()
        h.close()
    served.wait_connections(0)


@pytest.mark.parametrize(("call", "errno"), [
    (lambda h: h.pread(PAGE, 512), "EINVAL"),  # unaligned offset
    (lambda h: h.pread(100, 0), "EINVAL"),  # unaligned length
    (lambda h: h.pwrite(b"x" * 512, 0), "EINVAL"),
    (lambda h: h.pwrite(page(1), 8 * PAGE), "ENOSPC"),  # past the end: a write is ENOSPC
    (lambda h: h.pwrite(page(1) * 2, 7 * PAGE), "ENOSPC"),
    (lambda h: h.pread(PAGE, 8 * PAGE), "EINVAL"),  # a read past the end is EINVAL
    (lambda h: h.trim(2 * PAGE, 7 * PAGE), "EINVAL"),  # so is a trim
    (lambda h: h.zero(2 * PAGE, 7 * PAGE), "ENOSPC"),  # write-zeroes is a write
    (lambda h: h.zero(PAGE, 0, CMD_FLAG_FAST_ZERO), "EINVAL"),  # FAST_ZERO: not offered
    (lambda h: h.trim(100, 0), "EINVAL"),
])
def test_refused_requests_change_nothing(served: Served, libnbd: LibNbd, call, errno) -> None:
    served.exports.add(8, "file", name="small")
    h = connect(libnbd, served, "small")
    h.set_strict_mode(0)  # libnbd would refuse these itself
    before = b"".join(page(100 + i) for i in range(8))
    h.pwrite(before, 0)
    with pytest.raises(LibNbdError) as refused:
        call(h)
    assert refused.value.errno == errno
    counts = served.exports.get("small").describe()["counts"]
    assert counts.get(f"refused_{errno}") == 1  # the server said so, not libnbd
    assert h.pread(8 * PAGE, 0) == before  # and the connection still works
    h.shutdown()
    h.close()
