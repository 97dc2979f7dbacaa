"""xenstore's permission rule on its own (``xentmem/xenbus/perms.py``): the first entry is the
owner *and* the default for every unlisted domain; the stand-in xenstored uses the same code.
``test_attack.py`` checks the same rule against the real daemons."""

from __future__ import annotations

import pytest

from xentmem.mock_xenstored import perms as mock_perms
from xentmem.xenbus import perms
from xentmem.xenbus.perms import Access, Caller, Perms, PermsError, holders, perm_for

W, R = Access.WRITE, Access.READ


@pytest.mark.parametrize(("entries", "writers", "readers"), [
    # (the list, who besides the owner may write, who may read): "*" = every unlisted domain
    ([b"n5"], "{}", "{}"),
    ([b"b5"], "*", "*"),  # not "only 5": the letter is everybody's default
    ([b"w5"], "*", "{}"),
    ([b"r5", b"w6"], "{6}", "* but 6"),
    ([b"n5", b"r0", b"w6"], "{6}", "{0}"),
    ([b"n5", b"n6", b"w6"], "{}", "{}"),  # the first entry naming 6 wins
    ([b"b5", b"n6"], "* but 6", "* but 6"),
    ([b"n5", b"b5"], "{}", "{}"),  # the owner is the owner whatever a later entry says
])
def test_holders_are_what_perm_for_says_for_every_domain(entries: list[bytes], writers: str,
                                                         readers: str) -> None:
    parsed = Perms.parse(entries)
    for want, expected in ((W, writers), (R, readers)):
        found = holders(parsed, want).besides({5})
        for domid in range(0, 12):
            if domid == 5:
                continue
            may = bool(perm_for(Caller(domid), parsed) & want)
            assert (domid in found) == may, (entries, want, domid)
            if expected.startswith("*"):
                assert may == (f"but {domid}" not in expected), (entries, want, domid)
            else:
                assert may == (str(domid) in expected), (entries, want, domid)
        assert bool(found) == (expected != "{}")


def test_the_owner_dom0_and_a_device_model_may_do_everything() -> None:
    locked = Perms.parse([b"n5"])
    assert perm_for(Caller(5), locked) == Access.BOTH | Access.OWNER
    assert perm_for(Caller.dom0(), locked) == Access.BOTH | Access.OWNER
    assert perm_for(Caller(9, target=5), locked) == Access.BOTH | Access.OWNER
    assert perm_for(Caller(9), locked) == Access.NONE


def test_holders_say_who_in_words() -> None:
    assert str(holders(Perms.parse([b"n5", b"w6"]), W).besides({5, 0})) == "domains [6]"
    assert str(holders(Perms.parse([b"b5"]), W).besides({5, 0})) == "every domain but [0, 5]"
    assert not holders(Perms.parse([b"n5", b"r0"]), W).besides({5, 0})


@pytest.mark.parametrize("bad", [[], [b"x5"], [b"b"], [b"b-1"], [b"b05"], [b"r5 "]])
def test_a_list_outside_the_grammar_is_refused(bad: list[bytes]) -> None:
    with pytest.raises(PermsError):
        Perms.parse(bad)


def test_the_stand_in_xenstored_uses_the_same_rule() -> None:
    for name in ("Access", "Caller", "PermEntry", "Perms", "perm_for", "LETTER_ACCESS"):
        assert getattr(mock_perms, name) is getattr(perms, name)
