"""The C data path (cffi): blkif ring service, request checks, io engine, image drivers.

The facade the tapdisk process calls: ``Image.open``, ``Ring.connect`` and the ring's
``pause``/``resume``/``disconnect``/``stats``. Errors are ``OSError(errno, message)``.
"""

from .image import Image, ImageInfo
from .ring import MAX_INDIRECT_SEGMENTS, MAX_RING_PAGE_ORDER, Ring

__all__ = [
    "MAX_INDIRECT_SEGMENTS",
    "MAX_RING_PAGE_ORDER",
    "Image",
    "ImageInfo",
    "Ring",
]
