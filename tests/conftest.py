"""Shared pytest configuration.

Fixture modules live in ``tests/fakes`` (importable as ``fakes``).  The xenstore peers
(``xenstore_host``: ours, Debian's C xenstored, oxenstored; ``xs_server``: ours only) are
registered here once, so the real daemons start at most once per session.
"""

from fakes.xenstore_hosts import (  # noqa: F401  (fixtures, registered by import)
    c_xenstored_peer,
    make_xs_server,
    oxenstored_peer,
    pyxs_su,
    xenstore_host,
    xs_server,
)
