"""The one compiled part: the page arena's hot loops (``xentmem/tmem/_hot.c``).

Everything else is in pyproject.toml; setuptools reads ``ext_modules`` only from here.
Building it needs a C compiler and Python's headers (Debian: gcc, python3-dev;
``tests/xen/install-deps.sh`` installs them).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("xentmem.tmem._hot", ["xentmem/tmem/_hot.c"], extra_compile_args=["-O2"]),
    ],
)
