"""``xentmem``, the command line of ``xentmemd`` (installed as package ``xentmem_cli``).

One module per command family (``status``, ``params``, ``backend``, ``pools``, ``stats``,
``balloon``, ``metrics``, ``run``), wired together in :mod:`xentmem_cli.main`; the shared
:class:`~xentmem_cli.app.App` talks to the daemon and owns every exit path.
"""
