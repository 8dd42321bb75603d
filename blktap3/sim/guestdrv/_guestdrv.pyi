"""Type stub of the cffi extension built by _build.py."""

from typing import Any

ffi: Any
lib: Any
