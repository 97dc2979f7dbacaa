"""NBD exports of swap areas, served inside ``xentmemd`` (``docs/nbd.md``).

``proto.py`` is the wire format, ``export.py`` one export (one frontswap swap type),
``server.py`` the listener and its connections, ``exports.py`` the daemon's set of exports.
"""
