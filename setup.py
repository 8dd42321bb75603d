"""Only here for cffi_modules: all metadata lives in pyproject.toml."""

from setuptools import setup

setup(
    cffi_modules=[
        "blktap3/datapath/_build.py:ffibuilder",
        "blktap3/sim/guestdrv/_build.py:ffibuilder",
    ]
)
