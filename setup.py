"""Only here for cffi_modules and the wheel's tag: all metadata lives in pyproject.toml."""

import sys
import sysconfig

from setuptools import setup

# cffi builds both extensions against the stable ABI (`*.abi3.so`) on every CPython that
# has one: not on a debug build, nor on a free-threaded one before 3.15. There the wheel
# says so (cp311-abi3: one wheel for CPython 3.11 and newer); elsewhere it keeps the
# interpreter's own tag. (`[tool.distutils.bdist_wheel]` in pyproject.toml would do the
# same, but setuptools calls that table experimental and warns.)
STABLE_ABI = not hasattr(sys, "gettotalrefcount") and not (
    sysconfig.get_config_var("Py_GIL_DISABLED") and sys.version_info < (3, 15)
)

setup(
    cffi_modules=[
        "blktap3/datapath/_build.py:ffibuilder",
        "blktap3/sim/guestdrv/_build.py:ffibuilder",
    ],
    options={"bdist_wheel": {"py_limited_api": "cp311"}} if STABLE_ABI else {},
)
