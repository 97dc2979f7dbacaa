"""``python -m xentmem.hostd``: the ``xentmem-hostd`` command without its script."""

from xentmem.hostd.cli import main

main()
