"""The handlers translate and call one method of the daemon; they never reach past it."""

from __future__ import annotations

import ast
import inspect

from xentmem.guestd import handlers
from xentmem.guestd.core import Daemon


def test_handlers_only_call_methods_of_the_daemon() -> None:
    tree = ast.parse(inspect.getsource(handlers))
    used: set[str] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in ("d", "daemon")):
            used.add(node.attr)
    assert used, "no daemon calls found: the test no longer sees the handlers"
    not_methods = {name for name in used if not inspect.isfunction(getattr(Daemon, name, None))}
    assert not not_methods, f"handlers reach past the daemon's methods: {sorted(not_methods)}"
