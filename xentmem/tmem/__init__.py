"""The tmem ABI and page store: what a tmem client and a tmem host agree on (guest and dom0)."""
