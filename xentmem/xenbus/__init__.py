"""Xen plumbing shared by both ends of the split driver (runs in the domU and in dom0).

``xs``: the one xenstore client; ``device``: the state rules every xenbus device follows;
``body``, ``framing``, ``area``: the tmem messages, how they become xenstore nodes, and
where those live; ``probe``: whether this is Xen, and where xenstore is.
"""
