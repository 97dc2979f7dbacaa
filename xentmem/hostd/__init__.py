"""``xentmem-hostd``, the tmem service in dom0: it holds the guests' pages."""
