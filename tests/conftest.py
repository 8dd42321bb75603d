"""Suite-wide settings.

Hypothesis explores new random cases on a developer's machine; under CI (`CI` set) it
runs a fixed, derandomized set so that a landing is never decided by luck.
`HYPOTHESIS_PROFILE=explore` asks for a longer random search.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.register_profile("explore", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
