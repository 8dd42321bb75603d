"""`python -m blktap3.sim.guest ...`: the guest process (see `child.py`)."""

import sys

from .child import main

sys.exit(main())
